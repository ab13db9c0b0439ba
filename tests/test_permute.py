"""permute and unpermute (the combine) on every backend. The backend-only sections call the
kernels past the validating front end: numba's, also as Python under NUMBA_DISABLE_JIT, and
Triton's gather and combine around the rows a bad expert id leaves unplaced on CUDA."""

from dataclasses import replace

import pytest
import torch

import moe_dispatch as md
from cases import CASES
from conftest import (FLOAT_DTYPES, HAS_TRITON, assert_close, needs_numba, needs_triton, randn, random_ids,
                      random_weights)
from conftest import TRITON_DEVICE as DEVICE
from moe_dispatch.backends import get_backend
from reference import naive_permute, naive_unpermute

if HAS_TRITON:
    from moe_dispatch.kernels.triton import permute as kmove


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_permute_is_exact(backend, case, dtype, gen):
    ids = case.ids(gen)
    x = randn(case.tokens, case.hidden, gen=gen, dtype=dtype)
    x_before = x.clone()
    plan = md.make_plan(ids, case.experts)
    xs = md.permute(x, plan, backend=backend)
    assert xs.dtype == dtype and xs.shape == (case.tokens * case.top_k, case.hidden)
    assert torch.equal(xs, naive_permute(x, plan.token_of_row.tolist()))
    assert torch.equal(x, x_before)


@pytest.mark.parametrize("weighted", [True, False], ids=["weighted", "sum"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_unpermute(backend, case, dtype, weighted, gen):
    ids = case.ids(gen)
    plan = md.make_plan(ids, case.experts)
    ys = randn(case.tokens * case.top_k, case.hidden, gen=gen, dtype=dtype)
    weights = random_weights(case.tokens, case.top_k, gen) if weighted else None
    y = md.unpermute(ys, plan, weights, backend=backend)
    assert y.dtype == dtype and y.shape == (case.tokens, case.hidden)
    assert_close(y, naive_unpermute(ys, plan.row_of_slot.tolist(), weights))


def test_permute_then_unsum_round_trips(backend, gen):
    # Each token appears k times; summing its rows back gives k * x exactly (small ints).
    ids = torch.randint(0, 5, (10, 3), generator=gen)
    x = torch.randint(-8, 8, (10, 7), generator=gen).float()
    plan = md.make_plan(ids, 5)
    assert torch.equal(md.unpermute(md.permute(x, plan, backend=backend), plan, backend=backend), 3 * x)


@pytest.mark.parametrize("dtype, half_ulp", [(torch.bfloat16, 2.0**-8), (torch.float16, 2.0**-11)], ids=str)
def test_unpermute_sums_in_float32_and_rounds_once(backend, dtype, half_ulp):
    # 1 + h + h with h half an ulp of 1: rounding after each addition would stay at 1
    plan = md.make_plan(torch.tensor([[0, 1, 2]]), 3)
    ys = torch.tensor([[1.0], [half_ulp], [half_ulp]]).to(dtype)
    assert md.unpermute(ys, plan, backend=backend).item() == 1 + 2 * half_ulp


# ---- numba: plan and data movement without the validating front end -------------------------


def slot_of_row(row_of_slot):
    """The inverse of row_of_slot, as flat slot indices [R]."""
    inverse = torch.empty(row_of_slot.numel(), dtype=torch.long)
    inverse[row_of_slot.reshape(-1).long()] = torch.arange(row_of_slot.numel())
    return inverse


@needs_numba
@pytest.mark.nojit
def test_nojit_plan_permute_combine(gen):
    backend = get_backend("numba")
    ids = random_ids(7, 3, 5, gen)
    counts, offsets, token_of_row, row_of_slot = backend.make_plan(ids, 5).tensors()
    want = get_backend("torch").make_plan(ids, 5).tensors()
    for got, expected in zip((counts, offsets, token_of_row, row_of_slot), want):
        assert got.dtype == torch.int32 and torch.equal(got, expected)
    x = torch.randn(7, 4, generator=gen).to(torch.bfloat16)
    xs = backend.permute(x, token_of_row)
    assert torch.equal(xs, x[token_of_row.long()])
    weights = random_weights(7, 3, gen)
    y = backend.unpermute(xs, row_of_slot, weights)
    assert_close(y, x.double() * weights.double().sum(1, keepdim=True), torch.bfloat16)
    dy = torch.randn(7, 4, generator=gen).to(torch.bfloat16)
    dxs, dweights = backend.unpermute_backward(dy, xs, token_of_row, row_of_slot, weights)
    assert_close(dxs, dy.double()[token_of_row.long()] * weights.double().view(-1)[slot_of_row(row_of_slot)][:, None],
                 torch.bfloat16)
    assert_close(dweights, (dy.double()[:, None, :] * xs.double()[row_of_slot.long()]).sum(-1), torch.bfloat16)


@needs_numba
def test_kernels_refuse_bad_plans(gen):
    backend = get_backend("numba")
    x = torch.randn(4, 3, generator=gen)
    with pytest.raises(ValueError, match="token_of_row"):
        backend.permute(x, torch.tensor([0, 4, 1], dtype=torch.int32))
    with pytest.raises(ValueError, match="row_of_slot"):
        backend.unpermute(x, torch.tensor([[0, -1]], dtype=torch.int32), None)
    with pytest.raises(ValueError, match="exactly once"):
        backend.unpermute_backward(x, x, torch.zeros(4, dtype=torch.int32),
                                   torch.tensor([[0, 0], [1, 2]], dtype=torch.int32), torch.ones(2, 2))
    with pytest.raises(ValueError, match="exactly once"):  # fewer slots than rows: one row never written
        backend.unpermute_backward(x[:1], x[:3], torch.zeros(3, dtype=torch.int32),
                                   torch.tensor([[0, 1]], dtype=torch.int32), torch.ones(1, 2))
    for offsets in ([0, 3, 2], [0, 3, 1, 4]):  # short of the rows; falling, yet from 0 to the rows
        with pytest.raises(ValueError, match="offsets"):
            backend.grouped_mm(x, torch.randn(len(offsets) - 1, 3, 5), torch.tensor(offsets, dtype=torch.int32))
    # The fused decode step checks both index arrays before its kernels read through them,
    # at their limits too: T for a token, R for a row.
    plan = backend.make_plan(torch.tensor([[0], [1]], dtype=torch.int32), 2)
    experts = md.ExpertWeights(torch.randn(2, 4, 3), torch.randn(2, 3, 2))
    for name, bad in (("token_of_row", [0, 5]), ("row_of_slot", [[0], [-1]]),
                      ("token_of_row", [0, 2]), ("row_of_slot", [[0], [2]])):
        bad_plan = replace(plan, **{name: torch.tensor(bad, dtype=torch.int32)})
        with pytest.raises(ValueError, match=name):
            backend.moe_mlp(x[:2], torch.ones(2, 1), bad_plan, experts, False)


# ---- triton: data movement around out-of-range rows ------------------------------------------


@needs_triton
def test_gather_rows_gives_zeros_for_an_index_out_of_range(gen):
    src = torch.full((8, 5), float("nan"), device=DEVICE)[1:7]  # a read past src would show as NaN
    src.copy_(randn(6, 5, gen=gen, device=DEVICE))
    out = kmove.gather_rows(src, torch.tensor([0, -1, 6, 5, 7, 2], dtype=torch.int32, device=DEVICE))
    zero = torch.zeros(5, device=DEVICE)
    assert torch.equal(out, torch.stack([src[0], zero, zero, src[5], zero, src[2]]))


@needs_triton
def test_slot_major_combine_skips_unplaced_slots(gen):
    # moe_mlp's combine of the down GEMM's slot-order output: a slot whose id was bad was never
    # written (NaN here) and must not be read
    row_of_slot = torch.tensor([[0, -1], [2, 1], [-1, 3]], dtype=torch.int32, device=DEVICE)
    slots = randn(6, 5, gen=gen, device=DEVICE)
    slots[1] = slots[4] = float("nan")
    y = kmove.combine(slots, row_of_slot, None, slot_major=True)
    assert_close(y, torch.stack([slots[0], slots[2] + slots[3], slots[5]]).double())


@needs_triton
def test_combine_and_its_backward_skip_unplaced_slots(gen):
    # row -1 (a bad id on CUDA) contributes nothing and is written nowhere
    row_of_slot = torch.tensor([[0, -1], [2, 1], [-1, 3]], dtype=torch.int32, device=DEVICE)
    ys = randn(4, 5, gen=gen, device=DEVICE)
    weights = random_weights(3, 2, gen).to(DEVICE)
    y = kmove.combine(ys, row_of_slot, weights)
    expected = torch.stack([weights[0, 0] * ys[0], weights[1, 0] * ys[2] + weights[1, 1] * ys[1],
                            weights[2, 1] * ys[3]])
    assert_close(y, expected.double())
    dy = randn(3, 5, gen=gen, device=DEVICE)
    dys, dweights = kmove.combine_backward(dy, ys, row_of_slot, weights)
    assert dweights[0, 1] == 0 and dweights[2, 0] == 0
    assert_close(dweights[1, 1], (dy[1] * ys[1]).sum().double())
    assert_close(dys[3], (weights[2, 1] * dy[2]).double())
