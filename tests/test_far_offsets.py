"""Inputs whose rows (or experts) lie 2^31 elements and more from their first element.

A kernel that forms such an offset in int32 (row * stride, expert * stride) wraps around to a
negative one there. Each view below keeps the 2^31 elements before its first one allocated and
never written, so a wrapped offset reads zeros: the test fails on a wrong answer rather than a
segfault. The storage is virtual (10-11 GiB of address space per tensor, in float16, the
narrowest dtype); only the pages the values lie on are ever backed by memory.

The buffers a backend allocates itself (slot-order outputs, the saved pre-activation h, a
contiguous dy) pass 2^31 elements only when T * k * H does; the Triton launchers take them with
any row stride, so the last test hands them far views too. What stays out of reach is where
kernels store into their own outputs.
"""

import pytest
import torch

import moe_dispatch as md
from conftest import CPU_BACKENDS, assert_close, expert_weights, randn, random_weights
from reference import naive_grouped_mm, naive_moe_mlp, naive_permute, naive_plan, naive_unpermute

NUM = 4  # tokens, and experts
TOP_K = 2
HIDDEN, INTER = 16, 8


def far_copy(values: torch.Tensor) -> torch.Tensor:
    """values (float16, an even number of slices along dim 0) again, as a view whose second
    half of slices starts 2^31 elements or more after its first element."""
    stride = 2**31 // (values.shape[0] // 2)
    inner = values[0].contiguous().stride()
    size = 2**31 + (values.shape[0] - 1) * stride + values[0].numel()
    try:
        storage = torch.empty(size, dtype=values.dtype)
    except RuntimeError:  # the OS (or a ulimit -v) will not overcommit this much address space
        pytest.skip(f"this machine will not reserve {size * values.element_size() / 2**30:.0f} GiB of address space")
    view = storage.as_strided(values.shape, (stride, *inner), storage_offset=2**31)
    return view.copy_(values)


@pytest.fixture
def inputs(gen):
    """x [T, H] with far rows, and w_gate_up, w_down with far experts (E = T = NUM)."""
    # near and far tokens to near and far experts; int32, so that a kernel's expert offsets are
    # int64 only where it makes them so
    ids = torch.tensor([[0, 1], [1, 2], [3, 0], [2, 3]], dtype=torch.int32)
    x = far_copy(randn(NUM, HIDDEN, gen=gen, dtype=torch.float16))
    w_gate_up, w_down, _, _ = expert_weights(NUM, HIDDEN, INTER, gen, torch.float16)
    w_gate_up, w_down = far_copy(w_gate_up), far_copy(w_down)
    return x, random_weights(NUM, TOP_K, gen), ids, w_gate_up, w_down


def test_permute_grouped_mm_and_unpermute_reach_far_rows(backend, inputs):
    x, weights, ids, w_gate_up, _ = inputs
    _, offsets, token_of_row, row_of_slot = naive_plan(ids, NUM)
    plan = md.make_plan(ids, NUM, backend=backend)
    xs = md.permute(x, plan, backend=backend)
    assert torch.equal(xs, naive_permute(x, token_of_row))
    w = w_gate_up.transpose(1, 2)  # [E, K, N], the experts still far apart
    assert_close(md.grouped_mm(xs, w, plan.offsets, backend=backend), naive_grouped_mm(xs, w, offsets))
    far_xs = far_copy(xs)  # rows T*k/2 onwards far
    assert_close(md.unpermute(far_xs, plan, weights, backend=backend), naive_unpermute(xs, row_of_slot, weights),
                 torch.float16)


@pytest.mark.parametrize("path", ["plan", "decode"])
def test_moe_mlp_reaches_far_rows_and_experts(backend, inputs, path):
    """With a plan, the grouped GEMMs; without one, few tokens take the decode kernels (triton)."""
    x, weights, ids, w_gate_up, w_down = inputs
    plan = md.make_plan(ids, NUM, backend=backend) if path == "plan" else None
    assert_close(md.moe_mlp(x, weights, ids, w_gate_up, w_down, plan=plan, backend=backend),
                 naive_moe_mlp(x, weights, ids, w_gate_up, w_down))


def test_moe_mlp_gradients_reach_far_rows_and_experts(backend, inputs):
    """dx and the activation's gradient through far experts; the weight gradients gather far rows of x."""
    x, weights, ids, w_gate_up, w_down = inputs
    leaves = [t.requires_grad_() for t in (x, w_gate_up, w_down)]
    dy = torch.randn(NUM, HIDDEN, generator=torch.Generator().manual_seed(3)).half()
    grads = torch.autograd.grad(md.moe_mlp(x, weights, ids, w_gate_up, w_down, backend=backend), leaves, dy)
    ref_grads = torch.autograd.grad(naive_moe_mlp(x, weights, ids, w_gate_up, w_down), leaves, dy.double())
    for g, ref in zip(grads, ref_grads):
        assert_close(g, ref, torch.float16)


@pytest.mark.skipif("triton" not in CPU_BACKENDS, reason="needs the Triton interpreter")
def test_triton_launchers_reach_far_rows_of_the_backends_own_buffers(inputs):
    """Each launch on far views of its inputs gives exactly what it gives on compact copies."""
    from moe_dispatch.activations import ACTIVATIONS
    from moe_dispatch.backends.triton_tuning import INTERPRETER
    from moe_dispatch.kernels.triton import grouped_gemm, permute, wgrad

    _, weights, ids, _, w_down = inputs
    plan = md.make_plan(ids, NUM, backend="triton")
    _, weight_of_row = permute.invert_rows(plan.row_of_slot, weights)
    gen = torch.Generator().manual_seed(5)
    slots, h, dy = (torch.randn(*shape, generator=gen).half()
                    for shape in ((NUM * TOP_K, HIDDEN), (NUM * TOP_K, 2 * INTER), (NUM, HIDDEN)))

    def combine(slots):
        return permute.combine(slots, plan.row_of_slot, None, slot_major=True)

    def act_backward(dy, h):
        return grouped_gemm.grouped_gemm_act_backward(dy, plan.token_of_row, w_down, None, plan.offsets, h,
                                                      weight_of_row, plan.row_of_slot, ACTIVATIONS["swiglu"],
                                                      (1, INTER), INTERPRETER)

    def weight_gradient(dy, act):
        return wgrad.grouped_wgrad(dy, act, plan.offsets, NUM, INTERPRETER, a_rows=plan.token_of_row,
                                   a_scale=weight_of_row)

    assert torch.equal(combine(far_copy(slots)), combine(slots))
    near = act_backward(dy, h)
    for far_result, near_result in zip(act_backward(far_copy(dy), far_copy(h)), near):
        assert torch.equal(far_result, near_result)
    act = near[1]
    assert torch.equal(weight_gradient(far_copy(dy), act), weight_gradient(dy, act))
