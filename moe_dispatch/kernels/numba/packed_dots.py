"""Dot products of two rows of packed weight codes with a few activation rows, written as LLVM
vector code (Numba intrinsics): what a decode step spends its time on.

Converting each code to float32 with scalar-looking loops left LLVM three or more
instructions per 16 weights, which made a 4-bit decode step compute-bound at a fifth of the
memory's speed. Here each step's codes (32 to 128) are converted in registers and meet every
activation row of a pass before the next step's are read:

- int8 and 4-bit codes become 16-bit integers and one multiply-add of 16-bit pairs into
  32-bit lanes (x86's pmaddwd, fused with the add where the CPU has AVX512-VNNI) takes 32 of
  them against activations quantized to int16. int8: a sign extension of 32 bytes. 4-bit: 64
  bytes, 128 codes a step, as four vectors of 16-bit words by masks and shifts alone (each
  word of codes holds the elements 4i to 4i + 3; e2m1's nibbles are first looked up in a
  16-entry table of their values doubled, pshufb), against activation rows laid out in the
  same order (nibble_order). On Zen 5 a core issues two 512-bit operations a cycle and the
  multiply-adds share their unit with vgf2p8affineqb and the FMAs: unpacking by shuffles or
  byte shifts had cost as much as the products. The codes go in as unsigned integers; their
  zero point (symmetric int4's 8, or an offset that keeps e2m1's values positive) times the
  activations each lane met (lane_sums, made once per decode step) comes off once per span,
  int4's own zero points off each code. The 32-bit sums turn into float32 once per scale
  group, or per step where a step holds several (lane l of a step meets its elements 8l to
  8l + 7), where the scales multiply.
- 4-bit codes against bfloat16 activations, on CPUs with AVX512-BF16 and AVX512-BW: the same
  words and order, each code looked up as its bfloat16 value (vpermw reads the low 5 bits of
  a word: three shifts and four lookups a step, no masks), and the pairs' products summed in
  float32 (vdpbf16ps) against the activations' own bits: a span's flush is one FMA, where the
  integer sums' took their lane sums off and a conversion too.
- e4m3 codes against bfloat16 activations, on CPUs with AVX512-BF16 and AVX512-VBMI: each 64
  codes' bfloat16 bits looked up by byte (vpermi2b), then products of bfloat16 pairs against
  the activations' own bits (vdpbf16ps), half the instructions of the float route.
  Elsewhere e4m3 codes become float16 bits (sign, exponent and mantissa shifted into place,
  worth 2^-8 of the value, subnormals included) and float32 in one conversion, then fused
  multiply-adds against float32 activations.

Elsewhere the activation rows of the integer formats are quantized once per step, one scale per
row (its largest magnitude over 32767): each element moves by at most 2^-16 of the row's
largest, which leaves the dot products' error well below the rounding of bfloat16 or float16
activations.

Each function below is plain Python (numpy), which is what NUMBA_DISABLE_JIT=1 runs, with an
overload that compiles the vector code in its place. x86 CPUs with AVX2 get pmaddwd and pshufb;
other CPUs get the same arithmetic in generic vector IR, which LLVM lowers as it can.
"""

from __future__ import annotations

import functools

import llvmlite.binding as llvm
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from .caching import njit
from .vector_width import host_cpu_features

CHUNK = 32  # bytes of codes read per step: 32 int8 or e4m3 codes
WIDE = 2 * CHUNK  # bfloat16 pairs of fp8's steps
NIBBLE_STEP = 4 * CHUNK  # 4-bit codes per step: 64 bytes, one AVX-512 load
INT_LANES = CHUNK // 2  # int32 lanes of one pmaddwd
# Elements summed in int32 lanes before a flush to float32: each lane adds two products per
# int8 step, |int8 code * int16| <= 128 * 32767 (four per 4-bit step, |code| <= 15), so 2048
# elements keep a lane below 2^30.
FLUSH = 2048
INT16_MAX = 32767
E2M1_DOUBLED = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], dtype=np.int8)
SYMMETRIC_INT4_ZERO = 8
# The 4-bit kernels take e2m1 codes as their doubled values plus this, never negative, and take
# its part of the products off as symmetric int4's zero (lane_sums)
E2M1_OFFSET = 12
# Activation rows per pass over the codes: each chunk of two weight rows, once converted,
# meets this many; 2 x 4 sums and as many partial sums still fit AVX-512's registers.
ROWS_PER_PASS = 4


@njit(cache=True, inline="always")
def reads_chunks(depth, group):
    """Whether rows of this depth and scale group size can take these kernels."""
    return depth % CHUNK == 0 and group % CHUNK == 0


@njit(cache=True, inline="always")
def reads_wide_chunks(depth, group):
    """Whether rows of this depth and scale group size can take the 4-bit dot products (and
    fp8's on bfloat16 activations): K in whole steps of 64, groups of 32, 64 or 128 (every
    group size of int4, mxfp4 and fp8)."""
    return depth % WIDE == 0 and (group == CHUNK or group == WIDE or group == NIBBLE_STEP)


@njit(cache=True, inline="always")
def nibble_depth(depth):
    """The width of the 4-bit kernels' activation rows for K = depth: whole steps."""
    return -(-depth // NIBBLE_STEP) * NIBBLE_STEP


def nibble_order(depth):
    """The element of a row of depth (a multiple of WIDE) at each position of the 4-bit
    kernels' activation layout (nibble_depth(depth) wide): in each step of NIBBLE_STEP
    elements from b, the elements b + 4i for i < 32, then b + 4i + 1, b + 4i + 2 and b + 4i +
    3, the order in which a step's 16-bit words give up their nibbles. Positions past the
    row's end hold depth (they are zeros)."""
    p = np.arange(nibble_depth(depth))
    q = p % NIBBLE_STEP
    element = p - q + 4 * (q % CHUNK) + q // CHUNK
    return np.where(element < depth, element, depth)


@njit(cache=True)
def quantize_rows(src, split, out, scales):
    """out[r] = src[r] / scales[r] rounded to int16, scales[r] = max |src[r]| / 32767; src
    [R, K] float32. split: src holds each row's even elements, then its odd ones, and out
    [R, nibble_depth(K)] takes the 4-bit kernels' layout (nibble_order, zeros past K; K a
    multiple of WIDE); else both are in element order. Returns False, leaving the rest
    undefined, when a row holds a value that is not finite: integers cannot carry it, and the
    float path must compute it."""
    depth = src.shape[1]
    # The largest magnitude as the largest of the values' bits less the sign: an integer
    # maximum, which LLVM vectorizes (a float one only where NaNs may be assumed away), and
    # those bits order magnitudes as the values do, infinities and NaNs above every number.
    # (The loop ran 11x faster at 128 rows of 1024.)
    bits, peak_bits = src.view(np.uint32), np.empty(1, dtype=np.uint32)
    for r in range(src.shape[0]):
        row = src[r]
        top = np.uint32(0)
        for k in range(depth):
            top = max(top, bits[r, k] & np.uint32(0x7FFFFFFF))
        if top >= np.uint32(0x7F800000):  # an infinity or a NaN
            return False
        peak_bits[0] = top
        peak = peak_bits.view(np.float32)[0]
        scales[r] = peak / np.float32(INT16_MAX)
        inverse = np.float32(INT16_MAX) / peak if peak > 0 else np.float32(0.0)
        if split:
            _in_nibble_order(row, out[r], inverse, False)
            continue
        for k in range(depth):
            out[r, k] = np.int16(np.rint(row[k] * inverse))
    return True


@njit(cache=True)
def bfloat16_rows(src, split, out):
    """out = the bits of src (float32 [R, K]) rounded to bfloat16, as int16: the activations of
    e4m3_dots, and of the 4-bit kernels, on bfloat16 ones. split as for quantize_rows."""
    words = out.view(np.uint16)
    for r in range(src.shape[0]):
        if split:
            _in_nibble_order(src[r], out[r], np.float32(0.0), True)
            continue
        row, target = src[r].view(np.uint32), words[r]
        for k in range(row.shape[0]):
            target[k] = _bfloat16_bits(row[k])


@njit(cache=True, inline="always")
def _bfloat16_bits(v):
    """The bits v (uint32) of a float32 rounded to bfloat16's, uint16: to nearest even, a NaN
    to the quiet one, as narrow rounds, with a select where narrow branches (loops of it
    vectorize)."""
    nearest = (v + np.uint32(0x7FFF) + ((v >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    return np.uint16(0x7FC0) if v & np.uint32(0x7FFFFFFF) > np.uint32(0x7F800000) else np.uint16(nearest)


@njit(cache=True, inline="always")
def _in_nibble_order(row, target, inverse, to_bfloat16):
    """target (int16, nibble_depth(K)) = row (float32 [K], its even elements, then its odd
    ones) in nibble_order, zeros past K: each element times inverse rounded to int16, or its
    bfloat16 bits where to_bfloat16."""
    depth, half = row.shape[0], row.shape[0] // 2
    # Each pair of neighbouring elements read as one word: loops that read every other
    # element did not vectorize (128 rows of 512 took 85 us in bfloat16)
    pairs = row.view(np.uint64)
    for b in range(0, depth, NIBBLE_STEP):
        # nibble_order's element b + 4i + m is row[b / 2 + 2i + m / 2] (+ half if m is odd),
        # for i < 16 in a last half step, whose other positions are zeros: elements m and
        # m + 2 are the pair at b / 2 + 2i (+ half)
        count = min(CHUNK, (depth - b) // 4)
        if count < CHUNK:
            target[b:b + NIBBLE_STEP] = 0
        for m in range(2):
            first = b // 2 + (half if m else 0)
            # views indexed by the loop's own counter: an index computed from several terms
            # took a negative index's wraparound on every access
            at = b + m * CHUNK
            low, high = target[at:at + count], target[at + 2 * CHUNK:at + 2 * CHUNK + count]
            if to_bfloat16:
                low_words, high_words, source = low.view(np.uint16), high.view(np.uint16), pairs[first // 2:]
                for i in range(count):
                    low_words[i] = _bfloat16_bits(np.uint32(source[i] & np.uint64(0xFFFFFFFF)))
                    high_words[i] = _bfloat16_bits(np.uint32(source[i] >> np.uint64(32)))
            else:
                source = row[first:]
                for i in range(count):
                    low[i] = np.int16(np.rint(source[2 * i] * inverse))
                    high[i] = np.int16(np.rint(source[2 * i + 1] * inverse))


def sums_zero(fmt, has_zeros):
    """The zero point that fmt's codes give up through lane_sums: symmetric int4's
    (SYMMETRIC_INT4_ZERO), e2m1's E2M1_OFFSET; 0 where none does (int8, e4m3, int4's own zero
    points, which come off each code)."""
    if fmt == "e2m1":
        return E2M1_OFFSET
    return SYMMETRIC_INT4_ZERO if fmt == "int4" and not has_zeros else 0


@njit(cache=True)
def lane_sums(ints, group, zero):
    """out[r, f, l] = zero times the sum of the activations of row r (int16, in nibble_order)
    that int32 lane l of the 4-bit kernels' partial sums meets in span f (a scale group, or a
    step of several): elements 8l to 8l + 7 of each of its steps. What codes whose zero point
    is zero (symmetric int4's 8, E2M1_OFFSET) take from the lane, for the kernels to subtract
    once per span instead of from every code. out: int32 [R, nibble_depth(K) / max(group,
    NIBBLE_STEP), INT_LANES]."""
    span = max(group, NIBBLE_STEP)
    out = np.empty((ints.shape[0], ints.shape[1] // span, INT_LANES), dtype=np.int32)
    positions = np.empty(CHUNK, dtype=np.int32)
    for r in range(ints.shape[0]):
        for f in range(ints.shape[1] // span):
            # lane l meets positions 2l and 2l + 1 of each of a step's four runs of 32: the runs
            # summed position by position (contiguous, a loop that vectorizes), then the pairs
            positions[:] = 0
            for b in range(f * span, (f + 1) * span, NIBBLE_STEP):
                step = ints[r, b:b + NIBBLE_STEP]
                for p in range(CHUNK):
                    positions[p] += (np.int32(step[p]) + np.int32(step[CHUNK + p]) + np.int32(step[2 * CHUNK + p])
                                     + np.int32(step[3 * CHUNK + p]))
            target = out[r, f]
            for lane in range(INT_LANES):
                target[lane] = zero * (positions[2 * lane] + positions[2 * lane + 1])
    return out


# ---- the definition, in numpy ----------------------------------------------------------------


def _code_values(fmt, codes, zeros, has_zeros, group):
    """The values of a row of codes in element order (e2m1 doubled, e4m3 exact)."""
    if fmt == "int8":
        return codes.view(np.int8).astype(np.int64)
    if fmt == "e4m3":
        import torch  # the definition of e4m3 is torch's float8_e4m3fn

        return torch.from_numpy(codes.copy()).view(torch.float8_e4m3fn).double().numpy()
    nibbles = np.stack([codes & 15, codes >> 4], axis=1).reshape(-1).astype(np.int64)
    if fmt == "e2m1":
        return E2M1_DOUBLED[nibbles].astype(np.int64)
    zero = np.repeat(zeros.astype(np.int64), group)[: nibbles.shape[0]] if has_zeros else 8
    return nibbles - zero


def _scale_values(scales):
    if scales.dtype == np.uint8:  # e8m0
        return np.ldexp(np.float32(1.0), scales.astype(np.int32) - 127).astype(np.float32)
    return scales


def _dots(fmt, codes, scales, zeros, has_zeros, e, n_a, n_b, stride, pairs, per_scale, x, rows, start, count, group,
          out):
    depth = 2 * codes.shape[2] if fmt in ("int4", "e2m1") else x.shape[1]
    starts = np.arange(0, depth, group)
    in_order = np.arange(depth)
    if fmt in ("int4", "e2m1"):  # the position of each element in nibble_order
        order = nibble_order(depth)
        in_order[order[order < depth]] = np.flatnonzero(order < depth)
    if x.dtype == np.uint16 or fmt == "e4m3" and x.dtype == np.int16:  # bfloat16 bits
        x = (x.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    for p in range(pairs):
        for i, first_row in enumerate((n_a, n_b)):
            n = first_row + p * stride
            s = n // per_scale
            values = _code_values(fmt, codes[e, n], zeros[e, s] if has_zeros else None, has_zeros, group)
            if x.dtype == np.float32:  # exact in float64, as the activations' products
                values = values.astype(np.float64)
            for j in range(count):
                activations = x[rows[start + j]][in_order].astype(np.float32).astype(values.dtype)
                per_group = np.add.reduceat(values * activations, starts).astype(np.float32)
                total = np.dot(per_group, _scale_values(scales[e, s])[: per_group.shape[0]])
                out[2 * p + i, j] = np.float32(total * (0.5 if fmt == "e2m1" else 1.0))


def int8_dots(codes, scales, zeros, has_zeros, e, n_a, n_b, stride, pairs, per_scale, x, x_sums, rows, start,
              count, group, out):
    """out[2p, j] = sum_g scales[e, s, g] * (codes[e, n] . x[rows[start + j]] over group g) for
    n = n_a + p * stride and s = n // per_scale, out[2p + 1, j] the same from n_b, for p <
    pairs and j < count: codes the int8 bytes [E, N, K], scales [E, *, ceil(K/group)] float32
    (or e8m0 bytes, uint8), x int16 [T, K], rows int32, out float32 [>= 2 pairs, >= count]; K
    and group multiples of CHUNK. The zeros and x_sums arguments are unused (int4's
    signature)."""
    _dots("int8", codes, scales, zeros, has_zeros, e, n_a, n_b, stride, pairs, per_scale, x, rows, start, count, group,
          out)


def int4_dots(codes, scales, zeros, has_zeros, e, n_a, n_b, stride, pairs, per_scale, x, x_sums, rows, start,
              count, group, out):
    """int8_dots for 4-bit codes [E, N, K/2] (low nibble first) less their zero points (zeros
    uint8 like scales when has_zeros, else 8), x [T, nibble_depth(K)] in nibble_order: int16,
    or bfloat16 bits as uint16 (NIBBLE_BF16_DOTS); reads_wide_chunks(K, group). x_sums:
    lane_sums(x, group, SYMMETRIC_INT4_ZERO) of int16 x, which the vector code takes symmetric
    codes' zero part of the products from (read only where has_zeros is false)."""
    _dots("int4", codes, scales, zeros, has_zeros, e, n_a, n_b, stride, pairs, per_scale, x, rows, start, count, group,
          out)


def e2m1_dots(codes, scales, zeros, has_zeros, e, n_a, n_b, stride, pairs, per_scale, x, x_sums, rows, start,
              count, group, out):
    """int4_dots for e2m1 codes [E, N, K/2] (low nibble first); x_sums: lane_sums(x, group,
    E2M1_OFFSET) of int16 x."""
    _dots("e2m1", codes, scales, zeros, has_zeros, e, n_a, n_b, stride, pairs, per_scale, x, rows, start, count, group,
          out)


def e4m3_dots(codes, scales, zeros, has_zeros, e, n_a, n_b, stride, pairs, per_scale, x, x_sums, rows, start,
              count, group, out):
    """int8_dots for e4m3 codes [E, N, K] against float activations x [T, K] (float32, or
    float64 rounded to float32), or against bfloat16 ones: x their bits (int16),
    reads_wide_chunks(K, group); x_sums unused."""
    _dots("e4m3", codes, scales, zeros, has_zeros, e, n_a, n_b, stride, pairs, per_scale, x, rows, start, count, group,
          out)


# ---- the vector code -------------------------------------------------------------------------

I8, I16, I32, F16, F32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.HalfType(), ir.FloatType()


class _BFloat16Type(ir.types._BaseFloatType):
    """LLVM's bfloat, which llvmlite does not name."""

    null = "0.0"
    intrinsic_name = "bf16"

    def __str__(self):
        return "bfloat"


_BFloat16Type._create_instance()
BF16 = _BFloat16Type()


def _vec(element, n=CHUNK):
    return ir.VectorType(element, n)


def _const(element, values, n=CHUNK):
    return ir.Constant(_vec(element, n), list(values) if hasattr(values, "__len__") else [values] * n)


def _broadcast(builder, value, n):
    v = builder.insert_element(ir.Constant(_vec(value.type, n), ir.Undefined), value, ir.Constant(I32, 0))
    return builder.shuffle_vector(v, v, _const(I32, 0, n))


def _load(builder, data, index, vector_type):
    return builder.load(builder.bitcast(builder.gep(data, [index]), vector_type.as_pointer()), align=1)


def _intrinsic_call(builder, name, result, operands):
    fn = builder.module.declare_intrinsic(name, fnty=ir.FunctionType(result, [o.type for o in operands]))
    return builder.call(fn, operands)


def _chunk_bytes(builder, data, chunk, count):
    return _load(builder, data, builder.mul(chunk, ir.Constant(chunk.type, count)), _vec(I8, count))


_EVEN, _ODD = _const(I32, range(0, CHUNK, 2), INT_LANES), _const(I32, range(1, CHUNK, 2), INT_LANES)


def _int8_values(builder, data, chunk, cpu):
    return [builder.sext(_chunk_bytes(builder, data, chunk, CHUNK), _vec(I16))]


def _nibble_words(builder, data, chunk):
    """32 4-bit codes as 16-bit words in element order: each byte widened to a 32-bit lane
    holding its low nibble in the lane's low 16 bits and its high nibble in the high 16 bits
    (a mask and a shift, no shuffle)."""
    wide = builder.zext(_chunk_bytes(builder, data, chunk, INT_LANES), _vec(I32, INT_LANES))
    low = builder.and_(wide, _const(I32, 0x0F, INT_LANES))
    high = builder.shl(builder.and_(wide, _const(I32, 0xF0, INT_LANES)), _const(I32, 12, INT_LANES))
    return builder.bitcast(builder.or_(low, high), _vec(I16))


def _e2m1_doubled(builder, codes):
    """e2m1 codes (each below 16) as their values doubled, in the codes' integer type."""
    kind = codes.type

    def const(value):
        return ir.Constant(kind, [value] * kind.count)

    magnitude = builder.and_(codes, const(7))  # doubled: 0, 1, 2, 3, then 4, 6, 8, 12

    def below(limit):
        return builder.icmp_unsigned("<", magnitude, const(limit))

    twice = builder.sub(builder.shl(magnitude, const(1)), const(4))
    four_times = builder.sub(builder.shl(magnitude, const(2)), const(16))
    value = builder.select(below(4), magnitude, builder.select(below(6), twice, four_times))
    negative = builder.icmp_unsigned("!=", builder.and_(codes, const(8)), const(0))
    return builder.select(negative, builder.neg(value), value)


def _step_bytes(builder, data, chunk, limit):
    """The 64 bytes of 4-bit step chunk; where limit (the row's bytes) is given, the step may
    end past the row, by half (K a multiple of 64 only): its last 32 bytes are then zeros,
    never read."""
    if limit is None:
        return _chunk_bytes(builder, data, chunk, WIDE)
    start = builder.mul(chunk, ir.Constant(chunk.type, WIDE))
    whole = builder.icmp_signed("<=", builder.add(start, ir.Constant(start.type, WIDE)), limit)
    result = cgutils.alloca_once(builder, _vec(I8, WIDE))
    with builder.if_else(whole, likely=True) as (full, half):
        with full:
            builder.store(_load(builder, data, start, _vec(I8, WIDE)), result)
        with half:
            first = _load(builder, data, start, _vec(I8, CHUNK))
            builder.store(builder.shuffle_vector(first, ir.Constant(_vec(I8, CHUNK), None),
                                                 _const(I32, range(WIDE), WIDE)), result)
    return builder.load(result)


def _looked_up(builder, table, codes, cpu):
    """Each byte of codes (<64 x i8>, each below 16) looked up in the 16-byte table: pshufb."""
    if "+avx512bw" in cpu:
        return _intrinsic_call(builder, "llvm.x86.avx512.pshuf.b.512", _vec(I8, WIDE),
                               [_const(I8, list(table) * 4, WIDE), codes])
    if "+avx2" in cpu:
        halves = [builder.shuffle_vector(codes, codes, _const(I32, range(h, h + CHUNK))) for h in (0, CHUNK)]
        parts = [_intrinsic_call(builder, "llvm.x86.avx2.pshuf.b", _vec(I8), [_const(I8, list(table) * 2), h])
                 for h in halves]
        return builder.shuffle_vector(parts[0], parts[1], _const(I32, range(WIDE), WIDE))
    return None


def _nibble_values(fmt):
    """The values function of fmt's _NibbleKind: a step's 128 codes as four <32 x i16> of
    integers (int4's codes, less zero where given (its word i's zero point), e2m1's doubled
    values plus E2M1_OFFSET), the elements 4i, 4i + 1, 4i + 2 and 4i + 3 of the step
    (nibble_order). Masks and shifts of the bytes and of 16-bit words, which run beside the
    multiply-adds, where unpacking by shuffles or vgf2p8affineqb took the multiply-adds' own
    unit."""
    table = (E2M1_DOUBLED.astype(np.int64) + E2M1_OFFSET).tolist()

    def values(builder, data, chunk, cpu, zero=None, limit=None):
        codes = _step_bytes(builder, data, chunk, limit)
        words = builder.bitcast(codes, _vec(I16))
        low = builder.and_(codes, _const(I8, 0x0F, WIDE))  # byte j's even element, 2j
        high = builder.and_(builder.bitcast(builder.lshr(words, _const(I16, 4)), _vec(I8, WIDE)),
                            _const(I8, 0x0F, WIDE))  # and its odd one, 2j + 1
        if fmt == "e2m1":
            looked_up = [_looked_up(builder, table, n, cpu) for n in (low, high)]
            if looked_up[0] is None:
                offset = _const(I8, E2M1_OFFSET, WIDE)
                looked_up = [builder.add(_e2m1_doubled(builder, n), offset) for n in (low, high)]
            low, high = looked_up
        # word i of low holds elements 4i (its low byte) and 4i + 2, of high 4i + 1 and 4i + 3
        low, high = (builder.bitcast(n, _vec(I16)) for n in (low, high))
        byte, eight = _const(I16, 0xFF), _const(I16, 8)
        words = [builder.and_(low, byte), builder.and_(high, byte), builder.lshr(low, eight), builder.lshr(high, eight)]
        return words if zero is None else [builder.sub(w, zero) for w in words]

    return values


def _e4m3_values(builder, data, chunk, cpu):
    # Sign-extended and shifted by 7, a code has its sign in bits 15 and 14 and its exponent and
    # mantissa in 13..7: clearing bit 14 leaves float16 bits (three instructions per 32 codes).
    wide = builder.shl(builder.sext(_chunk_bytes(builder, data, chunk, CHUNK), _vec(I16)), _const(I16, 7))
    bits = builder.and_(wide, _const(I16, 0xBF80 - 0x10000))
    return [builder.fpext(builder.bitcast(bits, _vec(F16)), _vec(F32))]


def _ordered_values(builder, fmt, data, chunk, zero, cpu):
    """32 codes from element 32 * chunk on, in element order, as the dequantization reads them:
    16-bit integers (zero: int4's, <32 x i16>), or float32 for e4m3."""
    if fmt in ("int8", "e4m3"):
        return _KINDS[fmt].values(builder, data, chunk, cpu)[0]
    words = _nibble_words(builder, data, chunk)
    return builder.sub(words, zero) if fmt == "int4" else _e2m1_doubled(builder, words)


def _multiply_add_pairs(builder, a, b, cpu):
    """[a[2i] * b[2i] + a[2i+1] * b[2i+1] for i < 16] as int32: pmaddwd."""
    if "+avx512bw" in cpu:
        return _intrinsic_call(builder, "llvm.x86.avx512.pmaddw.d.512", _vec(I32, INT_LANES), [a, b])
    if "+avx2" in cpu:
        halves = [_const(I32, range(0, INT_LANES), INT_LANES), _const(I32, range(INT_LANES, CHUNK), INT_LANES)]
        parts = [_intrinsic_call(builder, "llvm.x86.avx2.pmadd.wd", _vec(I32, INT_LANES // 2),
                                 [builder.shuffle_vector(a, a, h), builder.shuffle_vector(b, b, h)]) for h in halves]
        return builder.shuffle_vector(parts[0], parts[1], _const(I32, range(INT_LANES), INT_LANES))

    def products(select):
        return builder.mul(*(builder.sext(builder.shuffle_vector(v, v, select), _vec(I32, INT_LANES)) for v in (a, b)))

    return builder.add(products(_EVEN), products(_ODD))


class _IntegerKind:
    """int8 codes against int16 activations: 32-bit partial sums. values gives a step's codes as
    vectors of 32, load_x the activations they meet, in the same order."""

    lanes = INT_LANES
    partial_type = _vec(I32, INT_LANES)
    activation_types = (types.int16,)
    span = step_bytes = CHUNK
    codes_per_byte = chains = 1
    half_steps = False  # whether K may end half-way through a step
    zero_from_sums = False  # whether a zero point common to the codes comes off through lane_sums
    result_factor = 1.0
    values = staticmethod(_int8_values)

    def load_x(self, builder, row, element, offset):
        return [_load(builder, row, offset, _vec(I16))]

    def multiply_add(self, builder, partial, w, x, cpu):
        return builder.add(partial, _multiply_add_pairs(builder, w, x, cpu))

    def merge(self, builder, partials):
        return functools.reduce(builder.add, partials)

    def to_float(self, builder, partial):
        return builder.sitofp(partial, _vec(F32, INT_LANES))


class _NibbleKind(_IntegerKind):
    """int4 and e2m1 codes, 128 a step, as unsigned 16-bit integers against int16 activations
    in nibble_order: lane l of a step's 32-bit partial sums meets its elements 8l to 8l + 7.
    A zero point common to all codes (symmetric int4's, E2M1_OFFSET) comes off once per span:
    its product with the activations' lane_sums; int4's own come off each code. Each step's
    four multiply-adds sum into two partials (chains): one sum waiting on the last
    multiply-add left a row's pass waiting on their latency (one core in cache at one row:
    int4 1.06x, mxfp4 1.09x)."""

    span = NIBBLE_STEP
    step_bytes = NIBBLE_STEP // 2
    codes_per_byte = chains = 2
    half_steps = True
    zero_from_sums = True

    def __init__(self, fmt, result_factor):
        self.values, self.result_factor = _nibble_values(fmt), result_factor

    def load_x(self, builder, row, element, offset):
        return [_load(builder, row, builder.add(offset, ir.Constant(offset.type, h)), _vec(I16))
                for h in range(0, NIBBLE_STEP, CHUNK)]


class _FloatKind:
    """e4m3 codes against float activations: float32 partial sums."""

    lanes = CHUNK
    span = step_bytes = CHUNK
    codes_per_byte = chains = 1
    half_steps = zero_from_sums = False
    partial_type = _vec(F32, CHUNK)
    activation_types = (types.float32, types.float64)
    values = staticmethod(_e4m3_values)
    result_factor = 256.0  # the codes as float16 bits are worth 2^-8 of their value

    def load_x(self, builder, row, element, offset):
        x = _load(builder, row, offset, _vec(element))
        return [x if element == F32 else builder.fptrunc(x, _vec(F32))]

    def multiply_add(self, builder, partial, w, x, cpu):
        return builder.fadd(partial, builder.fmul(w, x, flags=("fast",)), flags=("fast",))

    def merge(self, builder, partials):
        return functools.reduce(functools.partial(builder.fadd, flags=("fast",)), partials)

    def to_float(self, builder, partial):
        return partial


def bf16_dot_instruction(cpu: str) -> bool:
    """Whether a CPU of these features multiplies bfloat16 pairs in one instruction (vdpbf16ps).
    LLVM 17 gave the intrinsic bfloat operands; earlier ones took integer vectors."""
    return "+avx512bf16" in cpu and llvm.llvm_version_info[0] >= 17


def _e4m3_bfloat16_bytes():
    """The high and the low byte of the bfloat16 bits of each e4m3 magnitude code (0-127)."""
    import torch  # the definition of e4m3 is torch's float8_e4m3fn

    values = torch.arange(128, dtype=torch.uint8).view(torch.float8_e4m3fn).to(torch.bfloat16)
    bits = values.view(torch.int16).numpy().astype(np.int64)
    return [((bits >> shift) & 0xFF).astype(np.uint8).view(np.int8) for shift in (8, 0)]


E4M3_BF16_HIGH, E4M3_BF16_LOW = _e4m3_bfloat16_bytes()


# Whether the CPU Numba compiles for takes e4m3 codes against bfloat16 activations as bfloat16
# pairs, vdpbf16ps, with vpermi2b's lookups (quantized.packed_inputs; the float kind elsewhere).
E4M3_BF16_DOTS = bf16_dot_instruction(host_cpu_features()) and "+avx512vbmi" in host_cpu_features()
# Whether it takes 4-bit codes against bfloat16 activations (_NibbleBFloat16Kind, vpermw's lookups)
NIBBLE_BF16_DOTS = bf16_dot_instruction(host_cpu_features()) and "+avx512bw" in host_cpu_features()


def _e4m3_bfloat16_values(builder, data, chunk, cpu):
    """64 e4m3 codes from element 64 * chunk on as the bfloat16 bits of their values (exact),
    two <32 x i16>. With AVX512-VBMI each magnitude's two bytes are looked up in 128-byte
    tables (vpermi2b), the sign ORed into the high one, and the bytes interleaved into words
    (vpermt2b); elsewhere the codes go through float32, as _e4m3_values converts them."""
    codes = _chunk_bytes(builder, data, chunk, WIDE)
    if "+avx512vbmi" in cpu:
        def lookup(table):
            halves = [_const(I8, table[h:h + WIDE].tolist(), WIDE) for h in (0, WIDE)]
            return _intrinsic_call(builder, "llvm.x86.avx512.vpermi2var.qi.512", _vec(I8, WIDE),
                                   [halves[0], codes, halves[1]])

        high = builder.or_(lookup(E4M3_BF16_HIGH), builder.and_(codes, _const(I8, -128, WIDE)))
        low = lookup(E4M3_BF16_LOW)
        return [builder.bitcast(builder.shuffle_vector(low, high, _const(I32, [i for p in range(h, h + CHUNK)
                                                                              for i in (p, WIDE + p)], WIDE)), _vec(I16))
                for h in (0, CHUNK)]
    wide = builder.shl(builder.sext(codes, _vec(I16, WIDE)), _const(I16, 7, WIDE))
    halves = builder.fpext(builder.bitcast(builder.and_(wide, _const(I16, 0xBF80 - 0x10000, WIDE)), _vec(F16, WIDE)),
                           _vec(F32, WIDE))
    values = builder.fmul(halves, _const(F32, 256.0, WIDE))  # float16 bits are worth 2^-8 of the value
    bits = builder.trunc(builder.lshr(builder.bitcast(values, _vec(I32, WIDE)), _const(I32, 16, WIDE)),
                         _vec(I16, WIDE))
    return [builder.shuffle_vector(bits, bits, _const(I32, range(h, h + CHUNK))) for h in (0, CHUNK)]


def _vector_name(vector) -> str:
    if isinstance(vector.element, ir.IntType):
        return f"v{vector.count}i{vector.element.width}"
    return f"v{vector.count}f{64 if isinstance(vector.element, ir.DoubleType) else 32}"


def _fma(vector):
    name = f"llvm.fma.{_vector_name(vector)}"
    return lambda builder, total, value, b_vector: _intrinsic_call(builder, name, vector, [value, b_vector, total])


def pairs_multiply_add(vector, fast):
    """(builder, total, value, b_vector) -> total plus, lane by lane, the products of the
    bfloat16 pairs in value's and b_vector's 32-bit lanes (total: vector, float32, 16 lanes, or
    8 where the CPU has AVX512-VL): vdpbf16ps when fast, else the pairs widened to float32
    (correct on any CPU)."""
    lanes = vector.count

    def fused(builder, total, value, b_vector):
        pairs = ir.VectorType(BF16, 2 * lanes)
        return _intrinsic_call(builder, f"llvm.x86.avx512bf16.dpbf16ps.{32 * lanes}", vector,
                               [total, builder.bitcast(value, pairs), builder.bitcast(b_vector, pairs)])

    def widened(builder, total, value, b_vector):
        fma = _fma(vector)
        low = [builder.bitcast(builder.shl(v, _const(I32, 16, lanes)), vector) for v in (value, b_vector)]
        high = [builder.bitcast(builder.and_(v, _const(I32, 0xFFFF0000, lanes)), vector) for v in (value, b_vector)]
        return fma(builder, fma(builder, total, *low), *high)

    return fused if fast else widened


class _BFloat16Kind:
    """e4m3 codes against bfloat16 activations (their bits, int16): products of bfloat16 pairs
    into float32 partial sums, 64 codes a step. Where vdpbf16ps and vpermi2b
    serve, a step costs half the instructions of the float kind's (one core in cache: 1.7-2x
    the weights a second)."""

    lanes = INT_LANES
    span = step_bytes = WIDE
    codes_per_byte = chains = 1
    half_steps = zero_from_sums = False
    partial_type = _vec(F32, INT_LANES)
    activation_types = (types.int16,)
    values = staticmethod(_e4m3_bfloat16_values)
    result_factor = 1.0

    def load_x(self, builder, row, element, offset):
        return [_load(builder, row, builder.add(offset, ir.Constant(offset.type, h)), _vec(I16)) for h in (0, CHUNK)]

    def multiply_add(self, builder, partial, w, x, cpu):
        pairs = _vec(I32, INT_LANES)
        return pairs_multiply_add(self.partial_type, bf16_dot_instruction(cpu))(
            builder, partial, builder.bitcast(w, pairs), builder.bitcast(x, pairs))

    merge, to_float = _FloatKind.merge, _FloatKind.to_float


def _bfloat16_table(values):
    """The bfloat16 bits (exact) of values[i & 15] for i < 32, as vpermw reads a table."""
    bits = (np.asarray(values, dtype=np.float32).view(np.uint32) >> 16).astype(np.int64)
    return [int(bits[i & 15]) - (0x10000 if bits[i & 15] >= 0x8000 else 0) for i in range(CHUNK)]


# What vpermw reads each 4-bit code's value from: symmetric int4's code less 8, e2m1's value,
# and, for int4 codes less their own zero point (5-bit two's complement), that difference
_NIBBLE_TABLES = {"int4": _bfloat16_table(np.arange(16) - SYMMETRIC_INT4_ZERO),
                  "e2m1": _bfloat16_table(E2M1_DOUBLED / 2),
                  "differences": _bfloat16_table(np.arange(16))[:16] + _bfloat16_table(np.arange(-16, 0))[:16]}


def _nibble_bfloat16_values(fmt):
    """The values function of fmt's _NibbleBFloat16Kind: a step's 128 codes as the bfloat16
    bits of their values, four <32 x i16> in _nibble_values's order. Word i of the step's
    bytes holds the codes of elements 4i to 4i + 3; shifted by 0, 4, 8 and 12, each is looked
    up by its low 5 bits in a 32-entry table whose halves repeat (vpermw): no mask, three
    shifts and four lookups a step. int4's own zero points come off the masked codes first."""

    def values(builder, data, chunk, cpu, zero=None, limit=None):
        words = builder.bitcast(_step_bytes(builder, data, chunk, limit), _vec(I16))
        shifted = [words] + [builder.lshr(words, _const(I16, b)) for b in (4, 8, 12)]
        if zero is not None:
            shifted = [builder.sub(builder.and_(w, _const(I16, 0x0F)), zero) for w in shifted]
        if "+avx512bw" in cpu:
            table = _const(I16, _NIBBLE_TABLES["differences" if zero is not None else fmt])
            return [_intrinsic_call(builder, "llvm.x86.avx512.permvar.hi.512", _vec(I16), [table, w])
                    for w in shifted]
        # elsewhere through float32, whose high half is the exact bfloat16
        if zero is None:
            codes = [builder.and_(w, _const(I16, 0x0F)) for w in shifted]
            shifted = ([_e2m1_doubled(builder, c) for c in codes] if fmt == "e2m1"
                       else [builder.sub(c, _const(I16, SYMMETRIC_INT4_ZERO)) for c in codes])
        factor = _const(F32, 0.5 if fmt == "e2m1" else 1.0)
        return [builder.trunc(builder.lshr(builder.bitcast(builder.fmul(builder.sitofp(w, _vec(F32)), factor),
                                                           _vec(I32)), _const(I32, 16)), _vec(I16))
                for w in shifted]

    return values


class _NibbleBFloat16Kind(_BFloat16Kind):
    """int4 and e2m1 codes against bfloat16 activations in nibble_order (their bits, uint16):
    each step's 128 codes looked up as bfloat16 values (_nibble_bfloat16_values) and
    multiplied in bfloat16 pairs into float32 partial sums, which a span's scales multiply in
    one FMA. Against int16 activations (_NibbleKind) a span's flush also took its lane sums
    off and converted the sums to float32: three operations a weight row and activation row,
    for four multiply-adds. Decode steps of olmoe-1b-7b x0.5 on Zen 4: mxfp4 1.07-1.20x
    faster, int4 0.98-1.10x (its lookups replace masks). The activations are used as they
    are, unquantized."""

    span = NIBBLE_STEP
    step_bytes = NIBBLE_STEP // 2
    codes_per_byte = chains = 2
    half_steps = True
    activation_types = (types.uint16,)

    def __init__(self, fmt):
        self.values = _nibble_bfloat16_values(fmt)

    load_x = _NibbleKind.load_x


_KINDS = {"int8": _IntegerKind(), "int4": _NibbleKind("int4", 1.0), "e2m1": _NibbleKind("e2m1", 0.5),
          "e4m3": _FloatKind()}
_E4M3_ON_BFLOAT16 = _BFloat16Kind()
_NIBBLES_ON_BFLOAT16 = {fmt: _NibbleBFloat16Kind(fmt) for fmt in ("int4", "e2m1")}


def _kind(fmt, x_dtype):
    """The kind of fmt's kernel for activations of Numba type x_dtype: e4m3 codes meet
    bfloat16 bits (int16) or floats, 4-bit codes bfloat16 bits (uint16) or int16 integers."""
    if fmt == "e4m3" and x_dtype == types.int16:
        return _E4M3_ON_BFLOAT16
    if fmt in _NIBBLES_ON_BFLOAT16 and x_dtype == types.uint16:
        return _NIBBLES_ON_BFLOAT16[fmt]
    return _KINDS[fmt]


def _e8m0_values(builder, codes):
    """e8m0 scale codes (an i8 or a vector of them) as float32: 2^(s - 127), which for s = 0
    is the subnormal 2^-127."""
    count = getattr(codes.type, "count", None)
    wide, real = (I32, F32) if count is None else (_vec(I32, count), _vec(F32, count))

    def const(value):
        return ir.Constant(wide, value if count is None else [value] * count)

    # s << 23 is the bits of 2^(s - 127) for s > 0, and below those of 2^-127 only for s = 0:
    # the larger of the two (one vpmaxud)
    shifted = builder.shl(builder.zext(codes, wide), const(23))
    smallest = const(0x400000)
    bits = builder.select(builder.icmp_unsigned("<", shifted, smallest), smallest, shifted)
    return builder.bitcast(bits, real)


def _group_scale(builder, scales, g):
    scale = builder.load(builder.gep(scales, [g]))
    return scale if scale.type == F32 else _e8m0_values(builder, scale)


def _group_zero(builder, zeros, has_zeros, g):
    """Group g's int4 zero point, uint8: its own, or 8."""
    stored = builder.load(builder.gep(zeros, [builder.select(has_zeros, g, ir.Constant(g.type, 0))]))
    return builder.select(has_zeros, stored, ir.Constant(I8, 8))


def _lane_groups(builder, row, groups, n, convert):
    """<n x t>: convert(row's values of the groups at indices groups, each over as many of the
    n lanes in turn). Where the indices run on, LLVM merges the loads, and the values are
    spread over the lanes before they are converted, one vector operation each: mxfp4's every
    step needs four scales per weight row, and building each from a scalar cost as much as
    the step's multiply-adds at a decode step's few rows."""
    values = [builder.load(builder.gep(row, [g])) for g in groups]
    vector = ir.Constant(_vec(values[0].type, len(values)), ir.Undefined)
    for i, value in enumerate(values):
        vector = builder.insert_element(vector, value, ir.Constant(I32, i))
    spread = builder.shuffle_vector(vector, vector, _const(I32, [lane * len(groups) // n for lane in range(n)], n))
    return convert(builder, spread)


def _scale_values_of(builder, scales):
    """Scales as float32: e8m0 codes (uint8) converted."""
    return scales if scales.type.element == F32 else _e8m0_values(builder, scales)


def _row_start(builder, array, e, n):
    """The address of element [e, n, 0] of a C-contiguous 3-d array."""
    _, rows, width = cgutils.unpack_tuple(builder, array.shape, 3)
    return builder.gep(array.data, [builder.mul(builder.add(builder.mul(e, rows), n), width)])


def _zeros_row(builder, array, has_zeros, e, s):
    """The address of zero-point row [e, s]; the dummy zeros array's one element when there are
    none (has_zeros false)."""
    nothing = ir.Constant(e.type, 0)
    return _row_start(builder, array, builder.select(has_zeros, e, nothing), builder.select(has_zeros, s, nothing))


# e, n_a, n_b, stride, pairs, per_scale, start, count, group
INDEX_ARGUMENTS = (4, 5, 6, 7, 8, 9, 13, 14, 15)


class _Operands:
    """The intrinsic's arguments as LLVM values: the activations, where the sums go and, per
    pair of weight rows (at_pair), the rows', their scale rows' and zero rows' addresses. The
    arguments are whole arrays and indices, not views: a view costs a reference count, more
    than a short row."""

    def __init__(self, context, builder, sig, args, kind):
        args = [context.cast(builder, v, t, types.intp) if i in INDEX_ARGUMENTS else v
                for i, (v, t) in enumerate(zip(args, sig.args))]
        self.kind = kind
        (_, _, _, self.has_zeros, self.e, self.n_a, self.n_b, self.stride, self.pairs, self.per_scale, _, _, _,
         start, self.num_rows, self.group, _) = args
        self.arrays = [context.make_array(sig.args[i])(context, builder, args[i]) for i in (0, 1, 2)]
        code_bytes = cgutils.unpack_tuple(builder, self.arrays[0].shape, 3)[2]
        self.depth = builder.mul(code_bytes, ir.Constant(code_bytes.type, kind.codes_per_byte))  # K
        x, x_sums, rows, out = (context.make_array(sig.args[i])(context, builder, args[i]) for i in (10, 11, 12, 16))
        self.x = x.data
        self.x_element = context.get_value_type(sig.args[10].dtype)
        self.x_width = cgutils.unpack_tuple(builder, x.shape, 2)[1]
        self.x_sums = x_sums.data
        _, spans, lanes = cgutils.unpack_tuple(builder, x_sums.shape, 3)
        self.x_sums_width = builder.mul(spans, lanes)
        self.zero_points = True  # int4: whether the code reads zero points (else they are 8)
        self.tails = True  # whether K may end inside a span (see _emit_group_sizes)
        self.rows = builder.gep(rows.data, [start])
        self.out = out.data
        self.out_width = cgutils.unpack_tuple(builder, out.shape, 2)[1]

    def at_pair(self, builder, p):
        """Point codes, scales and zeros at the rows of pair p: n_a + p * stride and n_b + p *
        stride."""
        rows = [builder.add(n, builder.mul(p, self.stride)) for n in (self.n_a, self.n_b)]
        scale_rows = [_scale_row(builder, n, self.per_scale) for n in rows]
        codes, scales, zeros = self.arrays
        self.codes = [_row_start(builder, codes, self.e, n) for n in rows]
        self.scales = [_row_start(builder, scales, self.e, s) for s in scale_rows]
        self.zeros = [_zeros_row(builder, zeros, self.has_zeros, self.e, s) for s in scale_rows]


def _scale_row(builder, n, per_scale):
    """n // per_scale, without a division where each row has its own scales (per_scale 1)."""
    row = cgutils.alloca_once_value(builder, n)
    with builder.if_then(builder.icmp_signed("!=", per_scale, ir.Constant(n.type, 1)), likely=False):
        builder.store(builder.sdiv(n, per_scale), row)
    return builder.load(row)


def _min(builder, a, b):
    return builder.select(builder.icmp_signed("<", a, b), a, b)


# How far ahead of each step's 32 bytes of codes to ask for them: the hardware's prefetchers
# alone left one core reading e4m3 rows from memory at 8 GB/s, 12 GB/s with this.
PREFETCH_BYTES = 2048
# _prefetch's localities: into L1 (prefetcht0), or into the outer caches only (prefetcht2).
# The quantized codes go into L1: into the outer caches int4 and int8 at T=16 ran 0.92-0.97x.
INTO_L1, INTO_OUTER_CACHES = 3, 1


def _prefetch(builder, data, offset, locality=INTO_L1):
    """A hint to load data[offset] into the caches (read; INTO_L1 or INTO_OUTER_CACHES): never
    a fault."""
    pointer = builder.gep(data, [offset])
    fn = builder.module.declare_intrinsic("llvm.prefetch", fnty=ir.FunctionType(ir.VoidType(),
                                                                                 [pointer.type, I32, I32, I32]))
    builder.call(fn, [pointer, ir.Constant(I32, 0), ir.Constant(I32, locality), ir.Constant(I32, 1)])


def _emit_pass(builder, fmt, cpu, ops, first, count):
    """The code for count activation rows from the first-th of ops.rows: for each pair of
    weight rows, every group and its chunks, then the sums stored in ops.out. The rows' setup
    is made once for all pairs: a call per pair cost half of a 1024-deep pair's time."""
    index = ops.depth.type
    x_rows, sums_rows = [], []
    for j in range(count):
        row = builder.sext(builder.load(builder.gep(ops.rows, [builder.add(first, ir.Constant(index, j))])), index)
        x_rows.append(builder.gep(ops.x, [builder.mul(row, ops.x_width)]))
        sums_rows.append(builder.gep(ops.x_sums, [builder.mul(row, ops.x_sums_width)]))
    with cgutils.for_range(builder, ops.pairs) as pair_loop:
        ops.at_pair(builder, pair_loop.index)
        _emit_pair(builder, fmt, cpu, ops, x_rows, sums_rows, first, pair_loop.index)


def _flush_span(builder, group, kind):
    """The elements whose sums turn into float32 at once: a group, or a step of several."""
    span = ir.Constant(group.type, kind.span)
    return builder.select(builder.icmp_signed(">", group, span), group, span)


# Activation rows per pass up to which a kind's steps sum into several partials (kind.chains):
# with more rows, the rows' own partials keep the multiply-adds busy, and more of them spill
# registers.
CHAINED_ROWS = 1


def _zero_words(builder, fmt, ops, r, groups):
    """<32 x i16>: int4's own zero point of each word of a step's codes (_nibble_values) in
    weight row r, or None."""
    if fmt != "int4" or not ops.zero_points:
        return None
    return _lane_groups(builder, ops.zeros[r], groups, CHUNK, lambda b, zeros: b.zext(zeros, _vec(I16)))


def _emit_pair(builder, fmt, cpu, ops, x_rows, sums_rows, first, p):
    """The code for pair p of weight rows (ops.at_pair) against the activation rows at x_rows
    (and the 4-bit codes' lane sums at sums_rows): every span of whole steps, then one of the
    rest of K, then the sums stored in rows 2p and 2p + 1 of ops.out."""
    kind = ops.kind
    index = ops.depth.type
    count = len(x_rows)
    chains = kind.chains if count <= CHAINED_ROWS else 1
    slots = [(r, j) for r in range(2) for j in range(count)]  # (weight row, activation row)
    partials = {q: [cgutils.alloca_once(builder, kind.partial_type) for _ in range(chains)] for q in slots}
    sums = {q: cgutils.alloca_once(builder, _vec(F32, kind.lanes)) for q in slots}

    def clear(q):
        for partial in partials[q]:
            builder.store(ir.Constant(kind.partial_type, None), partial)

    for q in slots:
        clear(q)
        builder.store(_const(F32, 0.0, kind.lanes), sums[q])
    group, step = ops.group, ir.Constant(index, kind.span)
    flush_span = _flush_span(builder, group, kind)
    # the groups of each part of a span's lanes, in turn: a constant number where group is known
    parts = max(1, kind.span // group.constant) if isinstance(group, ir.Constant) else kind.span // CHUNK
    last_group = builder.udiv(builder.sub(ops.depth, ir.Constant(index, 1)), group)
    long_groups = builder.icmp_signed(">", group, ir.Constant(index, FLUSH))
    subtracts_sums = kind.zero_from_sums and sums_zero(fmt, ops.zero_points) != 0

    def span(f, tail):
        """Span f of flush_span elements, or where tail, what is left of K from there."""
        k0 = builder.mul(f, flush_span)
        steps = (builder.udiv(builder.add(builder.sub(ops.depth, k0), builder.sub(step, ir.Constant(index, 1))), step)
                 if tail else builder.udiv(flush_span, step))
        if isinstance(group, ir.Constant):
            groups = [builder.add(builder.udiv(k0, group), ir.Constant(index, i)) for i in range(parts)]
        else:
            groups = [builder.udiv(builder.add(k0, ir.Constant(index, i * CHUNK)), group) for i in range(parts)]
        if tail:  # a half step's lanes past K meet zeros: any group's values do
            groups = [_min(builder, g, last_group) for g in groups]
        scales = [_lane_groups(builder, ops.scales[r], groups, kind.lanes, _scale_values_of) for r in range(2)]
        zeros = [_zero_words(builder, fmt, ops, r, groups) for r in range(2)]
        first_chunk = builder.udiv(k0, step)
        # a 4-bit step may end half-way past K: its codes' bytes are then read up to the row's end
        limit = builder.udiv(ops.depth, ir.Constant(index, 2)) if tail and kind.half_steps else None
        extra = [{k: v for k, v in (("zero", zeros[r]), ("limit", limit)) if v is not None} for r in range(2)]

        def flush(last):
            for r, j in slots:
                partial = kind.merge(builder, [builder.load(q) for q in partials[r, j]])
                if subtracts_sums and last:  # the zero points' part of the span's products, at once
                    sums_at = builder.gep(sums_rows[j], [builder.mul(f, ir.Constant(index, kind.lanes))])
                    x_sums = _load(builder, sums_at, ir.Constant(index, 0), _vec(I32, kind.lanes))
                    partial = builder.sub(partial, x_sums)
                scaled = builder.fmul(kind.to_float(builder, partial), scales[r], flags=("fast",))
                builder.store(builder.fadd(builder.load(sums[r, j]), scaled, flags=("fast",)), sums[r, j])
                clear((r, j))

        with cgutils.for_range(builder, steps) as c:
            chunk = builder.add(first_chunk, c.index)
            offset = builder.mul(chunk, step)
            xs = [kind.load_x(builder, x_row, ops.x_element, offset) for x_row in x_rows]
            for r in range(2):
                _prefetch(builder, ops.codes[r], builder.add(builder.mul(chunk, ir.Constant(index, kind.step_bytes)),
                                                             ir.Constant(index, PREFETCH_BYTES)))
                w = kind.values(builder, ops.codes[r], chunk, cpu, **extra[r])
                for j in range(count):
                    for i, (value, x) in enumerate(zip(w, xs[j])):
                        partial = partials[r, j][i % chains]
                        builder.store(kind.multiply_add(builder, builder.load(partial), value, x, cpu), partial)
            # a group longer than FLUSH elements flushes on the way too
            span_done = builder.icmp_unsigned("==", builder.and_(builder.add(c.index, ir.Constant(index, 1)),
                                                                 ir.Constant(index, FLUSH // kind.span - 1)),
                                              ir.Constant(index, 0))
            with builder.if_then(builder.and_(long_groups, span_done), likely=False):
                flush(False)
        flush(True)

    full_spans = builder.udiv(ops.depth, flush_span)
    with cgutils.for_range(builder, full_spans) as span_loop:
        span(span_loop.index, False)
    if ops.tails:
        with builder.if_then(builder.icmp_signed("!=", builder.urem(ops.depth, flush_span), ir.Constant(index, 0))):
            span(full_spans, True)
    for r, j in slots:
        total = builder.fmul(horizontal_sum(builder, builder.load(sums[r, j])), ir.Constant(F32, kind.result_factor))
        out_row = builder.add(builder.mul(p, ir.Constant(index, 2)), ir.Constant(index, r))
        column = builder.add(first, ir.Constant(index, j))
        builder.store(total, builder.gep(ops.out, [builder.add(builder.mul(out_row, ops.out_width), column)]))


# Group sizes the code is specialized for, per format: a group's trip count known, LLVM
# unrolls its steps and drops the loop. Other sizes take the general code, but for the 4-bit
# formats, whose every group size is here (reads_wide_chunks): their last copy takes the rest
# (int4's first call compiled in 46 s with a general copy, 37 s without). mxfp4's scales take
# 32 columns, fp8's blocks 128: a copy for another size would only lengthen the compile (an fp8
# decode step's first call: 41 s with copies for 32 and 64).
GROUP_SIZES = {"int8": (32, 64, 128), "int4": (32, 64, 128), "e2m1": (32,), "e4m3": (128,)}


def _emit_group_sizes(builder, fmt, cpu, ops, sizes):
    """The passes, in a copy per group size of sizes (one compare each) and one for the rest,
    which for the 4-bit formats is the last size's."""
    if not sizes:
        _emit_passes(builder, fmt, cpu, ops)
        return
    if len(sizes) == 1 and ops.kind.half_steps:  # groups divide K: only groups below a step leave a rest
        general, ops.group, ops.tails = ops.group, ir.Constant(ops.group.type, sizes[0]), ops.kind.span > sizes[0]
        _emit_passes(builder, fmt, cpu, ops)
        ops.group, ops.tails = general, True
        return
    size = ir.Constant(ops.group.type, sizes[0])
    # K in whole spans, unless a span is one 4-bit step of several groups, where K may end half
    # way through its last (gpt-oss's 2880): the code of that rest only where it can occur (it
    # lengthened the compile by a third)
    tails = ops.kind.span > sizes[0]
    takes = builder.icmp_signed("==", ops.group, size)
    if not tails:
        whole = builder.icmp_signed("==", builder.srem(ops.depth, _flush_span(builder, size, ops.kind)),
                                    ir.Constant(size.type, 0))
        takes = builder.and_(takes, whole)
    with builder.if_else(takes) as (known, other):
        with known:
            general, ops.group, ops.tails = ops.group, size, tails
            _emit_passes(builder, fmt, cpu, ops)
            ops.group, ops.tails = general, True
        with other:
            _emit_group_sizes(builder, fmt, cpu, ops, sizes[1:])


def horizontal_sum(builder, v):
    """The sum of a float vector's lanes, halving it in each step."""
    n = v.type.count
    while n > 1:
        n //= 2
        v = builder.fadd(builder.shuffle_vector(v, v, _const(I32, range(n), n)),
                         builder.shuffle_vector(v, v, _const(I32, range(n, 2 * n), n)))
    return builder.extract_element(v, ir.Constant(I32, 0))


def emit_row_passes(builder, num_rows, emit_pass):
    """emit_pass(first, count) for passes of ROWS_PER_PASS activation rows, then one pass of
    the rest: each pass reads the weights again, and an expert of three rows in passes of two
    and one cost 1.4x one of three (a decode step's experts mostly hold one to four rows)."""
    index = num_rows.type
    per_pass = ir.Constant(index, ROWS_PER_PASS)
    full = builder.udiv(num_rows, per_pass)
    with cgutils.for_range(builder, full) as passes:
        emit_pass(builder.mul(passes.index, per_pass), ROWS_PER_PASS)
    done = builder.mul(full, per_pass)
    rest = builder.sub(num_rows, done)
    for count in range(ROWS_PER_PASS - 1, 0, -1):
        with builder.if_then(builder.icmp_signed("==", rest, ir.Constant(index, count))):
            emit_pass(done, count)


def _emit_passes(builder, fmt, cpu, ops):
    emit_row_passes(builder, ops.num_rows, lambda first, count: _emit_pass(builder, fmt, cpu, ops, first, count))


def dots_intrinsic(fmt, cpu_features=None):
    """The vector code of int8_dots (fmt "int8"), int4_dots, e2m1_dots or e4m3_dots, for the
    CPU features given (a "+avx2,+avx512bw,..." string), by default those Numba compiles for."""

    @intrinsic
    def dots(typingctx, codes, scales, zeros, has_zeros, e, n_a, n_b, stride, pairs, per_scale, x, x_sums, rows, start,
             count, group, out):
        arrays = ((codes, 3), (scales, 3), (zeros, 3), (x, 2), (x_sums, 3), (rows, 1), (out, 2))
        if not all(isinstance(a, types.Array) and a.ndim == ndim and a.layout == "C" for a, ndim in arrays):
            return None
        kind = _kind(fmt, x.dtype)
        if (scales.dtype not in (types.float32, types.uint8) or x.dtype not in kind.activation_types
                or x_sums.dtype != types.int32 or rows.dtype != types.int32 or out.dtype != types.float32):
            return None
        indices = (e, n_a, n_b, stride, pairs, per_scale, start, count, group)
        if not all(isinstance(i, types.Integer) for i in indices):
            return None
        signature = types.void(codes, scales, zeros, has_zeros, e, n_a, n_b, stride, pairs, per_scale, x, x_sums, rows,
                               start, count, group, out)

        def codegen(context, builder, sig, args):
            cpu = cpu_features if cpu_features is not None else context.codegen()._get_host_cpu_features()
            ops = _Operands(context, builder, sig, args, kind)
            if fmt != "int4":
                _emit_group_sizes(builder, fmt, cpu, ops, list(GROUP_SIZES[fmt]))
                return context.get_dummy_value()
            # a copy for symmetric codes, whose zero point (8) is a constant: building each
            # group's from the zero points' bytes cost more than the products of a row's step
            with builder.if_else(ops.has_zeros) as (own, symmetric):
                with own:
                    _emit_group_sizes(builder, fmt, cpu, ops, list(GROUP_SIZES[fmt]))
                with symmetric:
                    ops.zero_points = False
                    _emit_group_sizes(builder, fmt, cpu, ops, list(GROUP_SIZES[fmt]))
            return context.get_dummy_value()

        return signature, codegen

    return dots


def _compiled(fmt):
    kernel = dots_intrinsic(fmt)

    def typer(codes, scales, zeros, has_zeros, e, n_a, n_b, stride, pairs, per_scale, x, x_sums, rows, start, count,
              group, out):
        def call(codes, scales, zeros, has_zeros, e, n_a, n_b, stride, pairs, per_scale, x, x_sums, rows, start, count,
                 group, out):
            kernel(codes, scales, zeros, has_zeros, e, n_a, n_b, stride, pairs, per_scale, x, x_sums, rows, start, count,
                   group, out)

        return call

    return typer


# inline: as calls, the array arguments cost a reference count each, more than short rows' work
overload(int8_dots, inline="always")(_compiled("int8"))
overload(int4_dots, inline="always")(_compiled("int4"))
overload(e2m1_dots, inline="always")(_compiled("e2m1"))
overload(e4m3_dots, inline="always")(_compiled("e4m3"))


# ---- rows dequantized, for the blocked path (library products, AMX tiles) ------------------------


def _dequantize(fmt, codes, scales, zeros, has_zeros, e, n, s, group, first, out):
    values = _code_values(fmt, codes[e, n], zeros[e, s] if has_zeros else None, has_zeros, group).astype(np.float32)
    if fmt == "e2m1":
        values *= np.float32(0.5)
    row = (values * np.repeat(_scale_values(scales[e, s]), group)[: values.shape[0]])[first:first + out.shape[0]]
    if out.dtype == np.uint16:  # bfloat16 bits, rounded to nearest even as torch rounds
        bits = row.view(np.uint32).astype(np.uint64)
        out[:] = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    elif out.dtype == np.int16:  # float16 bits
        out[:] = row.astype(np.float16).view(np.int16)
    else:
        out[:] = row


def int8_dequantize(codes, scales, zeros, has_zeros, e, n, s, group, first, out):
    """out[i] = codes[e, n, k] * scales[e, s, k // group] for k = first + i, in out's type
    (float32, or bfloat16 or float16 bits as uint16 or int16), rounded once: what
    QuantizedWeight.dequantize gives. K, group, first and len(out) multiples of CHUNK,
    first + len(out) at most K; zeros as for int8_dots."""
    _dequantize("int8", codes, scales, zeros, has_zeros, e, n, s, group, first, out)


def int4_dequantize(codes, scales, zeros, has_zeros, e, n, s, group, first, out):
    """int8_dequantize for 4-bit codes, less their zero points."""
    _dequantize("int4", codes, scales, zeros, has_zeros, e, n, s, group, first, out)


def e2m1_dequantize(codes, scales, zeros, has_zeros, e, n, s, group, first, out):
    """int8_dequantize for e2m1 codes."""
    _dequantize("e2m1", codes, scales, zeros, has_zeros, e, n, s, group, first, out)


def e4m3_dequantize(codes, scales, zeros, has_zeros, e, n, s, group, first, out):
    """int8_dequantize for e4m3 codes."""
    _dequantize("e4m3", codes, scales, zeros, has_zeros, e, n, s, group, first, out)


def _stored(builder, values, element, bfloat16):
    """<n x float> values as out's elements: float32, or bfloat16 (rounded to nearest even,
    in integers) or float16 bits."""
    if element == F32:
        return values
    n = values.type.count
    if not bfloat16:
        return builder.bitcast(builder.fptrunc(values, _vec(F16, n)), _vec(I16, n))
    bits = builder.bitcast(values, _vec(I32, n))
    odd = builder.and_(builder.lshr(bits, _const(I32, 16, n)), _const(I32, 1, n))
    rounded = builder.add(builder.add(bits, _const(I32, 0x7FFF, n)), odd)
    return builder.trunc(builder.lshr(rounded, _const(I32, 16, n)), _vec(I16, n))


# A 4-bit group has 16 values: dequantizing it on AVX-512 computes them once, rounded to out's
# type, and looks each code up (vpermw for 16-bit elements, vpermps for float32) in place of
# converting and rounding every element (about 3x the weights per second for int4).
CODES_4BIT = 16


def _looks_up(fmt, cpu):
    return fmt in ("int4", "e2m1") and "+avx512bw" in cpu


def _group_table(builder, fmt, zero, scale, element, bfloat16):
    """The group's 16 values by code, scale times each code's value (less the zero for int4),
    rounded as out stores them, as a table for _lookup: <16 x float>, or <32 x i16> whose first
    16 words are the values' bits."""
    codes = range(CODES_4BIT)
    if fmt == "int4":
        ints = builder.sub(_const(I16, codes, CODES_4BIT), _broadcast(builder, zero, CODES_4BIT))
        values = builder.sitofp(ints, _vec(F32, CODES_4BIT))
    else:
        values = _const(F32, [float(v) for v in E2M1_DOUBLED], CODES_4BIT)
    table = _stored(builder, builder.fmul(values, _broadcast(builder, scale, CODES_4BIT)), element, bfloat16)
    if element == F32:
        return table
    return builder.shuffle_vector(table, table, _const(I32, list(range(CODES_4BIT)) * 2))


def _lookup(builder, table, data, chunk):
    """The chunk's 32 codes, looked up in table (_group_table), in element order."""
    words = _nibble_words(builder, data, chunk)
    if table.type.element == I16:
        return _intrinsic_call(builder, "llvm.x86.avx512.permvar.hi.512", _vec(I16), [table, words])
    halves = [builder.zext(builder.shuffle_vector(words, words, _const(I32, range(h, h + INT_LANES), INT_LANES)),
                           _vec(I32, INT_LANES)) for h in (0, INT_LANES)]
    parts = [_intrinsic_call(builder, "llvm.x86.avx512.permvar.sf.512", _vec(F32, INT_LANES), [table, h])
             for h in halves]
    return builder.shuffle_vector(parts[0], parts[1], _const(I32, range(CHUNK)))


# The smallest magnitude of a nonzero code as _ordered_values gives it (e4m3's as float16 bits:
# its smallest subnormal, 2^-9, worth 2^-8 of it).
SMALLEST_CODE = {"int8": 1.0, "int4": 1.0, "e2m1": 1.0, "e4m3": 2.0 ** -17}
FLOAT32_TINY, FLOAT32_MAX = float(np.finfo(np.float32).tiny), float(np.finfo(np.float32).max)


def _all_normal(builder, fmt, scale):
    """Whether every nonzero code of a group with this scale gives a normal float32 (or all give
    zero): AVX512-BF16's conversion, which reads and writes subnormals as zero, then rounds
    each value as torch does."""
    smallest = builder.fmul(_fabs(builder, scale), ir.Constant(F32, SMALLEST_CODE[fmt]))
    in_range = builder.and_(builder.fcmp_ordered(">=", smallest, ir.Constant(F32, FLOAT32_TINY)),
                            builder.fcmp_ordered("<=", smallest, ir.Constant(F32, FLOAT32_MAX)))
    return builder.or_(in_range, builder.fcmp_ordered("==", scale, ir.Constant(F32, 0.0)))


def _fabs(builder, value):
    return _intrinsic_call(builder, "llvm.fabs.f32", F32, [value])


def _store(builder, values, target):
    builder.store(values, builder.bitcast(target, values.type.as_pointer()), align=1)


def _to_bfloat16(builder, values):
    """<32 x float> values rounded to bfloat16 bits by AVX512-BF16's two-source conversion:
    one instruction, where LLVM lowers a fptrunc to two and a shuffle (the shuffle port bounds
    int8's and e4m3's dequantization)."""
    halves = [builder.shuffle_vector(values, values, _const(I32, range(h, h + INT_LANES), INT_LANES))
              for h in (0, INT_LANES)]
    # LLVM 17 gave the intrinsic a bfloat result; earlier ones an integer vector
    result = _vec(BF16) if llvm.llvm_version_info[0] >= 17 else _vec(I16)
    both = _intrinsic_call(builder, "llvm.x86.avx512bf16.cvtne2ps2bf16.512", result, halves[::-1])
    return builder.bitcast(both, _vec(I16))


def _store_values(builder, fmt, data, chunk, zero, scale, element, bfloat16, cpu, target):
    """The chunk's 32 codes converted, scaled and stored at target in out's type; to bfloat16
    by AVX512-BF16's conversion where the group's values allow it (_all_normal)."""
    w = _ordered_values(builder, fmt, data, chunk, None if zero is None else _broadcast(builder, zero, CHUNK), cpu)
    floats = w if w.type.element == F32 else builder.sitofp(w, _vec(F32))
    values = builder.fmul(floats, _broadcast(builder, scale, CHUNK))
    if not (bfloat16 and "+avx512bf16" in cpu):
        _store(builder, _stored(builder, values, element, bfloat16), target)
        return
    with builder.if_else(_all_normal(builder, fmt, scale), likely=True) as (normal, other):
        with normal:
            _store(builder, _to_bfloat16(builder, values), target)
        with other:
            _store(builder, _stored(builder, values, element, bfloat16), target)


def dequantize_intrinsic(fmt, cpu_features=None):
    """The vector code of int8_dequantize (fmt "int8"), int4_dequantize, e2m1_dequantize or
    e4m3_dequantize."""
    kind = _KINDS[fmt]

    @intrinsic
    def dequantize(typingctx, codes, scales, zeros, has_zeros, e, n, s, group, first, out):
        arrays = ((codes, 3), (scales, 3), (zeros, 3), (out, 1))
        if not all(isinstance(a, types.Array) and a.ndim == ndim and a.layout == "C" for a, ndim in arrays):
            return None
        if (scales.dtype not in (types.float32, types.uint8)
                or out.dtype not in (types.float32, types.uint16, types.int16)):
            return None
        signature = types.void(codes, scales, zeros, has_zeros, e, n, s, group, first, out)

        def codegen(context, builder, sig, args):
            cpu = cpu_features if cpu_features is not None else context.codegen()._get_host_cpu_features()
            index = types.intp
            e_, n_, s_, group_, first_ = (context.cast(builder, args[i], sig.args[i], index) for i in (4, 5, 6, 7, 8))
            has_zeros = args[3]
            arrays = {i: context.make_array(sig.args[i])(context, builder, args[i]) for i in (0, 1, 2, 9)}
            codes_row = _row_start(builder, arrays[0], e_, n_)
            scales_row = _row_start(builder, arrays[1], e_, s_)
            zeros_row = _zeros_row(builder, arrays[2], has_zeros, e_, s_)
            # out[0] is element first: out's address less first elements, indexed by k
            out = builder.gep(arrays[9].data, [builder.neg(first_)])
            element = context.get_value_type(sig.args[9].dtype)
            bfloat16 = sig.args[9].dtype == types.uint16
            end = builder.add(first_, cgutils.unpack_tuple(builder, arrays[9].shape, 1)[0])
            first_group = builder.udiv(first_, group_)
            one = ir.Constant(e_.type, 1)
            num_groups = builder.sub(builder.udiv(builder.add(end, builder.sub(group_, one)), group_), first_group)
            factor = ir.Constant(F32, kind.result_factor)
            with cgutils.for_range(builder, num_groups) as group_loop:
                g = builder.add(first_group, group_loop.index)
                scale = builder.fmul(_group_scale(builder, scales_row, g), factor)
                zero = builder.zext(_group_zero(builder, zeros_row, has_zeros, g), I16) if fmt == "int4" else None
                table = _group_table(builder, fmt, zero, scale, element, bfloat16) if _looks_up(fmt, cpu) else None
                group_start = builder.mul(g, group_)
                k0 = builder.select(builder.icmp_unsigned("<", group_start, first_), first_, group_start)
                k1 = _min(builder, builder.add(group_start, group_), end)
                chunk_start = builder.udiv(k0, ir.Constant(e_.type, CHUNK))
                with cgutils.for_range(builder, builder.udiv(builder.sub(k1, k0), ir.Constant(e_.type, CHUNK))) as c:
                    chunk = builder.add(chunk_start, c.index)
                    target = builder.gep(out, [builder.mul(chunk, ir.Constant(e_.type, CHUNK))])
                    if table is not None:
                        _store(builder, _lookup(builder, table, codes_row, chunk), target)
                    else:
                        _store_values(builder, fmt, codes_row, chunk, zero, scale, element, bfloat16, cpu,
                                      target)
            return context.get_dummy_value()

        return signature, codegen

    return dequantize


def _compiled_dequantize(fmt):
    kernel = dequantize_intrinsic(fmt)

    def typer(codes, scales, zeros, has_zeros, e, n, s, group, first, out):
        return lambda codes, scales, zeros, has_zeros, e, n, s, group, first, out: kernel(
            codes, scales, zeros, has_zeros, e, n, s, group, first, out)

    return typer


overload(int8_dequantize, inline="always")(_compiled_dequantize("int8"))
overload(int4_dequantize, inline="always")(_compiled_dequantize("int4"))
overload(e2m1_dequantize, inline="always")(_compiled_dequantize("e2m1"))
overload(e4m3_dequantize, inline="always")(_compiled_dequantize("e4m3"))
