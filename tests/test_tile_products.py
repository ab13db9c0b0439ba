"""The AMX tile products of moe_dispatch/kernels/numba/tile_products.py, which the blocked
path takes for bfloat16 experts where the CPU has AMX-BF16: against float64 products of the
same bfloat16 numbers, rounded once to bfloat16."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import needs_numba

pytestmark = needs_numba


def tiles():
    from moe_dispatch.kernels.numba import tile_products

    if not tile_products.tiles_available():
        pytest.skip("this CPU (or its kernel) runs no AMX-BF16 tiles")
    return tile_products


def words(t: torch.Tensor) -> np.ndarray:
    return t.view(torch.int32).numpy().view(np.uint32)


def bits(t: torch.Tensor) -> np.ndarray:
    return t.view(torch.int16).numpy().view(np.uint16)


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("width, depth", [(16, 32), (48, 96), (64, 64), (32, 16), (16, 50), (48, 120)])
def test_each_experts_rows_meet_its_weight(width, depth, with_bias, gen):
    """Experts of 0, 1, 5, 16, 17, 33 and 67 rows (tile tails, one and two activation tiles,
    several chunks), weights of one, two and three 16-row tiles, K in whole steps of 32, less
    than one, and whole steps and a rest, a task that starts and stops inside experts."""
    tp = tiles()
    counts = [5, 0, 16, 1, 33, 17, 67]
    bounds = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    num_experts, num_rows = len(counts), int(bounds[-1])
    a = torch.randn(num_rows, depth, generator=gen).bfloat16()
    w = (torch.randn(num_experts, width, depth, generator=gen) / depth ** 0.5).bfloat16()
    bias = torch.randn(num_experts, width, generator=gen).bfloat16() if with_bias else None
    first, last, start, stop = 0, num_experts, 3, num_rows - 2
    out = torch.full((stop - start, width), float("nan"), dtype=torch.bfloat16)
    bias32 = bias.float().numpy() if with_bias else np.zeros((1, width), np.float32)
    packed = np.empty(2 * tp.TILE * -(-depth // tp.DEPTH) * tp.TILE, dtype=np.uint32)  # the least: 32-row chunks
    tp.expert_products(words(a[start:stop]), words(w), bounds, first, last, start, stop, bits(out), bias32,
                       with_bias, packed, tp.tail_config(depth), tp.PRODUCT, 0, False)
    expert = torch.from_numpy(np.repeat(np.arange(num_experts), counts))[start:stop]
    truth = torch.einsum("rk,rnk->rn", a[start:stop].double(), w.double()[expert])
    if with_bias:
        truth += bias.double()[expert]
    torch.testing.assert_close(out.double(), truth.bfloat16().double(), rtol=2 ** -7, atol=1e-6)


def test_a_task_of_some_experts_writes_their_rows_only(gen):
    tp = tiles()
    depth, width = 32, 32
    bounds = np.array([0, 4, 9, 20], dtype=np.int32)
    a = torch.randn(20, depth, generator=gen).bfloat16()
    w = torch.randn(3, width, depth, generator=gen).bfloat16()
    out = torch.full((20, width), float("nan"), dtype=torch.bfloat16)
    tp.expert_products(words(a), words(w), bounds, 1, 2, 0, 20, bits(out), np.zeros((1, width), np.float32),
                       False, tp.scratch(depth), tp.tail_config(depth), tp.PRODUCT, 0, False)
    assert out[:4].isnan().all() and out[9:].isnan().all()
    torch.testing.assert_close(out[4:9].double(), (a[4:9].double() @ w[1].double().T).bfloat16().double(),
                               rtol=2 ** -7, atol=1e-6)


def test_the_blocked_path_on_tiles_matches_the_reference(gen):
    """moe_mlp with enough rows per expert for the blocked path, bfloat16 with biases."""
    import moe_dispatch as md

    tiles()
    tokens, hidden, inter, num_experts = 128, 256, 256, 4  # 64 rows per expert: past the fused kernels' 51
    x = torch.randn(tokens, hidden, generator=gen).bfloat16()
    w_gate_up = (torch.randn(num_experts, 2 * inter, hidden, generator=gen) / hidden ** 0.5).bfloat16()
    w_down = (torch.randn(num_experts, hidden, inter, generator=gen) / inter ** 0.5).bfloat16()
    b_gate_up = torch.randn(num_experts, 2 * inter, generator=gen).bfloat16()
    b_down = torch.randn(num_experts, hidden, generator=gen).bfloat16()
    ids = torch.randint(0, num_experts, (tokens, 2), generator=gen)
    weights = torch.rand(tokens, 2, generator=gen)
    args = (w_gate_up, w_down)
    out = md.moe_mlp(x, weights, ids, *args, b_gate_up=b_gate_up, b_down=b_down, backend="numba")
    ref = md.moe_mlp(x.double(), weights.double(), ids, *(w.double() for w in args), b_gate_up=b_gate_up.double(),
                     b_down=b_down.double(), backend="torch")
    torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=2e-2)


def test_grouped_mm_on_tiles_matches_the_reference(gen):
    """Groups of 0 to 150 rows, the weight passed as nn.Linear storage transposed, which the
    tiles read in place."""
    import moe_dispatch as md

    tiles()
    depth, width = 512, 1040  # enough multiply-adds per row for the blocked path from 20 rows
    counts = torch.tensor([30, 0, 70, 3, 150])
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    a = torch.randn(int(counts.sum()), depth, generator=gen).bfloat16()
    w = (torch.randn(len(counts), width, depth, generator=gen) / depth ** 0.5).bfloat16().transpose(1, 2)
    out = md.grouped_mm(a, w, offsets, backend="numba")
    ref = md.grouped_mm(a.double(), w.double(), offsets, backend="torch")
    torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=2e-2)


def routed_rows(depth: int, gen) -> tuple[np.ndarray, torch.Tensor]:
    """The bounds of four experts of 3, 40, 0 and 17 rows (one and two activation tiles, a
    tail, an empty expert), and their rows [60, depth] in bfloat16."""
    bounds = np.concatenate([[0], np.cumsum([3, 40, 0, 17])]).astype(np.int32)
    return bounds, torch.randn(int(bounds[-1]), depth, generator=gen).bfloat16()


ACTIVATED = [("swiglu", False), ("swiglu", True), ("clamped_swiglu", True), ("clamped_swiglu", False)]


@pytest.mark.parametrize("name, interleaved", ACTIVATED)
def test_the_activation_epilogue_computes_the_gated_activation(name, interleaved, gen):
    """GEMM1 with its activation applied in the epilogue: the activation, in float64, of the
    kernel's own product plus bias rounded to bfloat16 (the GEMM1 output, checked above),
    rounded once more; within one rounding (the float32 exp's error may tip one)."""
    from moe_dispatch import activations
    from moe_dispatch.kernels.numba.activations import fused

    tp = tiles()
    depth, inter = 96, 48
    bounds, a = routed_rows(depth, gen)
    num_rows, num_experts = a.shape[0], len(bounds) - 1
    w = (3 * torch.randn(num_experts, 2 * inter, depth, generator=gen) / depth ** 0.5).bfloat16()
    bias = torch.randn(num_experts, 2 * inter, generator=gen).bfloat16()
    act = activations.get(name)
    h, out = torch.empty(num_rows, 2 * inter, dtype=torch.bfloat16), torch.full((num_rows, inter), float("nan"),
                                                                               dtype=torch.bfloat16)
    for result, fn in ((h, tp.PRODUCT), (out, fused(act, activations.gate_up_columns(act, interleaved, inter)))):
        tp.expert_products(words(a), words(w), bounds, 0, num_experts, 0, num_rows, bits(result),
                           bias.float().numpy(), True, tp.scratch(depth), tp.tail_config(depth), fn, inter, interleaved)
    truth = activations.activate(h.double(), act, interleaved).bfloat16().double()
    torch.testing.assert_close(out.double(), truth, rtol=2 ** -8, atol=0)


QUANTIZED = [
    pytest.param("int8", {}, id="int8-channel"),
    pytest.param("int8", dict(group_size=64), id="int8-g64"),
    pytest.param("int4", dict(group_size=32, symmetric=False), id="int4-g32-zero-points"),
    pytest.param("int4", dict(group_size=128), id="int4-g128"),
    pytest.param("fp8", {}, id="fp8"),
    pytest.param("mxfp4", {}, id="mxfp4"),
]


@pytest.mark.parametrize("fmt, options", QUANTIZED)
def test_quantized_weights_multiply_as_their_dequantized_bfloat16(fmt, options, gen):
    """A quantized weight's slices are dequantized to bfloat16 as the tiles reach them: the
    products, plain and activated, are bit for bit those of the dequantized weight in place.
    K = 384: a whole slice and a shorter one; 192 rows: fp8's 128-row scale blocks, gate and
    up rows in different ones."""
    import moe_dispatch as md
    from moe_dispatch import activations
    from moe_dispatch.backends.numba_backend import quantized_rows
    from moe_dispatch.kernels.numba.activations import fused

    tp = tiles()
    depth, inter = 384, 96
    bounds, a = routed_rows(depth, gen)
    num_rows, num_experts = a.shape[0], len(bounds) - 1
    q = md.quantize(torch.randn(num_experts, 2 * inter, depth, generator=gen) / depth ** 0.5, fmt,
                    dtype=torch.bfloat16, **options)
    assert tp.fits_quantized(depth, 2 * inter, q.block[1])
    bias = torch.randn(num_experts, 2 * inter, generator=gen).float().numpy()
    dense = words(q.dequantize(torch.bfloat16))
    for name, interleaved in ((None, False), ("swiglu", False), ("clamped_swiglu", True)):
        act = name and activations.get(name)
        fn = fused(act, activations.gate_up_columns(act, interleaved, inter)) if act else tp.PRODUCT
        width = inter if act else 2 * inter
        out, truth = (torch.full((num_rows, width), float("nan"), dtype=torch.bfloat16) for _ in range(2))
        for w, result in ((quantized_rows(q), out), (dense, truth)):
            tp.expert_products(words(a), w, bounds, 0, num_experts, 0, num_rows, bits(result), bias, True,
                               tp.scratch(depth), tp.tail_config(depth), fn, inter, interleaved)
        assert torch.equal(out, truth), name


@pytest.mark.parametrize("fmt, options", QUANTIZED[2:])
@pytest.mark.parametrize("grad", [False, True], ids=["inference", "autograd"])
def test_quantized_experts_on_tiles_match_their_dequantized_weights(fmt, options, grad, gen, monkeypatch):
    """The blocked path multiplies quantized experts on tiles, never dequantizing a whole
    expert (SwiGLU in GEMM1's epilogue at inference; GEMM1's output kept for autograd): the
    answer is the reference's on the dequantized weights, and so is the gradient of x."""
    import moe_dispatch as md
    import moe_dispatch.backends.numba_backend as nb
    from conftest import large_groups_everywhere

    tiles()
    large_groups_everywhere(monkeypatch)
    monkeypatch.setattr(nb.ExpertMatrices, "dequantized", None)  # a whole expert dequantized would fail
    tokens, hidden, inter, num_experts = 40, 384, 128, 4
    q1, q2 = (md.quantize(torch.randn(num_experts, n, k, generator=gen) / k ** 0.5, fmt, dtype=torch.bfloat16,
                          **options)
              for n, k in ((2 * inter, hidden), (hidden, inter)))
    x = torch.randn(tokens, hidden, generator=gen).bfloat16().requires_grad_(grad)
    ids = torch.randint(0, num_experts, (tokens, 2), generator=gen)
    weights = torch.rand(tokens, 2, generator=gen)
    out = md.moe_mlp(x, weights, ids, q1, q2, backend="numba")
    x64 = x.detach().double().requires_grad_(grad)
    ref = md.moe_mlp(x64, weights.double(), ids, q1.dequantize(torch.bfloat16).double(),
                     q2.dequantize(torch.bfloat16).double(), backend="torch")
    torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=2e-2)
    if grad:
        dy = torch.randn(tokens, hidden, generator=gen)
        out.backward(dy.bfloat16())
        ref.backward(dy.bfloat16().double())
        torch.testing.assert_close(x.grad.double(), x64.grad, rtol=2e-2, atol=2e-2)
