"""Quantized expert formats: quantize -> dequantize error bounds, what each stores, and the
checkpoint importers. Each importer test packs known integer codes by the checkpoint's own
documented rule (written here, independently of moe_dispatch) and checks the imported weight
dequantizes to exactly scale * (code - zero); gpt-oss's MXFP4 and DeepSeek-V3's FP8 tensors
are checked bit for bit against transformers' own dequantization."""

from __future__ import annotations

import math

import pytest
import torch

import moe_dispatch as md
from moe_dispatch import QuantizedWeight
from moe_dispatch.formats import flatten, unflatten

E, N, K = 3, 24, 256
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # OCP MX e2m1 magnitudes, by code & 7
BITS_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}

# (format, group_size, symmetric): every layout quantize makes
LAYOUTS = [
    pytest.param("int8", None, True, id="int8-channel"),
    *(pytest.param("int8", g, True, id=f"int8-g{g}") for g in (32, 64, 128)),
    *(pytest.param("int4", g, True, id=f"int4-g{g}") for g in (32, 64, 128)),
    pytest.param("int4", 32, False, id="int4-g32-zeros"),
    pytest.param("int4", 128, False, id="int4-g128-zeros"),
    pytest.param("fp8", None, True, id="fp8"),
    pytest.param("mxfp4", None, True, id="mxfp4"),
]


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bits (a -0.0 for a +0.0 fails)."""
    same_kind = a.dtype == b.dtype and a.shape == b.shape
    return same_kind and torch.equal(a.view(BITS_VIEW[a.dtype]), b.view(BITS_VIEW[b.dtype]))


def per_element(blocks: torch.Tensor, block: tuple[int, int], shape) -> torch.Tensor:
    """[E, ceil(N/r), ceil(K/c)] -> [E, N, K], each element its block's value."""
    rows, columns = block
    return blocks.repeat_interleave(rows, 1)[:, : shape[1]].repeat_interleave(columns, 2)[:, :, : shape[2]]


def block_reduce(w: torch.Tensor, block: tuple[int, int], op) -> torch.Tensor:
    """op (amax/amin) over each block of w [E, N, K], partial edge blocks included."""
    rows, columns = block
    out = torch.empty(w.shape[0], math.ceil(w.shape[1] / rows), math.ceil(w.shape[2] / columns))
    for i in range(out.shape[1]):
        for j in range(out.shape[2]):
            out[:, i, j] = op(w[:, i * rows : (i + 1) * rows, j * columns : (j + 1) * columns].flatten(1), dim=1)
    return out


def sample(gen, shape=(E, N, K), zero_block=True) -> torch.Tensor:
    """Weights of mixed magnitudes by row (a spread of scales), one all-zero block."""
    w = torch.randn(shape, generator=gen) * torch.exp(torch.randn(shape[0], shape[1], 1, generator=gen))
    if zero_block:
        w[0, :2, :32] = 0
    return w


# ---- quantize -> dequantize -------------------------------------------------------------------


@pytest.mark.parametrize("fmt, group_size, symmetric", LAYOUTS)
def test_error_within_half_a_step(gen, fmt, group_size, symmetric):
    """Round to nearest: each element within half its grid's spacing, on a grid no coarser than
    the block's range needs (a needlessly coarse scale fails the second half)."""
    shape = (E, 200, 300) if fmt == "fp8" else (E, N, K)  # fp8: partial 128x128 edge blocks
    w = sample(gen, shape)
    q = md.quantize(w, fmt, group_size=group_size, symmetric=symmetric, dtype=torch.float32)
    error = (q.dequantize(torch.float32) - w).abs()
    step = per_element(q.float_scales(), q.block, shape)
    amax = block_reduce(w.abs(), q.block, torch.amax)
    live = amax > 0
    tiny = 1 + 1e-6  # float32 rounding of amax / levels
    ulps = w.abs() * 2.0**-21  # float32 rounding of w - dequantized
    if fmt in ("int8", "int4"):
        if fmt == "int8":
            levels = 2 * amax / 254  # [-127, 127]
        elif symmetric:
            levels = 2 * amax / 15  # [-8, 7], the top clipped by at most half a step
        else:
            high, low = block_reduce(w, q.block, torch.amax), block_reduce(w, q.block, torch.amin)
            levels = (high.clamp(min=0) - low.clamp(max=0)) / 15  # the range always holds 0
        assert (q.float_scales()[live] <= levels[live] * tiny).all()
        assert (error <= step / 2 + ulps).all()
    elif fmt == "fp8":
        assert (q.float_scales()[live] <= amax[live] / 448 * tiny).all()
        # e4m3: 3 mantissa bits, so half a spacing is at most |v| / 16; subnormals step by 2^-9
        v = (w / step).abs()
        assert (error <= step * torch.maximum(v / 16, torch.full_like(v, 2.0**-10)) + ulps).all()
    else:
        # the shared exponent puts the block's largest magnitude in [4, 8): e2m1's top binade
        ratio = amax[live] / q.float_scales()[live]
        assert ((ratio >= 4) & (ratio < 8)).all()
        v = (w / step).abs()
        half_spacing = torch.where(v < 2, 0.25, torch.where(v < 4, 0.5, 1.0))
        bound = torch.where(v > 6, v - 6, half_spacing)  # above 6 clips to 6
        assert (error <= step * bound + ulps).all()
    # the all-zero block stays exactly zero, on finite scales
    assert (q.dequantize(torch.float32)[0, :2, :32] == 0).all()
    assert torch.isfinite(q.float_scales()).all() and (q.float_scales() > 0).all()


def test_mxfp4_picks_the_nearest_e2m1_value(gen):
    w = sample(gen)
    q = md.quantize(w, "mxfp4", dtype=torch.float32)
    scaled = w / per_element(q.float_scales(), q.block, w.shape)
    grid = torch.tensor(E2M1)
    nearest = grid[(scaled.abs().unsqueeze(-1) - grid).abs().argmin(-1)]
    got = (q.dequantize(torch.float32) / per_element(q.float_scales(), q.block, w.shape)).abs()
    distance = (scaled.abs() - got).abs()
    assert torch.equal(distance, (scaled.abs() - nearest).abs())  # ties may go either way


STORAGE = [
    # (format, group_size, symmetric, codes dtype, codes' last dim, scales dtype, block, zeros, bits per weight)
    pytest.param("int8", None, True, torch.int8, K, torch.float32, (1, K), False, 8 + 32 / K, id="int8-channel"),
    pytest.param("int8", 64, True, torch.int8, K, torch.float32, (1, 64), False, 8 + 32 / 64, id="int8-g64"),
    pytest.param("int4", 128, True, torch.uint8, K // 2, torch.float32, (1, 128), False, 4 + 32 / 128,
                 id="int4-g128"),
    pytest.param("int4", 32, False, torch.uint8, K // 2, torch.float32, (1, 32), True, 4 + 40 / 32,
                 id="int4-g32-zeros"),
    pytest.param("fp8", None, True, torch.float8_e4m3fn, K, torch.float32, (128, 128), False,
                 8 + 32 * 1 * 2 / (N * K), id="fp8"),
    pytest.param("mxfp4", None, True, torch.uint8, K // 2, torch.uint8, (1, 32), False, 4 + 8 / 32, id="mxfp4"),
]


@pytest.mark.parametrize("fmt, group_size, symmetric, codes_dtype, packed, scales_dtype, block, has_zeros, bits",
                         STORAGE)
def test_storage(gen, fmt, group_size, symmetric, codes_dtype, packed, scales_dtype, block, has_zeros, bits):
    q = md.quantize(sample(gen).bfloat16(), fmt, group_size=group_size, symmetric=symmetric)
    assert (q.format, q.shape, q.dtype, q.block) == (fmt, (E, N, K), torch.bfloat16, block)
    assert q.codes.dtype == codes_dtype and q.codes.shape == (E, N, packed)
    grid = (E, math.ceil(N / block[0]), math.ceil(K / block[1]))
    assert q.scales.dtype == scales_dtype and q.scales.shape == grid
    assert (q.zeros is not None) == has_zeros
    if has_zeros:
        assert q.zeros.dtype == torch.uint8 and q.zeros.shape == grid and int(q.zeros.max()) <= 15
    held = q.codes.nbytes + q.scales.nbytes + (q.zeros.nbytes if has_zeros else 0)
    assert q.nbytes == held
    assert q.bits_per_weight == pytest.approx(bits)
    assert q.dequantize().dtype == torch.bfloat16 and q.dense().shape == (E, N, K)


@pytest.mark.parametrize("fmt, group_size, symmetric", LAYOUTS)
def test_experts_move_and_flatten(gen, fmt, group_size, symmetric):
    q = md.quantize(sample(gen), fmt, group_size=group_size, symmetric=symmetric, dtype=torch.float32)
    whole = q.dequantize()
    for pick, expected in ((1, whole[1:2]), (-1, whole[-1:]), (slice(0, 2), whole[:2])):
        part = q[pick]
        assert type(part) is type(q) and part.block == q.block
        assert torch.equal(part.dequantize(), expected)
    assert q[2].codes.data_ptr() == q.codes[2].data_ptr()  # views, not copies
    half = q.to(torch.bfloat16)
    assert half.dtype == torch.bfloat16 and half.codes is q.codes
    assert torch.equal(half.dequantize(), whole.bfloat16())
    assert torch.equal(q.to(device="cpu").dequantize(), whole)
    tensors, spec = flatten(q)
    again = unflatten(list(tensors), spec)
    assert type(again) is type(q) and (again.block, again.dtype) == (q.block, q.dtype)
    assert torch.equal(again.dequantize(), whole)


def test_one_expert_and_all_zero_weights():
    for fmt in ("int8", "int4", "fp8", "mxfp4"):
        q = md.quantize(torch.zeros(1, 130, 64), fmt, group_size=32 if fmt in ("int4", "int8") else None)
        assert q.shape == (1, 130, 64) and (q.dequantize(torch.float32) == 0).all()
        assert torch.isfinite(q.float_scales()).all()


# ---- checkpoint importers -----------------------------------------------------------------------


def pack_int32(values: torch.Tensor, dim: int, bits: int = 4, order=None, offset: int = 0) -> torch.Tensor:
    """The checkpoints' rule, done the slow way: 32 // bits values of `dim` (padded with zeros)
    per int32 word, value per_word * w + order[i] (+ offset) in bits bits * i onwards."""
    per_word = 32 // bits
    order = range(per_word) if order is None else order
    values = (values.long() + offset).movedim(dim, -1)
    values = torch.nn.functional.pad(values, (0, -values.shape[-1] % per_word))
    words = torch.zeros(*values.shape[:-1], values.shape[-1] // per_word, dtype=torch.long)
    for i, position in enumerate(order):
        words |= values[..., position::per_word] << (bits * i)
    words = torch.where(words >= 2**31, words - 2**32, words)  # the same 32 bits, as a signed int32
    return words.to(torch.int32).movedim(-1, dim)


def int4_case(gen, group_size, symmetric, out_features=N):
    """Codes q [E, K, N] in 0..15, zero points and fp16 scales [E, K/g, N] (the checkpoints'
    [K, N] orientation) and the values they stand for, as [E, N, K]."""
    q = torch.randint(0, 16, (E, K, out_features), generator=gen)
    shape = (E, K // group_size, out_features)
    zeros = torch.full(shape, 8) if symmetric else torch.randint(0, 16, shape, generator=gen)
    scales = (torch.rand(shape, generator=gen) * 0.02 + 1e-3).half()
    values = (q - zeros.repeat_interleave(group_size, 1)).float() * scales.float().repeat_interleave(group_size, 1)
    return q, zeros, scales, values.transpose(1, 2)


@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "zeros"])
@pytest.mark.parametrize("group_size", [32, 128])
def test_from_gptq(gen, group_size, symmetric):
    q, zeros, scales, expected = int4_case(gen, group_size, symmetric)
    qweight = pack_int32(q, dim=1)  # along K
    qzeros = pack_int32((zeros - 1) & 15, dim=2)  # along N, v1 stores zero - 1 (zero 0 wraps to 15)
    g_idx = torch.arange(K, dtype=torch.int32) // group_size
    w = QuantizedWeight.from_gptq(qweight, qzeros, scales, group_size=group_size, g_idx=g_idx, dtype=torch.float32)
    assert (w.format, w.shape, w.group_size) == ("int4", (E, N, K), group_size)
    assert (w.zeros is None) == symmetric  # every zero 8: the symmetric layout
    assert torch.equal(w.dequantize(), expected)
    per_expert = QuantizedWeight.from_gptq(list(qweight), list(qzeros), list(scales), group_size=group_size,
                                           dtype=torch.float32)
    assert torch.equal(per_expert.dequantize(), expected)


@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "zeros"])
def test_from_awq(gen, symmetric):
    q, zeros, scales, expected = int4_case(gen, 64, symmetric)
    order = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ's GEMM pack: nibble i holds column order[i]
    w = QuantizedWeight.from_awq(pack_int32(q, dim=2, order=order), pack_int32(zeros, dim=2, order=order), scales,
                                 group_size=64, dtype=torch.float32)
    assert (w.zeros is None) == symmetric
    assert torch.equal(w.dequantize(), expected)


@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "zeros"])
@pytest.mark.parametrize("out_features", [N, 36])  # 36: the zero points' last word is padded
def test_from_compressed_tensors_int4(gen, symmetric, out_features):
    q, zeros, scales, expected = int4_case(gen, 32, symmetric, out_features)
    signed = (q - 8).transpose(1, 2)  # compressed-tensors holds [N, K] signed values in [-8, 7]
    weight_packed = pack_int32(signed, dim=2, offset=8)  # along K, each plus 8
    weight_scale = scales.transpose(1, 2).contiguous()
    weight_zero_point = None if symmetric else pack_int32((zeros - 8).transpose(1, 2), dim=1, offset=8)  # along N
    w = QuantizedWeight.from_compressed_tensors(weight_packed, weight_scale, weight_zero_point, num_bits=4,
                                                dtype=torch.float32)
    assert (w.format, w.shape, w.group_size) == ("int4", (E, out_features, K), 32)
    assert torch.equal(w.dequantize(), expected)
    assert w.codes.data_ptr() == weight_packed.data_ptr()  # the packed words are already our bytes
    if not symmetric:  # an unpacked int8 zero point means the same
        unpacked = (zeros - 8).transpose(1, 2).to(torch.int8)
        same = QuantizedWeight.from_compressed_tensors(weight_packed, weight_scale, unpacked, num_bits=4,
                                                       dtype=torch.float32)
        assert torch.equal(same.dequantize(), expected)


@pytest.mark.parametrize("packed", [False, True], ids=["int-quantized", "pack-quantized"])
@pytest.mark.parametrize("groups", [1, K // 128, K // 32], ids=["channel", "g128", "g32"])
def test_from_compressed_tensors_int8(gen, packed, groups):
    q = torch.randint(-127, 128, (E, N, K), generator=gen)
    weight_scale = (torch.rand(E, N, groups, generator=gen) * 0.01 + 1e-4).bfloat16()
    expected = q.float() * weight_scale.float().repeat_interleave(K // groups, 2)
    weight = pack_int32(q, dim=2, bits=8, offset=128) if packed else q.to(torch.int8)
    zero_point = torch.zeros(E, N, groups, dtype=torch.int8)  # symmetric checkpoints still ship one
    w = QuantizedWeight.from_compressed_tensors(weight, weight_scale, zero_point, num_bits=8 if packed else None,
                                                dtype=torch.float32)
    assert (w.format, w.shape, w.block) == ("int8", (E, N, K), (1, K // groups))
    assert torch.equal(w.dequantize(), expected)


def mxfp4_tensors(gen, low=110, high=136, shape=(E, 40, K // 32)):
    blocks = torch.randint(0, 256, (*shape, 16), dtype=torch.uint8, generator=gen)
    return blocks, torch.randint(low, high, shape, dtype=torch.uint8, generator=gen)


def test_from_mxfp4_by_the_spec(gen):
    blocks, scales = mxfp4_tensors(gen)
    w = QuantizedWeight.from_mxfp4(blocks, scales, dtype=torch.float32)
    assert w.codes.data_ptr() == blocks.data_ptr()  # no copy
    low, high = (blocks & 15).long(), (blocks >> 4).long()
    codes = torch.stack((low, high), -1).flatten(-2)  # the even element in the low nibble
    magnitude = torch.tensor(E2M1)[codes & 7]
    values = torch.where(codes >= 8, -magnitude, magnitude) * torch.exp2(scales.double() - 127).unsqueeze(-1)
    assert torch.equal(w.dequantize(), values.flatten(2).float())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("scale_range", [(110, 136), (0, 255)], ids=["realistic", "every-byte"])
def test_mxfp4_matches_transformers(gen, dtype, scale_range):
    pytest.importorskip("transformers")
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    blocks, scales = mxfp4_tensors(gen, *scale_range)
    expected = convert_moe_packed_tensors(blocks.clone(), scales.clone(), dtype=dtype)  # [E, K, N]
    got = QuantizedWeight.from_mxfp4(blocks, scales, dtype=dtype).dequantize()
    assert bitwise_equal(got, expected.transpose(1, 2).contiguous())


def fp8_tensors(gen, out_features, in_features):
    """Every finite e4m3 bit pattern (NaN is 0x7f / 0xff) and block multipliers of the sizes
    DeepSeek-V3's weight_scale_inv holds."""
    bits = torch.randint(0, 256, (E, out_features, in_features), dtype=torch.uint8, generator=gen)
    bits = torch.where(bits & 0x7F == 0x7F, bits ^ 1, bits)
    grid = (E, math.ceil(out_features / 128), math.ceil(in_features / 128))
    scale_inv = torch.exp2(torch.rand(grid, generator=gen) * -12 - 2) * (1 + torch.rand(grid, generator=gen))
    return bits.view(torch.float8_e4m3fn), scale_inv


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_fp8_matches_transformers(gen, dtype):
    pytest.importorskip("transformers")
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    weight, scale_inv = fp8_tensors(gen, 256, 384)
    got = QuantizedWeight.from_fp8_blocks(list(weight), list(scale_inv), dtype=dtype).dequantize()
    dequantize = Fp8Dequantize(None)._dequantize_one
    for e in range(E):
        assert bitwise_equal(got[e], dequantize(weight[e], scale_inv[e], dtype))


@pytest.mark.parametrize("shape", [(200, 300), (100, 64), (129, 1)], ids=str)
def test_fp8_partial_blocks_match_transformers(gen, shape):
    pytest.importorskip("transformers")
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    weight, scale_inv = fp8_tensors(gen, *shape)
    got = QuantizedWeight.from_fp8_blocks(weight, scale_inv, dtype=torch.float32).dequantize()
    assert bitwise_equal(got, _dequantize_fp8_weight(weight, scale_inv, [128, 128], torch.float32))


# ---- bad input -----------------------------------------------------------------------------------


def _gptq(gen, **override):
    q, zeros, scales, _ = int4_case(gen, 64, False)
    args = dict(qweight=pack_int32(q, dim=1), qzeros=pack_int32(zeros - 1, dim=2), scales=scales, group_size=64)
    args.update(override)
    return QuantizedWeight.from_gptq(**args)


def _compressed(gen, **override):
    args = dict(weight=torch.zeros(E, N, K // 8, dtype=torch.int32), weight_scale=torch.ones(E, N, K // 32),
                num_bits=4)
    args.update(override)
    return QuantizedWeight.from_compressed_tensors(**args)


def _int4(codes_last=K // 2, scales_last=K // 32, codes_dtype=torch.uint8, zeros=None, cls=None):
    from moe_dispatch.formats.quantized import Int4Weight, Int8Weight

    cls = Int4Weight if cls is None else Int8Weight
    codes = torch.zeros(E, N, codes_last, dtype=codes_dtype)
    return cls(codes, torch.ones(E, N, scales_last), (1, 32), zeros=zeros)


def _shuffled_g_idx():
    g_idx = torch.arange(K, dtype=torch.int32) // 64
    return g_idx[torch.randperm(K, generator=torch.Generator().manual_seed(0))]


BAD = [
    # (build(gen), error type, pattern the message must match)
    pytest.param(lambda g: md.quantize(torch.randn(2, 8, 96), "int4", group_size=48), ValueError,
                 r"group_size .* one of \(32, 64, 128\)", id="group-size-not-allowed"),
    pytest.param(lambda g: md.quantize(torch.randn(2, 8, 96), "int4", group_size=64), ValueError,
                 r"group_size=64 must divide K=96", id="group-size-not-dividing-K"),
    pytest.param(lambda g: md.quantize(torch.randn(2, 8, 64), "mxfp4", group_size=64), ValueError,
                 "mxfp4", id="mxfp4-group-size"),
    pytest.param(lambda g: md.quantize(torch.randn(2, 8, 64), "int8", symmetric=False), ValueError,
                 "symmetric", id="int8-asymmetric"),
    pytest.param(lambda g: _gptq(g, group_size=100), ValueError, "group_size", id="gptq-group-size"),
    pytest.param(lambda g: _gptq(g, scales=torch.ones(E, K // 32, N, dtype=torch.float16)), ValueError,
                 r"scales must be \[E, K/g, N\] \(shape \(3, 4, 24\)\)", id="gptq-scales-shape"),
    pytest.param(lambda g: _gptq(g, scales=torch.ones(E, K // 64, N, dtype=torch.int32)), TypeError,
                 "scales must be float32 or bfloat16 or float16", id="gptq-scales-dtype"),
    pytest.param(lambda g: _gptq(g, qweight=torch.zeros(E, K // 8, N, dtype=torch.int64)), TypeError,
                 "qweight must be int32", id="gptq-qweight-dtype"),
    pytest.param(lambda g: _gptq(g, qzeros=torch.zeros(E, K // 64, N // 4, dtype=torch.int32)), ValueError,
                 r"qzeros must be \[E, K/g, ceil\(N/8\)\] \(shape \(3, 4, 3\)\)", id="gptq-qzeros-shape"),
    pytest.param(lambda g: _gptq(g, g_idx=_shuffled_g_idx()), ValueError, "g_idx .*act-order", id="gptq-act-order"),
    pytest.param(lambda g: _gptq(g, g_idx=torch.zeros(K + 1, dtype=torch.int32)), ValueError,
                 r"g_idx must be \[K\]", id="gptq-g_idx-shape"),
    pytest.param(lambda g: QuantizedWeight.from_awq(torch.zeros(E, K, N // 8, dtype=torch.int32),
                                                    torch.zeros(E, K // 64, N // 8), torch.ones(E, K // 64, N),
                                                    group_size=64), TypeError, "qzeros must be int32",
                 id="awq-qzeros-dtype"),
    pytest.param(lambda g: QuantizedWeight.from_mxfp4(torch.zeros(E, N, 8, 15, dtype=torch.uint8),
                                                      torch.zeros(E, N, 8, dtype=torch.uint8)), ValueError,
                 r"blocks must be \[E, N, K/32, 16\]", id="mxfp4-blocks-size"),
    pytest.param(lambda g: QuantizedWeight.from_mxfp4(torch.zeros(E, N, 8, 16, dtype=torch.uint8),
                                                      torch.zeros(E, N, 4, dtype=torch.uint8)), ValueError,
                 r"scales must be \[E, N, K/32\] \(shape \(3, 24, 8\)\)", id="mxfp4-scales-shape"),
    pytest.param(lambda g: QuantizedWeight.from_mxfp4(torch.zeros(E, N, 8, 16, dtype=torch.uint8),
                                                      torch.zeros(E, N, 8)), TypeError, "scales must be uint8",
                 id="mxfp4-scales-dtype"),
    pytest.param(lambda g: QuantizedWeight.from_fp8_blocks(torch.zeros(E, 200, 300, dtype=torch.float8_e4m3fn),
                                                           torch.ones(E, 1, 2)), ValueError,
                 r"scale_inv must be \[E, ceil\(N/128\), ceil\(K/128\)\] \(shape \(3, 2, 3\)\)",
                 id="fp8-scale_inv-shape"),
    pytest.param(lambda g: QuantizedWeight.from_fp8_blocks(torch.zeros(E, 128, 128, dtype=torch.bfloat16),
                                                           torch.ones(E, 1, 1)), TypeError,
                 "weight must be float8_e4m3fn", id="fp8-weight-dtype"),
    pytest.param(lambda g: _compressed(g, weight_scale=torch.ones(E, N + 1, K // 32)), ValueError,
                 r"weight_scale must be \[E, N, K/g\] = \(3, 24, 256/g\)", id="ct-weight_scale-shape"),
    pytest.param(lambda g: _compressed(g, weight_scale=torch.ones(E, N, 1)), ValueError,
                 "weight_scale .* got shape \\(3, 24, 1\\)", id="ct-int4-per-channel"),
    pytest.param(lambda g: _compressed(g, num_bits=None), ValueError, "num_bits", id="ct-num_bits"),
    pytest.param(lambda g: _compressed(g, weight=torch.zeros(E, N, K, dtype=torch.int8), num_bits=None,
                                       weight_scale=torch.ones(E, N, 1),
                                       weight_zero_point=torch.ones(E, N, 1, dtype=torch.int8)), ValueError,
                 "weight_zero_point .* int8 weights are symmetric", id="ct-int8-zero-points"),
    pytest.param(lambda g: _compressed(g, weight_zero_point=torch.zeros(E, N, K // 32, dtype=torch.int32)),
                 ValueError, r"weight_zero_point must be \[E, ceil\(N/8\), K/g\]", id="ct-zero-point-shape"),
    pytest.param(lambda g: _int4(scales_last=K // 64), ValueError, r"scales must have shape \(3, 24, 8\)",
                 id="packed-size-mismatch"),
    pytest.param(lambda g: _int4(codes_dtype=torch.int8), TypeError, "codes must be torch.uint8", id="codes-dtype"),
    pytest.param(lambda g: _int4(codes_last=K, codes_dtype=torch.int8, cls="int8",
                                 zeros=torch.zeros(E, N, K // 32, dtype=torch.uint8)), ValueError,
                 "zero points are for int4 weights, not int8", id="zeros-on-int8"),
    pytest.param(lambda g: _int4(zeros=torch.zeros(E, N, K // 32)), TypeError, "zero points must be uint8",
                 id="zeros-dtype"),
]


@pytest.mark.parametrize("build, error, pattern", BAD)
def test_bad_input(gen, build, error, pattern):
    with pytest.raises(error, match=pattern):
        build(gen)


@pytest.mark.parametrize("fmt", ["int8", "int4", "fp8"])
def test_no_gradient_through_scales(gen, fmt):
    q = md.quantize(torch.randn(2, 16, 64, generator=gen), fmt, group_size=32 if fmt != "fp8" else None)
    x = torch.randn(4, 64, generator=gen, dtype=torch.float32)
    q.check("w_gate_up", x)
    q.scales.requires_grad_()
    with pytest.raises(ValueError, match="w_gate_up is a frozen .* no gradient"):
        q.check("w_gate_up", x)
    with torch.no_grad():
        q.check("w_gate_up", x)  # inference over scales that happen to require grad is fine
    with pytest.raises(TypeError, match=r"w_gate_up is .* for torch.float32 activations but x is torch.bfloat16"):
        q.check("w_gate_up", x.bfloat16())
