"""The expert MLP on quantized weights (moe_dispatch/formats/quantized.py), read as packed.

Each kernel task takes the weight rows it needs two at a time and dots them with every row of
its expert: the codes are read once per step, never a dense copy of the experts.

Where K and the scale groups come in whole steps of 32 codes, 64 for the 4-bit formats (every
real model), the dot products are packed_dots.py's vector code: fp8 codes against the float
activations, int8, int4 and mxfp4 codes against the activations quantized to int16 once per
step (16-bit activations only: float32 ones keep the float path, whose answer is exact in
float32), or 4-bit codes against bfloat16 activations as they are, where the CPU multiplies
bfloat16 pairs.

Elsewhere, a float path: each weight row turned into float32 in a buffer that stays in L1,
or, for experts with few rows, dotted straight from the codes. A row's conversion is one
loop per scale group over contiguous bytes, shifts and masks that vectorize: e4m3 and e2m1
codes are moved into the bits of a float16 (whose conversion to float32 is one instruction)
and rescaled by a power of two; the group's scale multiplies once per element, fetched once
per group. 4-bit rows come out split (even elements, then odd), the layout the split
activations of grouped_mm.py meet with contiguous loads.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import prange, types
from numba.extending import overload

from .activations import FusedActivation, activate_strip, is_gated
from .caching import njit
from .class_constants import class_constants
from .grouped_mm import FASTMATH, split_col
from .packed_dots import (E2M1_OFFSET, E4M3_BF16_DOTS, INT_LANES, NIBBLE_BF16_DOTS, SYMMETRIC_INT4_ZERO, bfloat16_rows,
                          e2m1_dequantize,
                          e2m1_dots, e4m3_dequantize, e4m3_dots, int4_dequantize, int4_dots, int8_dequantize,
                          int8_dots, lane_sums, nibble_depth, quantize_rows, reads_chunks, reads_wide_chunks)
from .mlp import BAD_INDEX, DECODE_OK, decode_inputs, gate_up_values, step_plan
from .scalars import half_value, holds_bfloat16, narrow, pow2
from .vector_width import wide_vectors


class QuantizedRows(NamedTuple):
    """A QuantizedWeight as the kernels read it; its class, one per format (ROWS_CLASSES), says
    which."""

    codes: np.ndarray  # [E, N, K] uint8 (int8 and e4m3 codes as their bytes), [E, N, K/2] for 4-bit
    scales: np.ndarray  # [E, ceil(N/rows), ceil(K/group)] float32, uint8 (e8m0) for mxfp4
    zeros: np.ndarray  # int4 zero points like scales, uint8; [1, 1, 1] when absent (zero 8)
    rows: int  # output rows per scale
    group: int  # K elements per scale
    has_zeros: bool
    split: bool  # 4-bit: rows come out split, and the activations must arrive so
    depth: int  # K


class Int8Rows(QuantizedRows):
    __slots__ = ()


class Int4Rows(QuantizedRows):
    __slots__ = ()


class Fp8Rows(QuantizedRows):
    __slots__ = ()


class Mxfp4Rows(QuantizedRows):
    __slots__ = ()


# A class per format, so that each kernel compiles for one format (class_constants.py).
ROWS_CLASSES = {"int8": Int8Rows, "int4": Int4Rows, "fp8": Fp8Rows, "mxfp4": Mxfp4Rows}
INT8, INT4, FP8, MXFP4 = range(len(ROWS_CLASSES))
# format_of(w): INT8, INT4, FP8 or MXFP4, the format of w (a QuantizedRows)
format_of, _code_of_type = class_constants({cls: code for code, cls in enumerate(ROWS_CLASSES.values())})


class QuantizedExperts(NamedTuple):
    w_gate_up: QuantizedRows
    b_gate_up: np.ndarray  # [E, W] float32, [1, 1] when absent
    has_b_gate_up: bool
    w_down: QuantizedRows
    b_down: np.ndarray  # [E, H] float32
    has_b_down: bool
    act: FusedActivation


@njit(cache=True, inline="always")
def scale_row(w, n):
    """The row of w's scales that weight row n takes: most formats have a scale row per weight
    row, and a division per dot product cost about a tenth of the fp8 and int4 decode kernels'
    time."""
    return n if w.rows == 1 else n // w.rows


# Each conversion takes two weight rows in one loop: two streams of codes in flight, as the
# kernels of mlp.py read two bfloat16 rows (int8 decode steps ran 1.3x faster than one row at
# a time).


@njit(cache=True, fastmath=FASTMATH, inline="always")
def _int8_values(codes_a, codes_b, s_a, s_b, out_a, out_b):
    for k in range(codes_a.shape[0]):
        out_a[k] = s_a * np.float32(np.int8(codes_a[k]))  # the byte as the int8 it was
        out_b[k] = s_b * np.float32(np.int8(codes_b[k]))


@njit(cache=True, fastmath=FASTMATH, inline="always")
def _e4m3_values(codes_a, codes_b, s_a, s_b, out_a, out_b):
    # e4m3's sign, exponent and mantissa, shifted into a float16's, are worth 2^-8 of it
    s_a *= np.float32(256.0)
    s_b *= np.float32(256.0)
    for k in range(codes_a.shape[0]):
        b = np.int32(codes_a[k])
        out_a[k] = s_a * half_value(((b & 0x80) << 8) | ((b & 0x7F) << 7))
        b = np.int32(codes_b[k])
        out_b[k] = s_b * half_value(((b & 0x80) << 8) | ((b & 0x7F) << 7))


@njit(cache=True, inline="always")
def _int4_zeros(w, e, row_a, row_b, g):
    """Group g's zero points of two rows: their own, or 8 (symmetric)."""
    if w.has_zeros:
        return np.float32(w.zeros[e, row_a, g]), np.float32(w.zeros[e, row_b, g])
    return np.float32(8.0), np.float32(8.0)


@njit(cache=True, fastmath=FASTMATH, inline="always")
def _int4_values(codes_a, codes_b, s_a, s_b, zero_a, zero_b, low_a, high_a, low_b, high_b):
    for j in range(codes_a.shape[0]):
        b = np.int32(codes_a[j])
        low_a[j] = s_a * (np.float32(b & 15) - zero_a)
        high_a[j] = s_a * (np.float32(b >> 4) - zero_a)
        b = np.int32(codes_b[j])
        low_b[j] = s_b * (np.float32(b & 15) - zero_b)
        high_b[j] = s_b * (np.float32(b >> 4) - zero_b)


MXFP4_SPAN = 16  # bytes per e8m0 scale: mxfp4's groups are 32 elements


@njit(cache=True, fastmath=FASTMATH, inline="always")
def _e2m1_values(codes_a, codes_b, scales_a, scales_b, low_a, high_a, low_b, high_b):
    # e2m1 shifted into a float16 is worth 2^-14 of it; that power of two and the scale's go
    # in two exact steps, so that no scale byte overflows float32 on the way. The constant
    # inner trip count lets LLVM turn each group into whole vector operations.
    up = np.float32(16384.0)
    for g in range(scales_a.shape[0]):
        s_a = pow2(np.int32(scales_a[g]) - 127)
        s_b = pow2(np.int32(scales_b[g]) - 127)
        for i in range(MXFP4_SPAN):
            j = g * MXFP4_SPAN + i
            b = np.int32(codes_a[j])
            low_a[j] = s_a * (up * half_value(((b & 0x08) << 12) | ((b & 0x07) << 9)))
            high_a[j] = s_a * (up * half_value(((b & 0x80) << 8) | ((b & 0x70) << 5)))
            b = np.int32(codes_b[j])
            low_b[j] = s_b * (up * half_value(((b & 0x08) << 12) | ((b & 0x07) << 9)))
            high_b[j] = s_b * (up * half_value(((b & 0x80) << 8) | ((b & 0x70) << 5)))


@njit(cache=True, fastmath=FASTMATH, inline="always")
def dequantize_pair(w, e, n_a, n_b, out_a, out_b):
    """out_a[:K], out_b[:K] = rows n_a and n_b of expert e's values as float32 (split for the
    4-bit formats). One loop per scale group over separate input and output runs: what LLVM
    vectorizes."""
    codes_a, codes_b = w.codes[e, n_a], w.codes[e, n_b]
    row_a, row_b = scale_row(w, n_a), scale_row(w, n_b)
    if format_of(w) == INT8 or format_of(w) == FP8:
        group = w.group
        for g in range(w.scales.shape[2]):
            k0, k1 = g * group, min((g + 1) * group, w.depth)
            s_a, s_b = np.float32(w.scales[e, row_a, g]), np.float32(w.scales[e, row_b, g])
            if format_of(w) == INT8:
                _int8_values(codes_a[k0:k1], codes_b[k0:k1], s_a, s_b, out_a[k0:k1], out_b[k0:k1])
            else:
                _e4m3_values(codes_a[k0:k1], codes_b[k0:k1], s_a, s_b, out_a[k0:k1], out_b[k0:k1])
    elif format_of(w) == INT4:
        half, span = w.depth // 2, w.group // 2
        for g in range(w.scales.shape[2]):
            j0, j1 = g * span, (g + 1) * span
            zero_a, zero_b = _int4_zeros(w, e, row_a, row_b, g)
            _int4_values(codes_a[j0:j1], codes_b[j0:j1], np.float32(w.scales[e, row_a, g]),
                         np.float32(w.scales[e, row_b, g]), zero_a, zero_b, out_a[j0:j1], out_a[half + j0:half + j1],
                         out_b[j0:j1], out_b[half + j0:half + j1])
    else:
        half = w.depth // 2
        _e2m1_values(codes_a, codes_b, w.scales[e, row_a], w.scales[e, row_b], out_a[:half], out_a[half:],
                     out_b[:half], out_b[half:])


# ---- dot products straight from the codes, for experts with few rows -------------------------
# An expert with one or two rows (a decode step gives most of them one) uses each converted
# weight once or twice: converting inside the dot product, with each group's partial sum scaled
# once, beats a round trip through the buffers (int8 2.5x, e4m3 2x, int4 1.5x in one thread).


@njit(cache=True, fastmath=FASTMATH, inline="always")
def _int8_dots(codes_a, codes_b, src):
    sum_a, sum_b = np.float32(0.0), np.float32(0.0)
    for k in range(codes_a.shape[0]):
        sum_a += np.float32(np.int8(codes_a[k])) * src[k]
        sum_b += np.float32(np.int8(codes_b[k])) * src[k]
    return sum_a, sum_b


@njit(cache=True, fastmath=FASTMATH, inline="always")
def _e4m3_dots(codes_a, codes_b, src):
    sum_a, sum_b = np.float32(0.0), np.float32(0.0)
    for k in range(codes_a.shape[0]):
        b = np.int32(codes_a[k])
        sum_a += half_value(((b & 0x80) << 8) | ((b & 0x7F) << 7)) * src[k]
        b = np.int32(codes_b[k])
        sum_b += half_value(((b & 0x80) << 8) | ((b & 0x7F) << 7)) * src[k]
    return np.float32(256.0) * sum_a, np.float32(256.0) * sum_b


@njit(cache=True, fastmath=FASTMATH, inline="always")
def _int4_dots(codes_a, codes_b, zero_a, zero_b, low, high):
    # low and high: the split activations' halves, separate arrays for LLVM to vectorize
    sum_a, sum_b = np.float32(0.0), np.float32(0.0)
    for j in range(codes_a.shape[0]):
        b = np.int32(codes_a[j])
        sum_a += (np.float32(b & 15) - zero_a) * low[j] + (np.float32(b >> 4) - zero_a) * high[j]
        b = np.int32(codes_b[j])
        sum_b += (np.float32(b & 15) - zero_b) * low[j] + (np.float32(b >> 4) - zero_b) * high[j]
    return sum_a, sum_b


@njit(cache=True, fastmath=FASTMATH, inline="always")
def dot_pair_codes(w, e, n_a, n_b, src):
    """(row n_a of expert e's values . src, row n_b's . src), the rows never written out; src
    [K] float32, split for the 4-bit formats. Each group's partial sums scaled once."""
    codes_a, codes_b = w.codes[e, n_a], w.codes[e, n_b]
    row_a, row_b = scale_row(w, n_a), scale_row(w, n_b)
    total_a, total_b = np.float32(0.0), np.float32(0.0)
    if format_of(w) == INT8 or format_of(w) == FP8:
        group = w.group
        for g in range(w.scales.shape[2]):
            k0, k1 = g * group, min((g + 1) * group, w.depth)
            if format_of(w) == INT8:
                part_a, part_b = _int8_dots(codes_a[k0:k1], codes_b[k0:k1], src[k0:k1])
            else:
                part_a, part_b = _e4m3_dots(codes_a[k0:k1], codes_b[k0:k1], src[k0:k1])
            total_a += np.float32(w.scales[e, row_a, g]) * part_a
            total_b += np.float32(w.scales[e, row_b, g]) * part_b
    elif format_of(w) == INT4:
        half, span = w.depth // 2, w.group // 2
        for g in range(w.scales.shape[2]):
            j0, j1 = g * span, (g + 1) * span
            zero_a, zero_b = _int4_zeros(w, e, row_a, row_b, g)
            part_a, part_b = _int4_dots(codes_a[j0:j1], codes_b[j0:j1], zero_a, zero_b, src[j0:j1],
                                        src[half + j0:half + j1])
            total_a += np.float32(w.scales[e, row_a, g]) * part_a
            total_b += np.float32(w.scales[e, row_b, g]) * part_b
    else:
        half = w.depth // 2
        low, high = src[:half], src[half:]
        up = np.float32(16384.0)  # e2m1 in float16 bits is worth 2^-14 of it
        for g in range(w.scales.shape[2]):
            part_a, part_b = np.float32(0.0), np.float32(0.0)
            for i in range(MXFP4_SPAN):
                j = g * MXFP4_SPAN + i
                b = np.int32(codes_a[j])
                part_a += (half_value(((b & 0x08) << 12) | ((b & 0x07) << 9)) * low[j]
                           + half_value(((b & 0x80) << 8) | ((b & 0x70) << 5)) * high[j])
                b = np.int32(codes_b[j])
                part_b += (half_value(((b & 0x08) << 12) | ((b & 0x07) << 9)) * low[j]
                           + half_value(((b & 0x80) << 8) | ((b & 0x70) << 5)) * high[j])
            total_a += pow2(np.int32(w.scales[e, row_a, g]) - 127) * (up * part_a)
            total_b += pow2(np.int32(w.scales[e, row_b, g]) - 127) * (up * part_b)
    return total_a, total_b


def format_dots(w, e, n_a, n_b, stride, pairs, src, packed, rows, start, count, out):
    """out[2p, j], out[2p + 1, j] = rows n_a + p * stride and n_b + p * stride of expert e's
    values . the activations of row rows[start + j], for p < pairs and j < count, by
    packed_dots.py's kernel of w's format: fp8 codes against src (float32) or, where it holds
    them, the bfloat16 bits in packed.ints; the others against packed.ints (int16), before the
    activations' scales."""
    x = src if format_of(w) == FP8 and packed.ints.shape[1] == 0 else packed.ints
    if format_of(w) in (INT8, FP8):
        x = x.view(np.int16) if x.dtype == np.uint16 else x
    _DOTS[format_of(w)](w.codes, w.scales, w.zeros, w.has_zeros, e, n_a, n_b, stride, pairs, w.rows, x,
                        packed.lane_sums, rows, start, count, w.group, out)


_DOTS = (int8_dots, int4_dots, e4m3_dots, e2m1_dots)  # by format code


@overload(format_dots, inline="always")
def _format_dots(w, e, n_a, n_b, stride, pairs, src, packed, rows, start, count, out):
    code = _code_of_type(w)
    if code is None:
        return None
    kernel = _DOTS[code]

    def impl(w, e, n_a, n_b, stride, pairs, src, packed, rows, start, count, out):
        kernel(w.codes, w.scales, w.zeros, w.has_zeros, e, n_a, n_b, stride, pairs, w.rows, packed.ints,
               packed.lane_sums, rows, start, count, w.group, out)

    def impl_int16(w, e, n_a, n_b, stride, pairs, src, packed, rows, start, count, out):
        kernel(w.codes, w.scales, w.zeros, w.has_zeros, e, n_a, n_b, stride, pairs, w.rows,
               packed.ints.view(np.int16), packed.lane_sums, rows, start, count, w.group, out)

    def impl_fp8(w, e, n_a, n_b, stride, pairs, src, packed, rows, start, count, out):
        if packed.ints.shape[1] != 0:  # bfloat16 activations, as bfloat16_rows
            kernel(w.codes, w.scales, w.zeros, w.has_zeros, e, n_a, n_b, stride, pairs, w.rows,
                   packed.ints.view(np.int16), packed.lane_sums, rows, start, count, w.group, out)
        else:
            kernel(w.codes, w.scales, w.zeros, w.has_zeros, e, n_a, n_b, stride, pairs, w.rows, src,
                   packed.lane_sums, rows, start, count, w.group, out)

    return impl_fp8 if code == FP8 else impl_int16 if code == INT8 else impl


class PackedInputs(NamedTuple):
    """The activations as packed_dots.py's kernels read them, when a step takes them."""

    taken: bool
    # 16-bit (activation_words): [rows, K] for int8 (element order), [rows, nibble_depth(K)] for
    # int4 and mxfp4 (nibble_order), int16 integers, or for the 4-bit formats the bfloat16 bits
    # of bfloat16 activations where NIBBLE_BF16_DOTS; for fp8 the bfloat16 bits of bfloat16
    # activations (bfloat16_rows) where E4M3_BF16_DOTS, else [0, 0]
    ints: np.ndarray
    scales: np.ndarray  # [rows] float32: the int16 rows' scales, [0] where none
    # mxfp4 and symmetric int4 codes on int16 ints: packed_dots.lane_sums of ints; else [0, 0, INT_LANES] int32
    lane_sums: np.ndarray


@njit(cache=True)
def packed_inputs(w, x, src, split):
    """Whether a decode step on activations x takes packed_dots.py's kernels for w, whose
    kernels read src [rows, K] float32 (split when split), and what they read: fp8 weights
    read src itself, or src rounded to bfloat16 where x is bfloat16 (the step's activations,
    which the reference rounds so too), the CPU has E4M3_BF16_DOTS and K comes in whole
    steps of 64; int4 and mxfp4 ones src rounded to bfloat16 so too where x is bfloat16 and
    the CPU has NIBBLE_BF16_DOTS; int8 ones, and the 4-bit ones elsewhere, src quantized to
    int16 (and, for mxfp4 and symmetric int4 codes, the int16 rows' lane_sums), where x is
    16-bit (float32 activations keep the float path) and src finite. K and w's groups must
    come in whole steps (reads_chunks, and reads_wide_chunks for the 4-bit formats)."""
    no_ints, no_scales = np.empty((0, 0), dtype=np.int16), np.empty(0, dtype=np.float32)
    no_sums = np.empty((0, 0, INT_LANES), dtype=np.int32)
    if not reads_chunks(w.depth, w.group) or w.split and not reads_wide_chunks(w.depth, w.group):
        return PackedInputs(False, activation_words(x, no_ints), no_scales, no_sums)
    if format_of(w) == FP8:
        if E4M3_BF16_DOTS and holds_bfloat16(x) and reads_wide_chunks(w.depth, w.group):
            bits = np.empty((src.shape[0], w.depth), dtype=np.int16)
            bfloat16_rows(src, split, bits)  # fp8 rows are never split
            return PackedInputs(True, activation_words(x, bits), no_scales, no_sums)
        return PackedInputs(True, activation_words(x, no_ints), no_scales, no_sums)
    if x.itemsize != 2:
        return PackedInputs(False, activation_words(x, no_ints), no_scales, no_sums)
    width = nibble_depth(w.depth) if split else w.depth
    ints = np.empty((src.shape[0], width), dtype=np.int16)
    if split and NIBBLE_BF16_DOTS and holds_bfloat16(x):
        bfloat16_rows(src, split, ints)
        return PackedInputs(True, activation_words(x, ints), no_scales, no_sums)
    scales = np.empty(src.shape[0], dtype=np.float32)
    if not quantize_rows(src, split, ints, scales):
        return PackedInputs(False, activation_words(x, ints), scales, no_sums)
    if not split or w.has_zeros:  # int4's own zero points come off each code
        return PackedInputs(True, activation_words(x, ints), scales, no_sums)
    zero = E2M1_OFFSET if format_of(w) == MXFP4 else SYMMETRIC_INT4_ZERO
    return PackedInputs(True, activation_words(x, ints), scales, lane_sums(ints, w.group, zero))


def activation_words(x, ints):
    """ints (int16) as the packed activations of a step on activations x: viewed as uint16
    where x is bfloat16 and the CPU has NIBBLE_BF16_DOTS, the type that tells the 4-bit
    kernels they hold bfloat16 bits (known when a step compiles: one kernel per step)."""
    return ints.view(np.uint16) if NIBBLE_BF16_DOTS and holds_bfloat16(x) else ints


@overload(activation_words, inline="always")
def _activation_words(x, ints):
    if NIBBLE_BF16_DOTS and x.dtype == types.uint16:
        return lambda x, ints: ints.view(np.uint16)
    return lambda x, ints: ints


# Called, not inlined: it runs once per block of rows, so a call costs little, and one compiled
# copy serves every call site (inlined at each, the decode kernels ran no faster). Its callers
# pass constants as np.int64: Numba types a bare constant by its value and compiles a copy of
# the callee per value (four copies of ~8 s each in a quantized decode step's first call).
@njit(cache=True, fastmath=FASTMATH)
def expert_dots(w, e, n_a, n_b, stride, pairs, src, source_rows, packed, start, direct, row_a, row_b, dots):
    """dots[2p, q], dots[2p + 1, q] = (row n_a + p * stride of expert e's values .
    src[source_rows[start + q]], row n_b + p * stride's . it) for p < pairs and q <
    dots.shape[1], by the step's path: packed_dots.py's kernels when the packed inputs are
    taken, else the float dot products from the codes (direct) or from the weight rows
    converted into row_a and row_b."""
    wide_vectors()
    count = dots.shape[1]
    if packed.taken:
        format_dots(w, e, n_a, n_b, stride, pairs, src, packed, source_rows, start, count, dots)
        if packed.scales.shape[0] != 0:  # the int16 activations' scales
            for q in range(count):
                scale = packed.scales[source_rows[start + q]]
                for p in range(2 * pairs):
                    dots[p, q] *= scale
    else:
        for p in range(pairs):
            c_a, c_b = n_a + p * stride, n_b + p * stride
            if not direct:
                dequantize_pair(w, e, c_a, c_b, row_a, row_b)
            for q in range(count):
                if direct:
                    dots[2 * p, q], dots[2 * p + 1, q] = dot_pair_codes(w, e, c_a, c_b, src[source_rows[start + q]])
                else:
                    dots[2 * p, q], dots[2 * p + 1, q] = _dot_pair(row_a, row_b, src[source_rows[start + q]])


# Rows per expert up to which the float path dots straight from the codes; above, each weight
# row is converted once into a buffer and dotted with every row. Not mxfp4: its e2m1
# conversion costs as much either way, and the buffers' loops run faster. (packed_dots.py
# converts each chunk once in registers for up to four rows at a time: it needs no buffer.)
DIRECT_ROWS = 2


@njit(cache=True, inline="always")
def reads_directly(w, num_rows):
    return num_rows <= DIRECT_ROWS and format_of(w) != MXFP4


@njit(cache=True, fastmath=FASTMATH)
def _dot_pair(row_a, row_b, src):
    wide_vectors()
    total_a = np.float32(0.0)
    total_b = np.float32(0.0)
    for k in range(row_a.shape[0]):
        total_a += row_a[k] * src[k]
        total_b += row_b[k] * src[k]
    return total_a, total_b


@njit(cache=True, parallel=True, fastmath=FASTMATH)
def gate_up_act(x, packed, token_of_row, w, bias, has_bias, offsets, experts, inter, act, block, save_h, h, split_a,
                a):
    """mlp.gate_up_act on a QuantizedRows w [E, W, H]: x [T, H] float32 (split when w.split),
    packed its PackedInputs, h [R, W] float32; the rest as there. Grid: A * ceil(I / block)
    tasks, one per (expert, block of columns)."""
    num_blocks = (inter + block - 1) // block
    step, shift = act.step, act.shift
    for task in prange(experts.shape[0] * num_blocks):
        wide_vectors()
        e = experts[task // num_blocks]
        i0 = (task % num_blocks) * block
        columns = min(block, inter - i0)
        start, end = offsets[e], offsets[e + 1]
        direct = reads_directly(w, end - start)
        buffered = 0 if direct or packed.taken else w.depth
        row_a, row_b = np.empty(buffered, dtype=np.float32), np.empty(buffered, dtype=np.float32)
        # Gated: column i's gate row with its up row. Plain: columns i and i + 1, an odd last
        # column (block is even: only at the end) with itself.
        pairs = columns if is_gated(act) else (columns + 1) // 2
        dots = np.zeros((2 * pairs, end - start), dtype=np.float32)
        if is_gated(act):
            expert_dots(w, e, i0 * step, i0 * step + shift, step, pairs, x, token_of_row, packed, start, direct, row_a,
                        row_b, dots)
        else:
            even = columns // 2
            expert_dots(w, e, i0, i0 + 1, np.int64(2), even, x, token_of_row, packed, start, direct, row_a, row_b, dots)
            if even < pairs:
                expert_dots(w, e, inter - 1, inter - 1, np.int64(0), np.int64(1), x, token_of_row, packed, start,
                            direct, row_a, row_b, dots[2 * even:])
        # Each row's sums by columns, then the activation over a row's columns at once: a loop
        # that vectorizes, where a call per element cost about 3 ns (exp).
        values = np.empty((2, end - start, pairs), dtype=np.float32)  # gated: gates, ups; plain: columns
        activated = np.empty(pairs, dtype=np.float32)
        for p in range(pairs):
            i = i0 + p if is_gated(act) else i0 + 2 * p
            col_a, col_b = (i * step, i * step + shift) if is_gated(act) else (i, min(i + 1, inter - 1))
            for q in range(end - start):
                values[0, q, p], values[1, q, p] = gate_up_values(dots, 2 * p, q, start + q, e, col_a, col_b, bias,
                                                                  has_bias, save_h, h)
        for q in range(end - start):
            for c in range(1 if is_gated(act) else 2):
                activate_strip(values[c, q], values[1, q], activated, pairs, act)
                for p in range(pairs):
                    # gated: column i0 + p; plain: i0 + 2p and the next (an odd last column: itself)
                    col = i0 + p if is_gated(act) else min(i0 + 2 * p + c, inter - 1)
                    a[start + q, split_col(col, inter, split_a)] = activated[p]


@njit(cache=True, parallel=True, fastmath=FASTMATH)
def down_combine(a, packed, w, bias, has_bias, offsets, experts, token_of_row, row_weight, block, out):
    """mlp.down_combine on a QuantizedRows w [E, H, I]: a [R, I] float32 (split when w.split),
    packed its PackedInputs, out [T, H] float32; the rest as there. Grid: ceil(H / block)
    tasks, each owning a block of output columns."""
    num_tokens, hidden = out.shape
    num_blocks = (hidden + block - 1) // block
    rows = np.arange(a.shape[0], dtype=np.int32)
    for task in prange(num_blocks):
        wide_vectors()
        c0 = task * block
        width = min(block, hidden - c0)
        acc = np.zeros((num_tokens, width), dtype=np.float32)
        buffered = 0 if packed.taken else w.depth
        row_c, row_d = np.empty(buffered, dtype=np.float32), np.empty(buffered, dtype=np.float32)
        # Columns s and s + half of the block together: two sequential streams of rows, as
        # mlp.down_combine reads them; an odd width's last column pairs with itself.
        half, even = (width + 1) // 2, width // 2
        for ei in range(experts.shape[0]):
            e = experts[ei]
            start, end = offsets[e], offsets[e + 1]
            dots = np.empty((2 * half, end - start), dtype=np.float32)
            direct = reads_directly(w, end - start)
            expert_dots(w, e, c0, c0 + half, np.int64(1), even, a, rows, packed, start, direct, row_c, row_d, dots)
            if even < half:
                expert_dots(w, e, c0 + even, c0 + even, np.int64(0), np.int64(1), a, rows, packed, start, direct,
                            row_c, row_d, dots[2 * even:])
            for s in range(half):
                c = c0 + s
                d = c + half if s < even else c
                for q in range(end - start):
                    t, weight = token_of_row[start + q], row_weight[start + q]
                    acc[t, c - c0] += weight * (dots[2 * s, q] + bias[e, c] if has_bias else dots[2 * s, q])
                    if d != c:
                        acc[t, d - c0] += weight * (dots[2 * s + 1, q] + bias[e, d] if has_bias else dots[2 * s + 1, q])
        for t in range(num_tokens):
            for c in range(width):
                out[t, c0 + c] = narrow(acc[t, c], out.dtype)


@njit(cache=True)
def moe_mlp_decode(x, weights, offsets, token_of_row, row_of_slot, experts, tiles, save_h, h, out):
    """mlp.moe_mlp_decode on QuantizedExperts (tiles: mlp.DecodeTiles, its column blocks): the
    whole step in one call. Returns DECODE_OK, or BAD_INDEX (nothing computed)."""
    w_gate_up, w_down = experts.w_gate_up, experts.w_down
    ok, x_wide, row_weight, active = decode_inputs(x, weights, offsets, token_of_row, row_of_slot, w_gate_up.split)
    if not ok:
        return BAD_INDEX
    inter = w_down.depth
    a = np.zeros((token_of_row.shape[0], inter), dtype=np.float32)
    # The kernels write float32 whatever x's type, narrowed below: they compile once per format,
    # not once per format and dtype (24 s each on a 2-core machine), for one pass over [T, H].
    h32, out32 = np.empty(h.shape, dtype=np.float32), np.empty(out.shape, dtype=np.float32)
    gate_up_act(x_wide, packed_inputs(w_gate_up, x, x_wide, w_gate_up.split), token_of_row, w_gate_up,
                experts.b_gate_up, experts.has_b_gate_up, offsets, active, inter, experts.act, tiles.block_gate_up,
                save_h, h32, w_down.split, a)
    down_combine(a, packed_inputs(w_down, x, a, w_down.split), w_down, experts.b_down, experts.has_b_down,
                 offsets, active, token_of_row, row_weight, tiles.block_down, out32)
    _narrow_into(h32, h)
    _narrow_into(out32, out)
    return DECODE_OK


@njit(cache=True, inline="always")
def _narrow_into(src, dst):
    for i in range(src.shape[0]):
        for j in range(src.shape[1]):
            dst[i, j] = narrow(src[i, j], dst.dtype)


@njit(cache=True)
def moe_mlp_decode_ids(x, weights, ids, routing, num_experts, rows_limit, experts, tiles, out):
    """mlp.moe_mlp_decode_ids on QuantizedExperts: the plan and the step in one call. Returns
    decode_plan's status: nothing is computed unless it is 0."""
    status, offsets, token_of_row, row_of_slot = step_plan(x, weights, ids, routing, num_experts, rows_limit)
    if status:
        return status
    # save_h a runtime false, so that moe_mlp_decode compiles once for both entry points
    moe_mlp_decode(x, weights, offsets, token_of_row, row_of_slot, experts, tiles, status != 0,
                   np.empty((0, experts.w_gate_up.codes.shape[1]), dtype=out.dtype), out)
    return 0



def dequantize_row(w, e, n, first, out):
    """out[:] = elements first:first + len(out) of row n of expert e's values, in out's type
    (packed_dots.py; K, the groups, first and len(out) in whole chunks)."""
    _DEQUANTIZE[format_of(w)](w.codes, w.scales, w.zeros, w.has_zeros, e, n, scale_row(w, n), w.group, first, out)


_DEQUANTIZE = (int8_dequantize, int4_dequantize, e4m3_dequantize, e2m1_dequantize)  # by format code


@overload(dequantize_row, inline="always")
def _dequantize_row(w, e, n, first, out):
    code = _code_of_type(w)
    if code is None:
        return None
    kernel = _DEQUANTIZE[code]

    def impl(w, e, n, first, out):
        kernel(w.codes, w.scales, w.zeros, w.has_zeros, e, n, scale_row(w, n), w.group, first, out)

    return impl


@njit(cache=True, nogil=True, fastmath=FASTMATH)
def dequantize_experts(w, experts, out):
    """out[i] = the values of expert experts[i] of w, [N, K] in out's type (16-bit as bits):
    packed_dots.py's vector code where K and the groups come in whole chunks, else the float
    path. One thread, without the GIL: the blocked path's threads each dequantize their own
    expert (backends/expert_threads.py)."""
    wide_vectors()
    half = w.depth // 2
    rows = np.empty((2, w.depth), dtype=np.float32)
    for i in range(experts.shape[0]):
        if reads_chunks(w.depth, w.group):
            for n in range(w.codes.shape[1]):
                dequantize_row(w, experts[i], n, 0, out[i, n])
            continue
        for n in range(0, w.codes.shape[1], 2):
            m = min(n + 1, w.codes.shape[1] - 1)  # an odd count's last row pairs with itself
            dequantize_pair(w, experts[i], n, m, rows[0], rows[1])
            for p in range(2 if m != n else 1):
                row, target = rows[p], out[i, n + p]
                if w.split:  # back in order: the even elements are the row's first half
                    for j in range(half):
                        target[2 * j] = narrow(row[j], out.dtype)
                        target[2 * j + 1] = narrow(row[half + j], out.dtype)
                else:
                    for k in range(w.depth):
                        target[k] = narrow(row[k], out.dtype)
