"""Fuzzing every public op on every backend against the naive loop (hypothesis).

test_properties.py checks float32 contiguous inputs over random shapes; this module draws what
users pass besides: the degenerate sizes (T=0, H=1, I=1, E=1, k=E) and odd and prime ones,
float32, bfloat16 and float16, transposed, sliced and expanded inputs, routings (uniform, every
slot on one expert, a token choosing one expert twice), int32 and int64 ids, and gradients. Each
example also checks that no input was modified. The Triton backend runs under its interpreter
here: tiny sizes, and no bfloat16 (it cannot do a bf16 tl.dot).

A few examples per test by default, the same each run (derandomize); a deeper run draws more:

    MOE_DISPATCH_FUZZ_EXAMPLES=300 python -m pytest -q tests/test_fuzz.py
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import moe_dispatch as md
from conftest import HAS_CUDA, assert_close, expert_weights, output_and_grads, random_ids, random_weights
from moe_dispatch.activations import ACTIVATIONS
from reference import naive_grouped_mm, naive_moe_mlp, naive_permute, naive_plan, naive_route, naive_unpermute

EXAMPLES = int(os.environ.get("MOE_DISPATCH_FUZZ_EXAMPLES", "6"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
LAYOUTS = ["contiguous", "transposed", "sliced", "expanded"]


# ---- what is drawn ---------------------------------------------------------------------------


def draw_sizes(data, backend):
    """(T, k, E, H, I): from the degenerate to odd and prime; tiny under the Triton interpreter."""
    tiny = backend == "triton" and not HAS_CUDA
    size = lambda high: st.one_of(st.sampled_from([1, 2, 3, 7, 13, 16, 17]), st.integers(1, high))  # noqa: E731
    tokens = data.draw(st.integers(0, 9 if tiny else 40), label="T")
    experts = data.draw(st.integers(1, 5 if tiny else 13), label="E")
    top_k = data.draw(st.integers(1, experts), label="k")
    return tokens, top_k, experts, data.draw(size(24 if tiny else 48), label="H"), data.draw(size(20 if tiny else 40),
                                                                                              label="I")


def draw_dtype(data, backend):
    # the interpreter multiplies bf16 bit patterns in tl.dot (conftest.skip_if_unsupported)
    dtypes = [torch.float32, torch.float16] if backend == "triton" and not HAS_CUDA else [
        torch.float32, torch.bfloat16, torch.float16]
    return data.draw(st.sampled_from(dtypes), label="dtype")


def draw_ids(data, tokens, top_k, experts, gen):
    """[T, k] ids: distinct per token (a router's top-k), every slot on one expert, or any ids
    (a token choosing one expert twice); int64 or int32, maybe a transposed view."""
    routing = data.draw(st.sampled_from(["uniform", "one-expert", "any"]), label="routing")
    if routing == "uniform":
        ids = random_ids(tokens, top_k, experts, gen)
    elif routing == "one-expert":
        ids = torch.full((tokens, top_k), data.draw(st.integers(0, experts - 1), label="expert"))
    else:
        ids = torch.randint(0, experts, (tokens, top_k), generator=gen)
    ids = ids.to(data.draw(st.sampled_from([torch.int64, torch.int32]), label="ids dtype"))
    return ids.mT.contiguous().mT if data.draw(st.booleans(), label="ids transposed") else ids


def laid_out(t: torch.Tensor, layout: str) -> torch.Tensor:
    """t's values (all of its first row or expert's, when expanded) in layout; differentiable."""
    if layout == "transposed":  # column-major in the last two dims
        return t.mT.contiguous().mT
    if layout == "sliced":  # every other column of a wider tensor, at an odd offset
        wide = t.new_zeros(*t.shape[:-1], 2 * t.shape[-1] + 1)
        wide[..., 1::2] = t
        return wide[..., 1::2]
    if layout == "expanded":  # one row (or expert) seen T (or E) times: stride 0
        return t[:1].expand(t.shape) if t.shape[0] else t
    return t


def draw_layout(data, label):
    return data.draw(st.sampled_from(LAYOUTS), label=label)


def unchanged(inputs):
    """A check that none of inputs changed (in values or in strides) since this call."""
    before = [(t.clone(), t.stride()) for t in inputs if isinstance(t, torch.Tensor)]

    def check():
        after = [t for t in inputs if isinstance(t, torch.Tensor)]
        assert all(torch.equal(t, b) and t.stride() == s for t, (b, s) in zip(after, before)), "an input changed"

    return check


def float32_grads_close(grads, ref_grads, names):
    for name, g, ref in zip(names, grads, ref_grads):
        assert (g is None) == (ref is None), name
        if g is not None:
            assert g.dtype == torch.float32, name
            assert_close(g, ref, torch.float32)


# ---- the ops -------------------------------------------------------------------------------


@SETTINGS
@given(data=st.data())
def test_fuzz_make_plan(backend, data):
    tokens, top_k, experts, _, _ = draw_sizes(data, backend)
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    ids = draw_ids(data, tokens, top_k, experts, gen)
    check = unchanged([ids])
    plan = md.make_plan(ids, experts, backend=backend)
    check()
    counts, offsets, token_of_row, row_of_slot = naive_plan(ids, experts)
    assert plan.counts.tolist() == counts and plan.offsets.tolist() == offsets
    assert plan.token_of_row.tolist() == token_of_row and plan.row_of_slot.tolist() == row_of_slot


@SETTINGS
@given(data=st.data())
def test_fuzz_permute_and_unpermute(backend, data):
    tokens, top_k, experts, hidden, _ = draw_sizes(data, backend)
    dtype = draw_dtype(data, backend)
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    plan = md.make_plan(draw_ids(data, tokens, top_k, experts, gen), experts)
    x = laid_out(torch.randn(tokens, hidden, generator=gen).to(dtype), draw_layout(data, "x layout"))
    ys = laid_out(torch.randn(plan.num_rows, hidden, generator=gen).to(dtype), draw_layout(data, "ys layout"))
    weights = random_weights(tokens, top_k, gen) if data.draw(st.booleans(), label="weighted") else None
    check = unchanged([x, ys, weights])
    xs = md.permute(x, plan, backend=backend)
    assert xs.dtype == dtype and torch.equal(xs, naive_permute(x, plan.token_of_row.tolist()))  # data moves exactly
    y = md.unpermute(ys, plan, weights, backend=backend)
    assert y.dtype == dtype
    assert_close(y, naive_unpermute(ys, plan.row_of_slot.tolist(), weights), dtype)
    check()

    if dtype == torch.float32:  # gradients in float32, where the table's tolerance is meant for them
        tensors = (x.detach().contiguous(), ys.detach().contiguous(), weights)

        def ours(x, ys, weights):
            return md.unpermute(md.permute(x, plan, backend=backend) + ys, plan, weights, backend=backend)

        def naive(x, ys, weights):
            xs = naive_permute(x.double(), plan.token_of_row.tolist()) + ys.double()
            return naive_unpermute(xs, plan.row_of_slot.tolist(), weights)

        out, grads = output_and_grads(ours, tensors)
        ref_out, ref_grads = output_and_grads(naive, tensors)
        assert_close(out, ref_out)
        float32_grads_close(grads, ref_grads, ("x", "ys", "weights"))


@SETTINGS
@given(data=st.data())
def test_fuzz_grouped_mm(backend, data):
    tokens, top_k, experts, hidden, inter = draw_sizes(data, backend)
    dtype = draw_dtype(data, backend)
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    plan = md.make_plan(draw_ids(data, tokens, top_k, experts, gen), experts)
    xs_layout, w_layout = draw_layout(data, "xs layout"), draw_layout(data, "w layout")
    xs = torch.randn(plan.num_rows, hidden, generator=gen)
    w = torch.randn(experts, inter, hidden, generator=gen) * hidden**-0.5  # nn.Linear layout, passed as .mT
    inputs = (laid_out(xs.to(dtype), xs_layout), laid_out(w.to(dtype), w_layout).mT)
    check = unchanged([*inputs, plan.offsets])
    ys = md.grouped_mm(*inputs, plan.offsets, backend=backend)
    check()
    assert ys.dtype == dtype and ys.shape == (plan.num_rows, inter)
    assert_close(ys, naive_grouped_mm(*inputs, plan.offsets.tolist()), dtype)

    if dtype == torch.float32:
        def ours(xs, w):
            return md.grouped_mm(laid_out(xs, xs_layout), laid_out(w, w_layout).mT, plan.offsets, backend=backend)

        def naive(xs, w):
            return naive_grouped_mm(laid_out(xs, xs_layout), laid_out(w, w_layout).mT, plan.offsets.tolist())

        out, grads = output_and_grads(ours, (xs, w))
        ref_out, ref_grads = output_and_grads(naive, (xs, w))
        assert_close(out, ref_out)
        float32_grads_close(grads, ref_grads, ("xs", "w"))


@SETTINGS
@given(data=st.data())
def test_fuzz_moe_mlp(backend, data):
    tokens, top_k, experts, hidden, inter = draw_sizes(data, backend)
    dtype = draw_dtype(data, backend)
    activation = data.draw(st.sampled_from(list(ACTIVATIONS)), label="activation")
    interleaved = ACTIVATIONS[activation].gated and data.draw(st.booleans(), label="interleaved")
    bias = data.draw(st.booleans(), label="bias")
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    ids = draw_ids(data, tokens, top_k, experts, gen)
    x = torch.randn(tokens, hidden, generator=gen)
    weights = random_weights(tokens, top_k, gen)
    params = expert_weights(experts, hidden, inter, gen, activation=activation, bias=bias)
    layouts = [draw_layout(data, name) for name in ("x layout", "w_gate_up layout", "w_down layout")]

    def ours(x, weights, w_gate_up, w_down, b_gate_up, b_down):
        x, w_gate_up, w_down = (laid_out(t, layout) for t, layout in zip((x, w_gate_up, w_down), layouts))
        experts_ = md.ExpertWeights(w_gate_up, w_down, b_gate_up, b_down, activation, interleaved)
        return md.moe_mlp(x, weights, ids, experts_, backend=backend)

    def naive(x, weights, w_gate_up, w_down, b_gate_up, b_down):
        x, w_gate_up, w_down = (laid_out(t, layout) for t, layout in zip((x, w_gate_up, w_down), layouts))
        return naive_moe_mlp(x, weights, ids, w_gate_up, w_down, b_gate_up, b_down, activation, interleaved)

    inputs = [x.to(dtype), weights, *(None if p is None else p.to(dtype) for p in params)]
    check = unchanged([*inputs, ids])
    out = ours(*inputs)
    check()
    assert out.dtype == dtype and out.shape == (tokens, hidden)
    assert_close(out, naive(*inputs), dtype)

    if dtype == torch.float32:
        out, grads = output_and_grads(ours, inputs)
        ref_out, ref_grads = output_and_grads(naive, inputs)
        assert_close(out, ref_out)
        float32_grads_close(grads, ref_grads, ("x", "weights", "w_gate_up", "w_down", "b_gate_up", "b_down"))


@SETTINGS
@given(data=st.data())
def test_fuzz_moe_layer(backend, data):
    """The layer end to end (routing included) against the naive loop, and its gradients against
    the same layer on the reference backend."""
    tokens, top_k, experts, hidden, inter = draw_sizes(data, backend)
    seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    layer = md.MoE(hidden, inter, experts, top_k, backend=backend)
    reference = md.MoE(hidden, inter, experts, top_k, backend="torch")
    reference.load_state_dict(layer.state_dict())
    x = laid_out(torch.randn(tokens, hidden, generator=gen), draw_layout(data, "x layout"))
    x = x.reshape(1, tokens, hidden) if data.draw(st.booleans(), label="3-d input") else x
    check = unchanged([x])
    out = layer(x)
    check()
    assert out.shape == x.shape and out.dtype == x.dtype

    flat = x.reshape(-1, hidden)
    weights, ids = naive_route((flat @ layer.router.weight.T).detach(), top_k)
    expected = naive_moe_mlp(flat, weights, ids, layer.w_gate_up.detach(), layer.w_down.detach(), activation="swiglu")
    assert_close(out.reshape(-1, hidden).detach(), expected)

    leaves = [x.detach().clone().requires_grad_() for _ in range(2)]
    dy = torch.randn(x.shape, generator=gen)
    for module, leaf in zip((layer, reference), leaves):
        module(leaf).backward(dy)
    assert_close(leaves[0].grad, leaves[1].grad.double())
    for (name, p), (_, q) in zip(layer.named_parameters(), reference.named_parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            assert_close(p.grad, q.grad.double())


# ---- bad ids ---------------------------------------------------------------------------------


@SETTINGS
@given(data=st.data())
def test_fuzz_bad_ids_raise_a_value_error_naming_them(backend, data):
    tokens, top_k, experts, hidden, inter = draw_sizes(data, backend)
    tokens = max(tokens, 1)
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    ids = random_ids(tokens, top_k, experts, gen)
    bad = data.draw(st.sampled_from([-1, experts, experts + 7, -(2**31), 2**31 - 1]), label="bad id")
    ids[data.draw(st.integers(0, tokens - 1)), data.draw(st.integers(0, top_k - 1))] = bad
    ids = ids.to(data.draw(st.sampled_from([torch.int64, torch.int32]), label="ids dtype"))
    with pytest.raises(ValueError, match="ids"):
        md.make_plan(ids, experts, backend=backend)
    x = torch.randn(tokens, hidden, generator=gen)
    w_gate_up, w_down, _, _ = expert_weights(experts, hidden, inter, gen)
    with pytest.raises(ValueError, match="ids"):
        md.moe_mlp(x, random_weights(tokens, top_k, gen), ids, w_gate_up, w_down, backend=backend)
