"""Properties over random shapes (hypothesis): every backend against the naive loop."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import moe_dispatch as md
from moe_dispatch import validation
from moe_dispatch.activations import ACTIVATIONS
from conftest import assert_close, expert_weights
from reference import naive_grouped_mm, naive_moe_mlp, naive_plan

SETTINGS = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@st.composite
def routings(draw):
    experts = draw(st.integers(1, 9))
    top_k = draw(st.integers(1, experts))
    tokens = draw(st.integers(0, 24))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    # Any ids, repeats within a token included: the plan must not care.
    ids = torch.randint(0, experts, (tokens, top_k), generator=gen)
    return ids, experts, gen


@SETTINGS
@given(routing=routings())
def test_plan_matches_naive(backend, routing):
    ids, experts, _ = routing
    plan = md.make_plan(ids, experts, backend=backend)
    counts, offsets, token_of_row, row_of_slot = naive_plan(ids, experts)
    assert plan.counts.tolist() == counts and plan.offsets.tolist() == offsets
    assert plan.token_of_row.tolist() == token_of_row and plan.row_of_slot.tolist() == row_of_slot


@SETTINGS
@given(routing=routings())
def test_the_plan_check_passes_every_plan_and_no_other_ids(backend, routing):
    """A plan passed to moe_mlp is checked against its ids: never a false alarm, and a slot
    routed elsewhere is caught."""
    ids, experts, _ = routing
    plan = md.make_plan(ids, experts, backend=backend)
    validation.plan_values(plan, ids)
    if ids.numel() and experts > 1:
        other = ids.clone()
        other[-1, -1] = (other[-1, -1] + 1) % experts
        with pytest.raises(ValueError, match="not the plan of ids"):
            validation.plan_values(plan, other)


@SETTINGS
@given(routing=routings(), hidden=st.integers(1, 40), out=st.integers(1, 40))
def test_grouped_mm_matches_naive(backend, routing, hidden, out):
    ids, experts, gen = routing
    plan = md.make_plan(ids, experts)
    xs = torch.randn(plan.num_rows, hidden, generator=gen)
    w = torch.randn(experts, hidden, out, generator=gen) / hidden**0.5
    assert_close(md.grouped_mm(xs, w, plan.offsets, backend=backend), naive_grouped_mm(xs, w, plan.offsets.tolist()))


@SETTINGS
@given(routing=routings(), hidden=st.integers(1, 24), inter=st.integers(1, 24),
       activation=st.sampled_from(list(ACTIVATIONS)), interleaved=st.booleans())
def test_moe_mlp_matches_naive(backend, routing, hidden, inter, activation, interleaved):
    ids, experts, gen = routing
    x = torch.randn(ids.shape[0], hidden, generator=gen)
    weights = torch.rand(ids.shape, generator=gen)
    w_gate_up, w_down, _, _ = expert_weights(experts, hidden, inter, gen, activation=activation)
    interleaved = interleaved and ACTIVATIONS[activation].gated
    out = md.moe_mlp(x, weights, ids, md.ExpertWeights(w_gate_up, w_down, activation=activation,
                                                       interleaved=interleaved), backend=backend)
    assert_close(out, naive_moe_mlp(x, weights, ids, w_gate_up, w_down, activation=activation,
                                    interleaved=interleaved))
