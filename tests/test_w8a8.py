"""fp8 weights at precision "w8a8" (DeepSeek-V3's recipe): the activations quantized per row per
128 columns to e4m3 too. The torch reference is the definition (formats.quantized.fp8_activations,
backends.base.w8a8_mm); the numba backend computes it with the reference's operations; the
Triton kernels (under the interpreter, float32 and float16) must match it to float32 summation
order, and its error against the unquantized float64 product is measured here. Shapes are tiny:
the interpreter runs every program in Python."""

from __future__ import annotations

import pytest
import torch

import moe_dispatch as md
from conftest import assert_close, expert_weights, needs_numba, needs_triton, random_ids, random_weights
from moe_dispatch.backends import triton_tuning
from moe_dispatch.formats import flatten, unflatten
from moe_dispatch.formats.quantized import fp8_activation_values, fp8_activations
from moe_dispatch.kernels.triton.tiles import TileConfig
from reference import naive_moe_mlp

DTYPES = [pytest.param(torch.float32, id="float32"), pytest.param(torch.float16, id="float16")]
# Triton against the reference's w8a8: the same quantized activations and products, summed in
# another order (float32), then rounded once to the dtype
SAME_DEFINITION = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-3, 1e-3)}
# The w8a8 result against the float64 result of the unquantized operands, relative (norm of the
# error over norm of the result): e4m3 keeps 3 mantissa bits of each operand. Measured over six
# seeds: grouped_mm on Gaussian activations and weights 3.6-3.8% (fp8 weights alone 2.6-2.7%),
# moe_mlp (SwiGLU, uniform weights as nn.Linear's) 5.6-7.1% (fp8 weights alone 4.4-5.5%).
GEMM_ERROR, MLP_ERROR = 0.05, 0.08
# moe_mlp in float16/bfloat16: the fused GEMM1 computes the activation from its float32 sums, the
# reference from h rounded to the dtype (as for weight-only weights); an activation that differs
# by one ulp may round to the next e4m3 value, or move its group's scale, in GEMM2's input. The
# relative error against the reference this leaves (float16: 0.07-0.8% over four seeds) is
# bounded here; tests/test_gpu.py allows bfloat16's 8 times coarser rounding 5%.
ACT_ROUNDING = {torch.float16: 0.02, torch.bfloat16: 0.05}
# The interpreter's 16-wide tiles take eight K-steps per 128-column block; 64-wide ones two, with
# K split in two (partials of whole blocks summed by the reduction kernel)
TILES = [pytest.param(triton_tuning.INTERPRETER, id="tiles16"),
         pytest.param(TileConfig(16, 64, 64, split_k=2), id="tiles64-splitk")]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.detach().double() - expected).norm() / expected.norm())


def grouped_case(dtype, gen, transposed_out=136, k_dim=200):
    """(xs [10, K], float weight w [4, N, K], its w8a8 fp8 q, offsets with expert 1 empty): K = 200
    is a whole 128-column group and a partial one, N = 136 a whole 128-row block and a partial one."""
    w = torch.randn(4, transposed_out, k_dim, generator=gen) / k_dim**0.5
    q = md.quantize(w, "fp8", dtype=dtype, precision="w8a8")
    xs = torch.randn(10, k_dim, generator=gen).to(dtype)
    return xs, w, q, torch.tensor([0, 3, 3, 7, 10])


def per_expert(xs, w, offsets) -> torch.Tensor:
    """float64 xs[rows of e] @ w[e].T."""
    bounds = offsets.tolist()
    return torch.cat([xs[s:t].double() @ w[e].double().T for e, (s, t) in enumerate(zip(bounds[:-1], bounds[1:]))])


# ---- the option --------------------------------------------------------------------------------


def test_precision_is_part_of_the_weight(gen):
    """It survives indexing, .to, flatten/unflatten (what torch.compile and the custom ops carry)
    and a layer's quantize_; only fp8 in 128-column blocks takes it; bad values are named."""
    w = torch.randn(3, 64, 256, generator=gen)
    q = md.quantize(w, "fp8", precision="w8a8")
    assert q.precision == "w8a8" and "precision='w8a8'" in repr(q)
    assert q[1].precision == q.to(torch.float16).precision == unflatten(*flatten(q)).precision == "w8a8"
    assert q.to(precision="weight-only").precision == md.quantize(w, "fp8").precision == "weight-only"
    imported = md.QuantizedWeight.from_fp8_blocks(q.codes, q.scales, precision="w8a8")
    assert imported.precision == "w8a8"
    with pytest.raises(ValueError, match="precision must be one of"):
        md.quantize(w, "fp8", precision="w8a16")
    with pytest.raises(ValueError, match="precision='w8a8' takes fp8"):
        md.quantize(w, "int8", precision="w8a8")
    layer = md.MoE(256, 128, 4, 2).quantize_("fp8", precision="w8a8")
    assert layer.experts.w_gate_up.precision == layer.experts.w_down.precision == "w8a8"
    assert layer.experts.quantizes_activations


def test_activations_quantize_per_row_per_128_columns(gen):
    """Scales are each group's largest magnitude / 448 (1 for an all-zero group); the codes the
    nearest e4m3 value of x / scale; a partial last group has its own scale."""
    x = torch.randn(3, 300, generator=gen)
    x[1, 128:256] = 0
    codes, scales = fp8_activations(x)
    assert codes.dtype == torch.float8_e4m3fn and scales.shape == (3, 3)
    groups = [x[:, :128], x[:, 128:256], x[:, 256:]]
    want = torch.stack([g.abs().amax(1) / 448 for g in groups], 1)
    want[1, 1] = 1.0
    assert torch.equal(scales, want)
    assert torch.equal(codes.float().abs().amax(1), torch.full((3,), 448.0))
    expected = torch.cat([(g / want[:, [i]]).to(torch.float8_e4m3fn).float() * want[:, [i]]
                          for i, g in enumerate(groups)], 1)
    assert torch.equal(fp8_activation_values(x), expected)


def test_the_reference_is_exact_where_nothing_rounds(gen):
    """Activations already e4m3 values times a power of two per group (each group's largest 448
    times it) quantize exactly: the w8a8 product is then the float product with the fp8 weight."""
    signs = (torch.rand(6, 256, generator=gen) < 0.5).byte() << 7
    codes = torch.randint(0, 126, (6, 256), generator=gen, dtype=torch.uint8) | signs
    x = codes.view(torch.float8_e4m3fn).float()
    x[:, 0], x[:, 128] = 448.0, -448.0
    x = x * 2.0 ** torch.randint(-8, 8, (6, 1), generator=gen).float()
    q = md.quantize(torch.randn(2, 24, 256, generator=gen), "fp8", dtype=torch.float32, precision="w8a8")
    offsets = torch.tensor([0, 4, 6])
    out = md.grouped_mm(x, q.mT, offsets, backend="torch")
    assert_close(out, per_expert(x, q.dequantize(torch.float64), offsets), torch.float32)


@pytest.mark.parametrize("backend", ["torch", pytest.param("numba", marks=needs_numba)])
def test_moe_mlp_w8a8_on_the_cpu_backends(backend, gen):
    """numba has no w8a8 kernel: it computes the reference's definition (planned and decode
    sizes alike); the error against the unquantized layer is w8a8's."""
    x, weights, ids, experts, w_gate_up, w_down = mlp_case(torch.float32, gen)
    out = md.moe_mlp(x, weights, ids, experts, backend=backend)
    assert_close(out, md.moe_mlp(x, weights, ids, experts, backend="torch"), torch.float32)
    assert relative_error(out, naive_moe_mlp(x, weights, ids, w_gate_up, w_down)) < MLP_ERROR


def mlp_case(dtype, gen):
    """x [6, 136], routing weights, ids (expert 1 empty), w8a8 experts (H = 136, I = 40: K tails
    in both GEMMs, N tails in both), and the float weights they were quantized from."""
    w_gate_up, w_down, _, _ = expert_weights(5, 136, 40, gen, torch.float32)
    experts = md.ExpertWeights(*(md.quantize(w, "fp8", dtype=dtype, precision="w8a8") for w in (w_gate_up, w_down)))
    x = torch.randn(6, 136, generator=gen).to(dtype)
    ids = random_ids(6, 2, 4, gen)
    ids = ids + (ids >= 1).long()
    return x, random_weights(6, 2, gen), ids, experts, w_gate_up, w_down


# ---- the Triton kernels (interpreter) ------------------------------------------------------------


@pytest.fixture
def tiles(request, monkeypatch):
    monkeypatch.setattr(triton_tuning, "INTERPRETER", request.param)
    return request.param


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_triton_quantizes_activations_to_the_references_bytes(dtype, gen):
    """Every finite e4m3 value, the midpoints between neighbours (ties to even), values just off
    them, all-zero groups, a K tail: the codes and scales are the reference's to the bit."""
    from moe_dispatch.kernels.triton.fp8_rows import quantize_rows

    values = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    values = values[values.isfinite()].sort().values
    grid = torch.cat([values, (values[:-1] + values[1:]) / 2, values * 1.01, values * 0.99]).clamp(-448, 448)
    x = torch.cat([grid, torch.randn(-grid.numel() % 100, generator=gen)]).view(-1, 100)
    x = torch.cat([x, x], 1)  # K = 200: a whole group and a partial one
    x[:, 0] = 448.0  # the scale 1 in the first group, so the grid's values are what is rounded
    x[2, 128:] = 0.0
    x = x.to(dtype)
    quantized = quantize_rows(x)
    codes, scales = fp8_activations(x)
    assert torch.equal(quantized.codes, codes.view(torch.uint8)) and torch.equal(quantized.scales, scales)
    assert quantized.dtype == dtype


@needs_triton
@pytest.mark.parametrize("tiles", TILES, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_grouped_mm_w8a8(dtype, tiles, gen):
    """Against the reference's w8a8 (tight) and the unquantized float64 product (GEMM_ERROR); the
    input's gradient is the weight-only product's (the straight-through rounding)."""
    xs, w, q, offsets = grouped_case(dtype, gen)
    xs.requires_grad_()
    expected = md.grouped_mm(xs.detach(), q.mT, offsets, backend="torch")
    out = md.grouped_mm(xs, q.mT, offsets, backend="triton")
    assert out.dtype == dtype
    torch.testing.assert_close(out, expected, rtol=SAME_DEFINITION[dtype][0], atol=SAME_DEFINITION[dtype][1])
    assert relative_error(out, per_expert(xs.detach(), w, offsets)) < GEMM_ERROR
    dy = torch.randn(out.shape, generator=gen).to(dtype)
    (grad,) = torch.autograd.grad(out, xs, dy)
    assert_close(grad, per_expert(dy, q.dequantize(torch.float64).mT, offsets), dtype)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_moe_mlp_w8a8(dtype, gen, monkeypatch):
    """Planned and from the ids (the decode kernels decline w8a8: the planned GEMMs run); both
    GEMMs quantize their inputs (x, then the activation's output)."""
    from moe_dispatch.kernels.triton import decode as kdecode

    x, weights, ids, experts, w_gate_up, w_down = mlp_case(dtype, gen)
    expected = md.moe_mlp(x, weights, ids, experts, backend="torch")
    monkeypatch.setattr(kdecode, "decode_up", lambda *args: pytest.fail("the decode kernels ran w8a8 experts"))
    for plan in (None, md.make_plan(ids, 5)):
        out = md.moe_mlp(x, weights, ids, experts, plan=plan, backend="triton")
        assert out.dtype == dtype
        if dtype == torch.float32:
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        else:
            assert relative_error(out, expected.double()) < ACT_ROUNDING[dtype]
    assert relative_error(out, naive_moe_mlp(x, weights, ids, w_gate_up, w_down)) < MLP_ERROR


@needs_triton
def test_triton_w8a8_is_tuned_apart_and_refuses_k_steps_across_blocks(gen, monkeypatch):
    from moe_dispatch.kernels.triton import grouped_gemm as kgemm
    from moe_dispatch.kernels.triton.fp8_rows import quantize_rows

    keys = []
    run = triton_tuning.TUNER.run
    monkeypatch.setattr(triton_tuning.TUNER, "run", lambda key, *args: keys.append(key) or run(key, *args))
    xs, _, q, offsets = grouped_case(torch.float32, gen, transposed_out=16, k_dim=128)
    md.grouped_mm(xs, q.mT, offsets, backend="triton")
    md.grouped_mm(xs, q.to(precision="weight-only").mT, offsets, backend="triton")
    assert len(set(keys)) == 2 and "@w8a8|" in keys[0], keys
    with pytest.raises(ValueError, match="divide 128"):
        kgemm.grouped_gemm(quantize_rows(xs), q.mT, offsets, TileConfig(16, 16, 256))
    with pytest.raises(ValueError, match="w8a8"):
        kgemm.grouped_gemm(quantize_rows(xs), md.quantize(q.dequantize(), "int8").mT, offsets,
                           triton_tuning.INTERPRETER)
