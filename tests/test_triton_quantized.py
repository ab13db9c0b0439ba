"""The Triton kernels on quantized experts (kernels/triton/quantized.py): each format's packed codes
and scales read and multiplied out in registers, never a dequantized copy, under the interpreter
in float32 and float16 (bfloat16 in tests/test_gpu.py), against the float64 reference on the
dequantized weights. Shapes are small: the interpreter runs every program in Python."""

from __future__ import annotations

import pytest
import torch

import moe_dispatch as md
from conftest import HAS_TRITON, TRITON_UNAVAILABLE, assert_close, expert_weights, random_ids, random_weights
from moe_dispatch.backends import triton_tuning
from moe_dispatch.formats import FORMATS
from moe_dispatch.formats.quantized import QuantizedWeight
from moe_dispatch.kernels.triton import decode as kdecode
from moe_dispatch.kernels.triton import grouped_gemm as kgemm
from moe_dispatch.kernels.triton import quantized as kquantized
from moe_dispatch.kernels.triton.tiles import TileConfig
from reference import naive_moe_mlp

if not HAS_TRITON:
    pytest.skip(f"the triton backend cannot run here: {TRITON_UNAVAILABLE}", allow_module_level=True)

# (format, quantize options, hidden, intermediate). K (H for GEMM1, I for GEMM2) comes in whole
# groups for the grouped formats; per-channel int8 and fp8 take odd sizes (K tails, fp8's partial
# 128x128 blocks), and H = 96 leaves N tails for 64-wide tiles.
FORMATS_CASES = [
    pytest.param("int8", {}, 33, 19, id="int8-channel"),
    pytest.param("int8", {"group_size": 32}, 96, 32, id="int8-g32"),
    pytest.param("int4", {"group_size": 32}, 96, 32, id="int4-g32"),
    pytest.param("int4", {"group_size": 32, "symmetric": False}, 96, 64, id="int4-g32-zero-points"),
    pytest.param("fp8", {}, 136, 19, id="fp8-partial-blocks"),
    pytest.param("mxfp4", {}, 96, 32, id="mxfp4"),
]
# moe_mlp and its backward take each format once (int4 with zero points, which the fused path must
# carry too); grouped_mm and the exact read-back above take every variant, and
# tests/test_quantized_mlp.py runs the rest through moe_mlp in float32
MLP_CASES = [case for case in FORMATS_CASES if case.id not in ("int8-g32", "int4-g32")]
DTYPES = [pytest.param(torch.float32, id="float32"), pytest.param(torch.float16, id="float16")]
# The interpreter's own 16-wide tiles keep a scale over several K-steps; 64-wide ones hold two
# 32-column groups a step (the scales spread over the tile), and split K in two.
NARROW, WIDE = triton_tuning.INTERPRETER, TileConfig(16, 64, 64, split_k=2)
TILES = [pytest.param(NARROW, id="tiles16"), pytest.param(WIDE, id="tiles64-splitk")]
# each activation dtype with one of them: the interpreter's time is what the suite can spare
DTYPES_AND_TILES = [pytest.param(torch.float32, WIDE, id="float32-tiles64-splitk"),
                    pytest.param(torch.float16, NARROW, id="float16-tiles16")]


@pytest.fixture
def tiles(request, monkeypatch):
    """Every launch under the interpreter takes this config."""
    monkeypatch.setattr(triton_tuning, "INTERPRETER", request.param)
    return request.param


@pytest.fixture
def never_dequantized(monkeypatch):
    """A quantized weight's dequantize raises once armed: the kernels must read the codes. The
    test computes its reference first, then arms it."""
    def arm():
        def refuse(*args, **kwargs):
            raise AssertionError("the triton backend dequantized a weight instead of reading its codes")

        monkeypatch.setattr(QuantizedWeight, "dequantize", refuse)

    return arm


def with_an_empty_expert(tokens, top_k, num_experts, gen):
    """[T, k] ids of distinct experts that never name expert 1."""
    ids = random_ids(tokens, top_k, num_experts - 1, gen)
    return ids + (ids >= 1).long()


def quantized_layer(fmt, options, hidden, inter, dtype, gen, tokens=6, num_experts=5, activation="swiglu"):
    """x, routing weights, ids (expert 1 empty), quantized w_gate_up and w_down, float biases."""
    w_gate_up, w_down, b_gate_up, b_down = expert_weights(num_experts, hidden, inter, gen, torch.float32, activation,
                                                          bias=True)
    q_gate_up, q_down = (md.quantize(w, fmt, dtype=dtype, **options) for w in (w_gate_up, w_down))
    x = torch.randn(tokens, hidden, generator=gen).to(dtype)
    ids = with_an_empty_expert(tokens, 2, num_experts, gen)
    return x, random_weights(tokens, 2, gen), ids, q_gate_up, q_down, b_gate_up.to(dtype), b_down.to(dtype)


def reference(x, weights, ids, q_gate_up, q_down, b_gate_up, b_down, activation="swiglu", interleaved=False):
    return naive_moe_mlp(x, weights, ids, q_gate_up.dequantize(torch.float64), q_down.dequantize(torch.float64),
                         b_gate_up, b_down, activation, interleaved)


# ---- every code of every format, exactly -------------------------------------------------------


def every_code(fmt, num_experts, rows, cols, gen) -> QuantizedWeight:
    """A weight [E, rows, cols] of the format whose codes take every value (fp8's NaNs aside: a
    NaN would spread through the whole product), with random scales (e8m0 bytes up to 252: 6
    times 2^126 overflows float32, and inf times a 0 of the identity is NaN too) and, for int4,
    random zero points."""
    cls = FORMATS[fmt]
    block = {"int8": (1, 32), "int4": (1, 32), "fp8": (128, 128), "mxfp4": (1, 32)}[fmt]
    grid = (num_experts, -(-rows // block[0]), -(-cols // block[1]))
    stored = cols // cls.codes_per_byte
    codes = (torch.randperm(num_experts * rows * stored, generator=gen) % 256).to(torch.uint8)
    codes = codes.view(num_experts, rows, stored)
    if fmt == "fp8":
        codes[(codes & 0x7F) == 0x7F] = 0
    if fmt == "mxfp4":
        scales = torch.randint(0, 253, grid, generator=gen, dtype=torch.uint8)
    else:
        scales = torch.rand(grid, generator=gen) + 0.5
    zeros = torch.randint(0, 16, grid, generator=gen, dtype=torch.uint8) if fmt == "int4" else None
    return cls(codes.view(cls.code_dtype), scales, block, zeros=zeros, dtype=torch.float32)


def assert_read_exactly(q, transposed, never_dequantized):
    """One-hot rows times the weight give its values, which must be dequantize's to the bit:
    rows of the identity times q.mT give q[e].T (the forward's reading), times q give q[e] (the
    input gradient's)."""
    num_experts, rows, cols = q.shape
    expected = q.dequantize(torch.float32)
    expected = torch.cat(list(expected.mT)) if transposed else expected.flatten(0, 1)
    size = cols if transposed else rows
    offsets = torch.arange(num_experts + 1) * size
    never_dequantized()
    out = md.grouped_mm(torch.eye(size).repeat(num_experts, 1), q.mT if transposed else q, offsets, backend="triton")
    assert torch.equal(out, expected)


@pytest.mark.parametrize("tiles", TILES, indirect=True)
@pytest.mark.parametrize("transposed", [True, False], ids=["q.mT", "q"])
@pytest.mark.parametrize("fmt", ["int8", "int4", "fp8", "mxfp4"])
def test_kernels_dequantize_every_code_exactly(fmt, transposed, tiles, gen, never_dequantized):
    """Both readings of every code, tails and fp8's partial blocks included."""
    rows, cols = (136, 40) if fmt == "fp8" else (20, 64)
    assert_read_exactly(every_code(fmt, 2, rows, cols, gen), transposed, never_dequantized)


@pytest.mark.parametrize("transposed", [True, False], ids=["q.mT", "q"])
def test_fp8_through_the_float8_type_is_exact_too(transposed, gen, never_dequantized, monkeypatch):
    """sm_89 and newer convert e4m3 with the GPU's own instruction (FP8_NATIVE), which the
    interpreter emulates: the same values as the bits rebuilt (fp8's NaNs aside, as above)."""
    monkeypatch.setattr(kquantized, "native_fp8", lambda device: True)
    monkeypatch.setattr(triton_tuning, "INTERPRETER", WIDE)
    q = every_code("fp8", 2, 136, 40, gen)
    assert kquantized.weight_operand(q.mT).meta["W_FORMAT"] == kquantized.FP8_NATIVE
    assert_read_exactly(q, transposed, never_dequantized)


# ---- grouped_mm, moe_mlp and the backward --------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt,options,hidden,inter", FORMATS_CASES)
def test_grouped_mm_and_its_input_gradient(fmt, options, hidden, inter, dtype, gen, never_dequantized):
    q = md.quantize(torch.randn(4, 21, hidden, generator=gen) / hidden**0.5, fmt, dtype=dtype, **options)
    xs = torch.randn(10, hidden, generator=gen).to(dtype).requires_grad_()
    offsets = torch.tensor([0, 3, 3, 7, 10])  # expert 1 empty
    dense = q.dequantize(torch.float64)
    bounds = list(zip([0, 3, 3, 7], [3, 3, 7, 10]))
    dy = torch.randn(10, 21, generator=gen).to(dtype)
    expected = torch.cat([xs[s:t].detach().double() @ dense[e].T for e, (s, t) in enumerate(bounds)])
    expected_grad = torch.cat([dy[s:t].double() @ dense[e] for e, (s, t) in enumerate(bounds)])
    never_dequantized()
    out = md.grouped_mm(xs, q.mT, offsets, backend="triton")
    (grad,) = torch.autograd.grad(out, xs, dy)
    assert out.dtype == grad.dtype == dtype
    assert_close(out, expected, dtype)
    assert_close(grad, expected_grad, dtype)


@pytest.mark.parametrize("path", ["planned", "decode"])
@pytest.mark.parametrize("dtype,tiles", DTYPES_AND_TILES, indirect=["tiles"])
@pytest.mark.parametrize("fmt,options,hidden,inter", MLP_CASES)
def test_moe_mlp_forward(fmt, options, hidden, inter, dtype, path, tiles, gen, never_dequantized, monkeypatch):
    """planned: the grouped GEMMs after a plan; decode: the two decode kernels from the ids."""
    x, weights, ids, q_gate_up, q_down, b_gate_up, b_down = quantized_layer(fmt, options, hidden, inter, dtype, gen)
    expected = reference(x, weights, ids, q_gate_up, q_down, b_gate_up, b_down)
    never_dequantized()

    def refuse(*args, **kwargs):
        raise AssertionError(f"the {path} forward took the other path")

    monkeypatch.setattr(*((kdecode, "decode_up") if path == "planned" else (kgemm, "grouped_gemm")), refuse)
    plan = md.make_plan(ids, 5) if path == "planned" else None
    experts = md.ExpertWeights(q_gate_up, q_down, b_gate_up, b_down)
    out = md.moe_mlp(x, weights, ids, experts, plan=plan, backend="triton")
    assert out.dtype == dtype
    assert_close(out, expected, dtype)


@pytest.mark.parametrize("dtype,tiles", DTYPES_AND_TILES, indirect=["tiles"])
@pytest.mark.parametrize("fmt,options,hidden,inter", MLP_CASES)
def test_moe_mlp_backward_reaches_x_the_routing_weights_and_the_biases(fmt, options, hidden, inter, dtype, tiles,
                                                                      gen, never_dequantized):
    x, weights, ids, q_gate_up, q_down, b_gate_up, b_down = quantized_layer(fmt, options, hidden, inter, dtype, gen,
                                                                            tokens=4)
    dy = torch.randn(x.shape, generator=gen)
    leaves = [t.double().requires_grad_() for t in (x, weights, b_gate_up, b_down)]
    expected = torch.autograd.grad(reference(leaves[0], leaves[1], ids, q_gate_up, q_down, *leaves[2:]), leaves, dy)
    never_dequantized()
    leaves = [t.clone().requires_grad_() for t in (x, weights.to(dtype), b_gate_up, b_down)]
    out = md.moe_mlp(leaves[0], leaves[1], ids, md.ExpertWeights(q_gate_up, q_down, *leaves[2:]), backend="triton")
    grads = torch.autograd.grad(out, leaves, dy.to(dtype))
    for name, grad, want in zip(("x", "weights", "b_gate_up", "b_down"), grads, expected):
        assert grad.dtype == dtype, name
        assert_close(grad, want, dtype)


@pytest.mark.parametrize("path", ["planned", "decode"])
def test_gpt_oss_experts_interleaved_clamped_swiglu(path, gen, never_dequantized):
    """gpt-oss's experts as shipped: mxfp4, gate and up rows interleaved (a column step of 2 in
    the GEMM's rows of codes), the clamped SwiGLU, biases."""
    x, weights, ids, q_gate_up, q_down, b_gate_up, b_down = quantized_layer("mxfp4", {}, 64, 32, torch.float32, gen,
                                                                            activation="clamped_swiglu")
    expected = reference(x, weights, ids, q_gate_up, q_down, b_gate_up, b_down, "clamped_swiglu", True)
    never_dequantized()
    experts = md.ExpertWeights(q_gate_up, q_down, b_gate_up, b_down, "clamped_swiglu", interleaved=True)
    plan = md.make_plan(ids, 5) if path == "planned" else None
    assert_close(md.moe_mlp(x, weights, ids, experts, plan=plan, backend="triton"), expected)


def test_a_quantized_gate_up_beside_a_float_down(gen):
    x, weights, ids, q_gate_up, q_down, _, _ = quantized_layer("int4", {"group_size": 32}, 96, 32, torch.float32, gen)
    w_down = q_down.dequantize()
    expected = naive_moe_mlp(x, weights, ids, q_gate_up.dequantize(torch.float64), w_down)
    for plan in (None, md.make_plan(ids, 5)):
        assert_close(md.moe_mlp(x, weights, ids, q_gate_up, w_down, plan=plan, backend="triton"), expected)


def test_tuning_keys_name_the_format(gen, monkeypatch):
    """A format's tiles are tuned apart from the float weights' and from another format's."""
    keys = []
    run = triton_tuning.TUNER.run
    monkeypatch.setattr(triton_tuning.TUNER, "run", lambda key, *args: keys.append(key) or run(key, *args))
    xs, offsets = torch.randn(4, 64, generator=gen), torch.tensor([0, 2, 4])
    w = torch.randn(2, 16, 64, generator=gen)
    for weight in (w, md.quantize(w, "int4", group_size=32), md.quantize(w, "mxfp4")):
        md.grouped_mm(xs, weight.mT, offsets, backend="triton")
    assert len(set(keys)) == 3 and "@int4-1x32|" in keys[1] and "@mxfp4-1x32|" in keys[2], keys


def test_every_format_is_read_natively():
    """`moe-dispatch info` lists the formats a backend's kernels read (native_formats)."""
    from moe_dispatch.backends import get_backend
    from moe_dispatch.formats.quantized import quantized_formats

    assert sorted(get_backend("triton").native_formats) == sorted(quantized_formats())


def test_a_weight_of_other_blocks_is_dequantized_instead(gen):
    """Blocks of 48 columns (no power of two) do not tile: the kernels take the dense values."""
    from moe_dispatch.formats.quantized import Int8Weight

    q = md.quantize(torch.randn(2, 16, 96, generator=gen) / 8, "int8", group_size=32)
    odd = Int8Weight(q.codes, torch.rand(2, 16, 2, generator=gen) + 0.5, (1, 48), dtype=torch.float32)
    assert not kquantized.kernel_reads(odd) and kquantized.kernel_reads(q)
    xs, offsets = torch.randn(5, 96, generator=gen), torch.tensor([0, 2, 5])
    dense = odd.dequantize(torch.float64)
    expected = torch.cat([xs[:2].double() @ dense[0].T, xs[2:].double() @ dense[1].T])
    assert_close(md.grouped_mm(xs, odd.mT, offsets, backend="triton"), expected)
