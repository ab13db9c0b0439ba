"""The vector kernels of moe_dispatch/kernels/numba/packed_dots.py, which dot packed weight
codes with activation rows: compiled for this CPU, for a CPU with AVX2 only and for no x86
features at all (the generic vector code), against their numpy definition, and that against
the format's own dequantization in float64."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import moe_dispatch as md
from conftest import needs_numba

pytestmark = needs_numba

# (fmt of the kernel, the format's quantize options, K): int8 per channel with K past a flush
# span; 4-bit groups of 32 (four to a step of 128 codes) with and without zero points, of 64
# and of 128, K = 192 ending half way through a step; fp8's 128-column block over K = 96 (one
# partial block: the code for any K) and over K = 256 (whole blocks: the code whose steps per
# block are a constant, as for the others).
CASES = [
    pytest.param("int8", "int8", {}, 2112, id="int8-channel"),
    pytest.param("int8", "int8", {"group_size": 32}, 96, id="int8-g32"),
    pytest.param("int4", "int4", {"group_size": 32}, 192, id="int4-g32"),
    pytest.param("int4", "int4", {"group_size": 32, "symmetric": False}, 192, id="int4-g32-zero-points"),
    pytest.param("int4", "int4", {"group_size": 64, "symmetric": False}, 192, id="int4-g64-zero-points"),
    pytest.param("int4", "int4", {"group_size": 128}, 256, id="int4-g128"),
    pytest.param("e2m1", "mxfp4", {}, 192, id="mxfp4"),
    pytest.param("e4m3", "fp8", {}, 96, id="fp8"),
    pytest.param("e4m3", "fp8", {}, 256, id="fp8-whole-blocks"),
]
# None: the features Numba compiles for; then an AVX2-only x86 CPU; then none
FEATURES = [pytest.param(None, id="host"), pytest.param("+avx2", id="avx2"), pytest.param("", id="generic")]


# Pairs of weight rows the kernels take per call, as (n_a, n_b, stride, pairs): GEMM2's two
# streams (rows p and 3 + p), a plain GEMM1's neighbours (rows 2p and 2p + 1), one pair.
LAYOUTS = [(0, 3, 1, 3), (0, 1, 2, 3), (4, 1, 0, 1)]
NUM_WEIGHT_ROWS = 6


def layout_rows(n_a, n_b, stride, pairs):
    """The weight row of each row of the kernels' out, for a layout."""
    return [n + p * stride for p in range(pairs) for n in (n_a, n_b)]


def kernel_inputs(fmt, quantize_format, options, depth, gen, num_tokens=6):
    """Six weight rows quantized, the operands before the row layout as the kernels read them,
    activations, and the rows dequantized in float64."""
    w = torch.randn(1, NUM_WEIGHT_ROWS, depth, generator=gen)
    q = md.quantize(w, quantize_format, **options)
    zeros = q.zeros.numpy() if q.zeros is not None else np.zeros((1, 1, 1), dtype=np.uint8)
    codes = q.codes.view(torch.uint8).numpy()
    if fmt == "e4m3":
        x = torch.randn(num_tokens, depth, generator=gen).numpy()
    else:
        x = torch.randint(-32767, 32768, (num_tokens, depth), generator=gen, dtype=torch.int16).numpy()
        x = in_kernel_layout(fmt, x)
    weights = (codes, q.scales.numpy(), zeros, q.zeros is not None, 0)  # expert 0
    return weights, q.block[0], x, q.dequantize(torch.float64)[0].numpy(), q.block[1]


def operands(fmt, weights, per_scale, x, group, layout=LAYOUTS[0]):
    """The kernels' arguments up to the activations' lane sums (mxfp4's and symmetric int4's,
    lane_sums; an empty stand-in for the others)."""
    from moe_dispatch.kernels.numba.packed_dots import INT_LANES, lane_sums, sums_zero

    zero = sums_zero(fmt, weights[3])  # weights[3]: has_zeros
    sums = lane_sums(x, group, zero) if zero else np.empty((0, 0, INT_LANES), np.int32)
    return (*weights, *layout, per_scale, x, sums)


def in_kernel_layout(fmt, x):
    """Activation rows [T, K] in element order as the kernel of fmt reads them: the 4-bit
    formats' in nibble_order, zeros past K."""
    from moe_dispatch.kernels.numba.packed_dots import nibble_order

    if fmt not in ("int4", "e2m1"):
        return x
    return np.ascontiguousarray(np.concatenate([x, np.zeros_like(x[:, :1])], axis=1)[:, nibble_order(x.shape[1])])


def in_element_order(fmt, x, depth):
    """Activation rows as the kernel of fmt reads them, back in element order: [T, depth]."""
    from moe_dispatch.kernels.numba.packed_dots import nibble_order

    if fmt not in ("int4", "e2m1"):
        return x
    ordered = np.zeros((x.shape[0], depth + 1), x.dtype)
    ordered[:, nibble_order(depth)] = x
    return ordered[:, :depth]


def compiled(fmt, features):
    from numba import njit

    from moe_dispatch.kernels.numba.packed_dots import dots_intrinsic

    kernel = dots_intrinsic(fmt, features)

    @njit
    def run(codes, scales, zeros, has_zeros, e, n_a, n_b, stride, pairs, per_scale, x, x_sums, rows, start, count, group,
            out):
        kernel(codes, scales, zeros, has_zeros, e, n_a, n_b, stride, pairs, per_scale, x, x_sums, rows, start, count,
               group, out)

    return run


def check_the_kernel(fmt, features, weights, per_scale, x, x_sums, group, activations, dense, gen):
    """fmt's kernel compiled for features against its numpy definition, and that against the
    dequantized rows dense times the activations (float64 [T, K] in element order; x: as the
    kernel reads them), for passes of 4, 2 and 1 rows and every layout of weight rows."""
    from moe_dispatch.kernels.numba import packed_dots

    definition = getattr(packed_dots, f"{fmt}_dots")
    run = compiled(fmt, features)
    for count, layout in zip((1, 2, 3, 7), LAYOUTS * 2):
        args = (*weights, *layout, per_scale, x, x_sums)
        start = 2  # the rows from rows[start]; out wider than count and longer than the pairs
        rows = torch.randint(0, 6, (start + count,), generator=gen, dtype=torch.int32).numpy()
        height = 2 * layout[3]
        out, expected = (np.full((height + 1, count + 1), np.nan, np.float32) for _ in range(2))
        run(*args, rows, start, count, group, out)
        definition(*args, rows, start, count, group, expected)
        assert np.isnan(out[:, count]).all() and np.isnan(out[height]).all()  # nothing written past them
        out, expected, rows = out[:height, :count], expected[:height, :count], rows[start:]
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
        truth = dense[layout_rows(*layout)] @ activations[rows].T
        np.testing.assert_allclose(expected, truth, rtol=1e-5, atol=1e-5 * np.abs(truth).max())


@pytest.mark.parametrize("features", FEATURES)
@pytest.mark.parametrize("fmt,quantize_format,options,depth", CASES)
def test_the_vector_code_computes_the_definition(fmt, quantize_format, options, depth, features, gen):
    weights, per_scale, x, dense, group = kernel_inputs(fmt, quantize_format, options, depth, gen)
    x_sums = operands(fmt, weights, per_scale, x, group)[-1]
    check_the_kernel(fmt, features, weights, per_scale, x, x_sums, group,
                     in_element_order(fmt, x, depth).astype(np.float64), dense, gen)


@pytest.mark.parametrize("features", FEATURES)
def test_every_e4m3_code_meets_the_activations_as_its_value(features, gen):
    """All 254 codes that are numbers (subnormals, both zeros and +-448 among them; NaN's two
    become zeros) over two weight rows of 128."""
    from moe_dispatch.kernels.numba import packed_dots

    weights, per_scale, x, _, group = kernel_inputs("e4m3", "fp8", {}, 128, gen)
    codes = np.arange(256, dtype=np.uint8)
    codes[codes & 0x7F == 0x7F] &= 0x80
    weights[0][0, :2] = codes.reshape(2, 128)
    args = operands("e4m3", weights, per_scale, x, group, (0, 1, 0, 1))
    rows = np.arange(6, dtype=np.int32)
    out, expected = (np.empty((2, 6), np.float32) for _ in range(2))
    compiled("e4m3", features)(*args, rows, 0, 6, group, out)
    packed_dots.e4m3_dots(*args, rows, 0, 6, group, expected)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())


@pytest.mark.parametrize("features", FEATURES)
def test_e8m0_scales_down_to_the_subnormal_one_scale_the_dots(features, gen):
    """mxfp4 scales of 2^-127 (e8m0's code 0, a subnormal float32) to 2^-124, one per group of
    32 and two to a step: the sums still come out as the definition's."""
    from moe_dispatch.kernels.numba import packed_dots

    weights, per_scale, x, _, group = kernel_inputs("e2m1", "mxfp4", {}, 192, gen)
    weights[1][:] = torch.randint(0, 4, weights[1].shape, generator=gen, dtype=torch.uint8).numpy()
    assert (weights[1] == 0).any()
    args = operands("e2m1", weights, per_scale, x, group)
    rows = np.arange(6, dtype=np.int32)
    out, expected = (np.empty((6, 6), np.float32) for _ in range(2))
    compiled("e2m1", features)(*args, rows, 0, 6, group, out)
    packed_dots.e2m1_dots(*args, rows, 0, 6, group, expected)
    assert np.abs(expected).min() > np.finfo(np.float32).tiny  # normal sums: the relative check holds
    np.testing.assert_allclose(out, expected, rtol=1e-5)


def bfloat16_layout(x):
    """Float activation rows rounded to bfloat16, as the e4m3 kernel reads them: their bits
    (int16); and the rounded rows, float64."""
    rounded = torch.from_numpy(x).bfloat16()
    return rounded.view(torch.int16).numpy(), rounded.double().numpy()


# K = 128 (one block), 192 (a partial last block of 64), 256 (whole blocks)
@pytest.mark.parametrize("depth", [128, 192, 256])
@pytest.mark.parametrize("features", FEATURES)
def test_e4m3_codes_meet_bfloat16_activations_as_pairs_of_bfloat16(depth, features, gen):
    """The kernel's second kind for e4m3: codes looked up as bfloat16 (vpermi2b) against the
    activations' bfloat16 bits, vdpbf16ps, where the host has them; the same sums in generic
    vector code elsewhere."""
    from moe_dispatch.kernels.numba.packed_dots import INT_LANES

    weights, per_scale, x, dense, group = kernel_inputs("e4m3", "fp8", {}, depth, gen)
    bits, rounded = bfloat16_layout(x)
    check_the_kernel("e4m3", features, weights, per_scale, bits, np.empty((0, 0, INT_LANES), np.int32), group,
                     rounded, dense, gen)


@pytest.mark.parametrize("features", FEATURES)
def test_every_e4m3_code_meets_bfloat16_activations_as_its_value(features, gen):
    from moe_dispatch.kernels.numba import packed_dots

    weights, per_scale, x, _, group = kernel_inputs("e4m3", "fp8", {}, 128, gen)
    codes = np.arange(256, dtype=np.uint8)
    codes[codes & 0x7F == 0x7F] &= 0x80
    weights[0][0, :2] = codes.reshape(2, 128)
    args = operands("e4m3", weights, per_scale, bfloat16_layout(x)[0], group, (0, 1, 0, 1))
    rows = np.arange(6, dtype=np.int32)
    out, expected = (np.empty((2, 6), np.float32) for _ in range(2))
    compiled("e4m3", features)(*args, rows, 0, 6, group, out)
    packed_dots.e4m3_dots(*args, rows, 0, 6, group, expected)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())


NIBBLE_CASES = [case for case in CASES if case.values[0] in ("int4", "e2m1")]


@pytest.mark.parametrize("features", FEATURES)
@pytest.mark.parametrize("fmt,quantize_format,options,depth", NIBBLE_CASES)
def test_4bit_codes_meet_bfloat16_activations_as_pairs_of_bfloat16(fmt, quantize_format, options, depth, features,
                                                                     gen):
    """The 4-bit kernels' second kind: codes looked up as bfloat16 values (vpermw) against the
    activations' bfloat16 bits in nibble_order (uint16), vdpbf16ps, where the host has them;
    the same sums through float32 elsewhere. No lane sums: the values carry their zero."""
    from moe_dispatch.kernels.numba.packed_dots import INT_LANES

    weights, per_scale, _, dense, group = kernel_inputs(fmt, quantize_format, options, depth, gen)
    bits, rounded = bfloat16_layout(torch.randn(6, depth, generator=gen).numpy())
    check_the_kernel(fmt, features, weights, per_scale, in_kernel_layout(fmt, bits.view(np.uint16)),
                     np.empty((0, 0, INT_LANES), np.int32), group, rounded, dense, gen)


@pytest.mark.parametrize("features", FEATURES)
def test_every_e2m1_code_meets_bfloat16_activations_as_its_value(features, gen):
    """Every byte of two codes, in a random order over two weight rows of 256."""
    from moe_dispatch.kernels.numba import packed_dots

    weights, per_scale, _, _, group = kernel_inputs("e2m1", "mxfp4", {}, 256, gen)
    codes = np.arange(256, dtype=np.uint8)[torch.randperm(256, generator=gen).numpy()]
    weights[0][0, :2] = codes.reshape(2, 128)
    bits = in_kernel_layout("e2m1", bfloat16_layout(torch.randn(6, 256, generator=gen).numpy())[0].view(np.uint16))
    args = (*weights, 0, 1, 0, 1, per_scale, bits, np.empty((0, 0, packed_dots.INT_LANES), np.int32))
    rows = np.arange(6, dtype=np.int32)
    out, expected = (np.empty((2, 6), np.float32) for _ in range(2))
    compiled("e2m1", features)(*args, rows, 0, 6, group, out)
    packed_dots.e2m1_dots(*args, rows, 0, 6, group, expected)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())


@pytest.mark.parametrize("depth", [128, 192])
def test_bfloat16_rows_round_as_torch_does(depth, gen):
    """In element order, and from split rows (even elements, then odd) into the 4-bit kernels'
    layout, zeros past K."""
    from moe_dispatch.kernels.numba.packed_dots import bfloat16_rows, nibble_depth

    src = (torch.randn(3, depth, generator=gen) * torch.tensor([[1e-30], [1.0], [1e30]])).numpy()
    src[1, :4] = [np.inf, -np.inf, np.nan, 1.0 + 2.0 ** -8]  # the last a tie, to even

    def values(bits):  # a NaN's bits may differ
        return (bits.view(np.uint16).astype(np.uint32) << 16).view(np.float32)

    out = np.empty((3, depth), np.int16)
    bfloat16_rows(src, False, out)
    np.testing.assert_array_equal(values(out), values(bfloat16_layout(src)[0]))
    out = np.full((3, nibble_depth(depth)), 7, np.int16)
    bfloat16_rows(src, True, out)
    in_order = np.empty_like(src)
    in_order[:, 0::2], in_order[:, 1::2] = src[:, :depth // 2], src[:, depth // 2:]
    np.testing.assert_array_equal(values(out), values(in_kernel_layout("int4", bfloat16_layout(in_order)[0])))


def test_float64_activations_meet_e4m3_codes_as_float32(gen):
    weights, per_scale, x, dense, group = kernel_inputs("e4m3", "fp8", {}, 96, gen)
    x64 = x.astype(np.float64)
    rows = np.arange(6, dtype=np.int32)
    out = np.empty((6, 6), np.float32)
    compiled("e4m3", None)(*operands("e4m3", weights, per_scale, x64, group), rows, 0, 6, group, out)
    np.testing.assert_allclose(out, dense[layout_rows(*LAYOUTS[0])] @ x64.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("depth", [128, 192])
def test_quantize_rows_rounds_each_row_to_int16_on_its_own_scale(depth, gen):
    from moe_dispatch.kernels.numba.packed_dots import nibble_depth, quantize_rows

    src = (torch.randn(3, depth, generator=gen) * torch.tensor([[1e-3], [1.0], [1e3]])).numpy()
    src[1, 5] = 0.0
    for split in (False, True):
        width = nibble_depth(depth) if split else depth
        ints, scales = np.empty((3, width), np.int16), np.empty(3, np.float32)
        assert quantize_rows(src, split, ints, scales)
        expected = src
        if split:  # src: even elements, then odd; ints: the 4-bit kernels' layout, zeros past K
            in_order = np.empty_like(src)
            in_order[:, 0::2], in_order[:, 1::2] = src[:, :depth // 2], src[:, depth // 2:]
            expected = in_kernel_layout("int4", in_order)
        assert (np.abs(ints * scales[:, None] - expected) <= 0.51 * scales[:, None]).all()  # each on its own scale
        assert (np.abs(ints).max(axis=1) == 32767).all()
        np.testing.assert_allclose(scales, np.abs(src).max(axis=1) / 32767, rtol=1e-6)


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_quantize_rows_refuses_a_row_that_is_not_finite(bad, gen):
    from moe_dispatch.kernels.numba.packed_dots import quantize_rows

    src = torch.randn(2, 32, generator=gen).numpy()
    src[1, 7] = bad
    assert not quantize_rows(src, False, np.empty((2, 32), np.int16), np.empty(2, np.float32))


def test_a_zero_row_quantizes_to_zeros():
    from moe_dispatch.kernels.numba.packed_dots import quantize_rows

    ints, scales = np.ones((1, 32), np.int16), np.ones(1, np.float32)
    assert quantize_rows(np.zeros((1, 32), np.float32), False, ints, scales)
    assert not ints.any() and scales[0] == 0


def compiled_dequantize(fmt, features):
    from numba import njit

    from moe_dispatch.kernels.numba.packed_dots import dequantize_intrinsic

    kernel = dequantize_intrinsic(fmt, features)

    @njit
    def run(codes, scales, zeros, has_zeros, e, n, s, group, first, out):
        kernel(codes, scales, zeros, has_zeros, e, n, s, group, first, out)

    return run


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("features", FEATURES)
@pytest.mark.parametrize("fmt,quantize_format,options,depth", CASES)
def test_rows_dequantize_bit_for_bit_as_the_format_does(fmt, quantize_format, options, depth, features, dtype, gen):
    """The blocked path's conversion: each row in the activations' type, rounded once; whole,
    and a slice from one chunk in (inside the first group where groups are longer)."""
    from moe_dispatch.backends.numba_backend import as_array
    from moe_dispatch.kernels.numba import packed_dots

    w = torch.randn(1, 2, depth, generator=gen)
    q = md.quantize(w, quantize_format, **options)
    zeros = q.zeros.numpy() if q.zeros is not None else np.zeros((1, 1, 1), dtype=np.uint8)
    operands = (q.codes.view(torch.uint8).numpy(), q.scales.numpy(), zeros, q.zeros is not None, 0)
    expected = q.dequantize(dtype)[0]
    run, definition = compiled_dequantize(fmt, features), getattr(packed_dots, f"{fmt}_dequantize")
    group = q.block[1]
    for n in range(2):
        for start, stop in ((0, depth), (32, min(depth, group + 64))):
            out = torch.full((stop - start,), float("nan"), dtype=dtype)
            defined = torch.empty(stop - start, dtype=dtype)
            run(*operands, n, n // q.block[0], group, start, as_array(out))
            definition(*operands, n, n // q.block[0], group, start, as_array(defined))
            assert torch.equal(out, expected[n, start:stop]) and torch.equal(defined, expected[n, start:stop])


@pytest.mark.parametrize("features", FEATURES)
@pytest.mark.parametrize("fmt,quantize_format,options,depth", CASES)
def test_rows_whose_values_are_subnormal_dequantize_bit_for_bit(fmt, quantize_format, options, depth, features, gen):
    """Scales so small that the values fall below float32's normal range (bfloat16's too): the
    rounding keeps them as torch does, where a hardware conversion would flush them to zero."""
    from moe_dispatch.backends.numba_backend import as_array

    q = md.quantize(torch.randn(1, 2, depth, generator=gen), quantize_format, **options)
    if q.scales.dtype == torch.uint8:  # e8m0: 2^-127 .. 2^-124
        q.scales.copy_(torch.randint(0, 4, q.scales.shape, generator=gen, dtype=torch.uint8))
    else:  # scales whose products are subnormal, after a normal one where there are several
        q.scales.mul_(2.0 ** -120).view(-1)[min(1, q.scales.numel() - 1):].mul_(2.0 ** -10)
    zeros = q.zeros.numpy() if q.zeros is not None else np.zeros((1, 1, 1), dtype=np.uint8)
    operands = (q.codes.view(torch.uint8).numpy(), q.scales.numpy(), zeros, q.zeros is not None, 0)
    expected = q.dequantize(torch.bfloat16)[0]
    assert (expected.float().abs() < torch.finfo(torch.float32).tiny).any() and expected.float().abs().max() > 0
    run = compiled_dequantize(fmt, features)
    for n in range(2):
        out = torch.full((depth,), float("nan"), dtype=torch.bfloat16)
        run(*operands, n, n // q.block[0], q.block[1], 0, as_array(out))
        assert torch.equal(out, expected[n])
