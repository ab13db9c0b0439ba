"""Dot products of two rows of packed weight codes with a few activation rows, written as LLVM
vector code (Numba intrinsics): what a decode step spends its time on.

Converting each code to float32 with scalar-looking loops left LLVM three or more
instructions per 16 weights, which made a 4-bit decode step compute-bound at a fifth of the
memory's speed. Here each 32 codes are converted in registers and meet every activation row
of a pass before the next 32 are read:

- int8, int4 and e2m1 codes become 16-bit integers (int8: a sign extension of 32 bytes; 4-bit:
  32 bytes, 64 codes, split into their low nibbles (the even elements) and their high ones
  (the odd), zero-extended as they are (int4) or looked up in a 16-entry table of e2m1's values
  doubled (pshufb) and sign-extended) and one multiply-add of 16-bit pairs into 32-bit
  lanes (x86's pmaddwd, fused with the add where the CPU has AVX512-VNNI) takes 32 of them
  against activations quantized to int16. The 4-bit kernels' activation rows come in the
  same order, each 64 elements' 32 even ones then their 32 odd ones (wide_order), which
  spares every step the shuffles of an element-order unpacking: half the instructions per
  code. The 32-bit sums turn into float32 once per scale group, where its scale multiplies
  (for groups of 32 a step's lanes hold two groups: lanes 0-7 the first 32 elements). There,
  in passes of one or two rows, symmetric int4's zero (8) times the activations each lane met
  (lane_sums, made once per decode step) comes off, rather than 8 off every code
  (FOLDED_ROWS).
- e4m3 codes against bfloat16 activations, on CPUs with AVX512-BF16 and AVX512-VBMI: each 64
  codes' bfloat16 bits looked up by byte (vpermi2b), then products of bfloat16 pairs against
  the activations' own bits (vdpbf16ps), half the instructions of the float route.
  Elsewhere e4m3 codes become float16 bits (sign, exponent and mantissa shifted into place,
  worth 2^-8 of the value, subnormals included) and float32 in one conversion, then fused
  multiply-adds against float32 activations.

The activation rows of the integer formats are quantized once per step, one scale per row (its
largest magnitude over 32767): each element moves by at most 2^-16 of the row's largest, which
leaves the dot products' error well below the rounding of bfloat16 or float16 activations.

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
WIDE = 2 * CHUNK  # 4-bit codes per step
INT_LANES = CHUNK // 2  # int32 lanes of one pmaddwd
# Elements summed in int32 lanes before a flush to float32: each lane adds two products per
# int8 step, |int8 code * int16| <= 128 * 32767 (four per 4-bit step, |code| <= 15), so 2048
# elements keep a lane below 2^30.
FLUSH = 2048
INT16_MAX = 32767
E2M1_DOUBLED = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], dtype=np.int8)
# Activation rows per pass over the codes: each chunk of two weight rows, once converted,
# meets this many; 2 x 4 sums and as many partial sums still fit AVX-512's registers.
ROWS_PER_PASS = 4


@njit(cache=True, inline="always")
def reads_chunks(depth, group):
    """Whether rows of this depth and scale group size can take these kernels."""
    return depth % CHUNK == 0 and group % CHUNK == 0


@njit(cache=True, inline="always")
def reads_wide_chunks(depth, group):
    """Whether 4-bit rows of this depth and scale group size can take the dot products: K in
    whole steps of 64, groups of 32 or whole steps."""
    return depth % WIDE == 0 and (group == CHUNK or group % WIDE == 0)


def wide_order(depth):
    """The element of a row of depth (a multiple of WIDE) at each position of the 4-bit
    kernels' activation layout: each 64 elements' even ones, then their odd ones."""
    k = np.arange(depth)
    p = k % WIDE
    return k - p + 2 * (p % CHUNK) + p // CHUNK


@njit(cache=True)
def quantize_rows(src, split, out, scales):
    """out[r] = src[r] / scales[r] rounded to int16, scales[r] = max |src[r]| / 32767; src
    [R, K] float32. split: src holds each row's even elements, then its odd ones, and out
    takes the 4-bit kernels' layout (wide_order; K a multiple of WIDE); else both are in
    element order. Returns False, leaving the rest undefined, when a row holds a value that
    is not finite: integers cannot carry it, and the float path must compute it."""
    depth = src.shape[1]
    half = depth // 2
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
        if not split:
            for k in range(depth):
                out[r, k] = np.int16(np.rint(row[k] * inverse))
            continue
        for b in range(0, depth, WIDE):  # runs of contiguous elements, which vectorize
            # wide_order's element b + 2p (+ 1 if odd) is src[b / 2 + p] (+ half)
            evens, odds = row[b // 2:b // 2 + CHUNK], row[half + b // 2:half + b // 2 + CHUNK]
            target = out[r, b:b + WIDE]
            for p in range(CHUNK):
                target[p] = np.int16(np.rint(evens[p] * inverse))
            for p in range(CHUNK):
                target[CHUNK + p] = np.int16(np.rint(odds[p] * inverse))
    return True


@njit(cache=True)
def bfloat16_rows(src, out):
    """out = the bits of src (float32 [R, K]) rounded to bfloat16, as int16: the activations of
    e4m3_dots on bfloat16 ones. Rounded in integers to nearest even, a NaN to the quiet one, as
    narrow rounds, with a select where narrow branches: the loop vectorizes."""
    bits, words = src.view(np.uint32), out.view(np.uint16)
    for r in range(src.shape[0]):
        row, target = bits[r], words[r]
        for k in range(row.shape[0]):
            v = row[k]
            nearest = (v + np.uint32(0x7FFF) + ((v >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
            target[k] = np.uint16(0x7FC0) if v & np.uint32(0x7FFFFFFF) > np.uint32(0x7F800000) else np.uint16(nearest)


@njit(cache=True)
def lane_sums(ints, group):
    """out[r, f, l] = the sum of the activations of row r (int16 [R, K], in wide_order) that
    int32 lane l of the int4 kernel's partial sums meets in span f (a scale group, or a step of
    two groups of 32): what symmetric codes' zero takes from the lane, for int4_dots to subtract
    once per span instead of from every code. out: [R, K / max(group, WIDE), INT_LANES]
    float32 (exact, and so is 8 times it: int4's groups of at most 128 give a lane 8
    activations)."""
    span = max(group, WIDE)
    out = np.empty((ints.shape[0], ints.shape[1] // span, INT_LANES), dtype=np.float32)
    halves = np.empty(CHUNK, dtype=np.float32)
    for r in range(ints.shape[0]):
        for f in range(ints.shape[1] // span):
            # a step's lane l meets positions 2l and 2l + 1 of both its halves: each span's halves
            # summed over contiguous runs (loops that vectorize), then their pairs
            halves[:] = 0.0
            for k in range(f * span, (f + 1) * span, WIDE):
                low, high = ints[r, k:k + CHUNK], ints[r, k + CHUNK:k + WIDE]
                for p in range(CHUNK):
                    halves[p] += np.float32(low[p]) + np.float32(high[p])
            target = out[r, f]
            for lane in range(INT_LANES):
                target[lane] = halves[2 * lane] + halves[2 * lane + 1]
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
    starts = np.arange(0, x.shape[1], group)
    in_order = np.arange(x.shape[1])
    if fmt in ("int4", "e2m1"):
        in_order[wide_order(x.shape[1])] = in_order.copy()
    if fmt == "e4m3" and x.dtype == np.int16:  # bfloat16 bits
        x = (x.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    for p in range(pairs):
        for i, first_row in enumerate((n_a, n_b)):
            n = first_row + p * stride
            s = n // per_scale
            values = _code_values(fmt, codes[e, n], zeros[e, s] if has_zeros else None, has_zeros, group)
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
    uint8 like scales when has_zeros, else 8), x in wide_order; reads_wide_chunks(K, group).
    x_sums: lane_sums(x, group), which the vector code takes symmetric codes' zero part from
    (read only where has_zeros is false)."""
    _dots("int4", codes, scales, zeros, has_zeros, e, n_a, n_b, stride, pairs, per_scale, x, rows, start, count, group,
          out)


def e2m1_dots(codes, scales, zeros, has_zeros, e, n_a, n_b, stride, pairs, per_scale, x, x_sums, rows, start,
              count, group, out):
    """int4_dots for e2m1 codes [E, N, K/2] (low nibble first); x_sums unused."""
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


def _nibbles(builder, data, chunk):
    """A step's 32 bytes as their low nibbles (64 codes' even ones) and their high nibbles (the
    odd ones), each <32 x i8>."""
    codes = _chunk_bytes(builder, data, chunk, CHUNK)
    return [builder.and_(codes, _const(I8, 0x0F)), builder.lshr(codes, _const(I8, 4))]


def _int4_values(builder, data, chunk, cpu, zero=None):
    """The step's codes less zero (<32 x i8>), or as they are without one: then their zero
    points' part of the products comes off once per span (lane_sums)."""
    nibbles = _nibbles(builder, data, chunk)
    if zero is None:
        return [builder.zext(n, _vec(I16)) for n in nibbles]
    return [builder.sext(builder.sub(n, zero), _vec(I16)) for n in nibbles]


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


def _e2m1_values(builder, data, chunk, cpu):
    values = []
    for codes in _nibbles(builder, data, chunk):
        if "+avx2" in cpu:  # pshufb: each byte looked up in the 16-byte table (in both halves)
            doubled = _intrinsic_call(builder, "llvm.x86.avx2.pshuf.b", _vec(I8),
                                      [_const(I8, E2M1_DOUBLED.tolist() * 2), codes])
        else:
            doubled = _e2m1_doubled(builder, codes)
        values.append(builder.sext(doubled, _vec(I16)))
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
    """int8, int4 and e2m1 codes against int16 activations: 32-bit partial sums. values gives
    a step's codes as vectors of 32, load_x the activations they meet, in the same order."""

    lanes = INT_LANES
    partial_type = _vec(I32, INT_LANES)
    activation_types = (types.int16,)
    step_bytes = CHUNK  # 32 int8 codes or 64 4-bit ones

    def __init__(self, values, result_factor=1.0, span=CHUNK):
        self.values, self.result_factor, self.span = values, result_factor, span

    def load_x(self, builder, row, element, offset):
        return [_load(builder, row, builder.add(offset, ir.Constant(offset.type, h)), _vec(I16))
                for h in range(0, self.span, CHUNK)]

    def step(self, builder, partial, ws, xs, cpu):
        for w, x in zip(ws, xs):
            partial = builder.add(partial, _multiply_add_pairs(builder, w, x, cpu))
        return partial

    def to_float(self, builder, partial):
        return builder.sitofp(partial, _vec(F32, INT_LANES))


class _FloatKind:
    """e4m3 codes against float activations: float32 partial sums."""

    lanes = CHUNK
    span = step_bytes = CHUNK
    partial_type = _vec(F32, CHUNK)
    activation_types = (types.float32, types.float64)
    values = staticmethod(_e4m3_values)
    result_factor = 256.0  # the codes as float16 bits are worth 2^-8 of their value

    def load_x(self, builder, row, element, offset):
        x = _load(builder, row, offset, _vec(element))
        return [x if element == F32 else builder.fptrunc(x, _vec(F32))]

    def step(self, builder, partial, ws, xs, cpu):
        return builder.fadd(partial, builder.fmul(ws[0], xs[0], flags=("fast",)), flags=("fast",))

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
    bfloat16 pairs in value's and b_vector's 32-bit lanes (total: vector, float32): vdpbf16ps
    when fast, else the pairs widened to float32 (correct on any CPU)."""
    lanes = vector.count

    def fused(builder, total, value, b_vector):
        pairs = ir.VectorType(BF16, 2 * lanes)
        return _intrinsic_call(builder, "llvm.x86.avx512bf16.dpbf16ps.512", vector,
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
    partial_type = _vec(F32, INT_LANES)
    activation_types = (types.int16,)
    values = staticmethod(_e4m3_bfloat16_values)
    result_factor = 1.0

    def load_x(self, builder, row, element, offset):
        return [_load(builder, row, builder.add(offset, ir.Constant(offset.type, h)), _vec(I16)) for h in (0, CHUNK)]

    def step(self, builder, partial, ws, xs, cpu):
        multiply_add = pairs_multiply_add(self.partial_type, bf16_dot_instruction(cpu))
        pairs = _vec(I32, INT_LANES)
        for w, x in zip(ws, xs):
            partial = multiply_add(builder, partial, builder.bitcast(w, pairs), builder.bitcast(x, pairs))
        return partial

    def to_float(self, builder, partial):
        return partial


_KINDS = {"int8": _IntegerKind(_int8_values), "int4": _IntegerKind(_int4_values, span=WIDE),
          "e2m1": _IntegerKind(_e2m1_values, 0.5, WIDE), "e4m3": _FloatKind()}
_E4M3_ON_BFLOAT16 = _BFloat16Kind()


def _kind(fmt, x_dtype):
    """The kind of fmt's kernel for activations of Numba type x_dtype: e4m3 codes meet
    bfloat16 bits (int16) or floats."""
    return _E4M3_ON_BFLOAT16 if fmt == "e4m3" and x_dtype == types.int16 else _KINDS[fmt]


def _e8m0_values(builder, codes):
    """e8m0 scale codes (an i8 or a vector of them) as float32: 2^(s - 127), which for s = 0
    is the subnormal 2^-127."""
    count = getattr(codes.type, "count", None)
    wide, real = (I32, F32) if count is None else (_vec(I32, count), _vec(F32, count))

    def const(value):
        return ir.Constant(wide, value if count is None else [value] * count)

    exponents = builder.zext(codes, wide)
    bits = builder.select(builder.icmp_unsigned("==", exponents, const(0)), const(0x400000),
                          builder.shl(exponents, const(23)))
    return builder.bitcast(bits, real)


def _group_scale(builder, scales, g):
    scale = builder.load(builder.gep(scales, [g]))
    return scale if scale.type == F32 else _e8m0_values(builder, scale)


def _group_zero(builder, zeros, has_zeros, g):
    """Group g's int4 zero point, uint8: its own, or 8."""
    stored = builder.load(builder.gep(zeros, [builder.select(has_zeros, g, ir.Constant(g.type, 0))]))
    return builder.select(has_zeros, stored, ir.Constant(I8, 8))


def _halves(builder, make, groups, n):
    """<n x t>: make(groups[0]) in the first half of the lanes, make(groups[1]) in the second."""
    low, high = (_broadcast(builder, make(g), n // 2) for g in groups)
    return builder.shuffle_vector(low, high, _const(I32, range(n), n))


def _step_scales(builder, scale_rows, g, n):
    """For each of the two weight rows at scale_rows, <n x float>: its scales of groups g and
    g + 1 (a 4-bit step of two groups of 32), one per half of the lanes. mxfp4's every step
    needs them, and building each from a scalar cost as much as the step's multiply-adds at a
    decode step's few rows: the two rows' pairs are loaded and converted as one vector."""
    pairs = [builder.load(builder.bitcast(builder.gep(row, [g]), _vec(row.type.pointee, 2).as_pointer()), align=1)
             for row in scale_rows]
    both = builder.shuffle_vector(*pairs, _const(I32, range(4), 4))
    if both.type.element == I8:
        both = _e8m0_values(builder, both)
    return [builder.shuffle_vector(both, both, _const(I32, [2 * r] * (n // 2) + [2 * r + 1] * (n // 2), n))
            for r in range(2)]


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

    def __init__(self, context, builder, sig, args):
        args = [context.cast(builder, v, t, types.intp) if i in INDEX_ARGUMENTS else v
                for i, (v, t) in enumerate(zip(args, sig.args))]
        (_, _, _, self.has_zeros, self.e, self.n_a, self.n_b, self.stride, self.pairs, self.per_scale, _, _, _,
         start, self.num_rows, self.group, _) = args
        self.arrays = [context.make_array(sig.args[i])(context, builder, args[i]) for i in (0, 1, 2)]
        x, x_sums, rows, out = (context.make_array(sig.args[i])(context, builder, args[i]) for i in (10, 11, 12, 16))
        self.x = x.data
        self.x_element = context.get_value_type(sig.args[10].dtype)
        self.depth = cgutils.unpack_tuple(builder, x.shape, 2)[1]
        self.x_sums = x_sums.data
        _, spans, lanes = cgutils.unpack_tuple(builder, x_sums.shape, 3)
        self.x_sums_width = builder.mul(spans, lanes)
        self.zero_points = True  # int4: whether the code reads zero points (else they are 8)
        self.whole_spans = False  # whether K is known to hold whole flush spans (see _emit_group_sizes)
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


def _prefetch(builder, data, offset):
    """A hint to load data[offset] into the caches (read, high locality): never a fault."""
    pointer = builder.gep(data, [offset])
    fn = builder.module.declare_intrinsic("llvm.prefetch", fnty=ir.FunctionType(ir.VoidType(),
                                                                                 [pointer.type, I32, I32, I32]))
    builder.call(fn, [pointer, ir.Constant(I32, 0), ir.Constant(I32, 3), ir.Constant(I32, 1)])


def _emit_pass(builder, fmt, cpu, ops, first, count):
    """The code for count activation rows from the first-th of ops.rows: for each pair of
    weight rows, every group and its chunks, then the sums stored in ops.out. The rows' setup
    is made once for all pairs: a call per pair cost half of a 1024-deep pair's time."""
    index = ops.depth.type
    x_rows, sums_rows = [], []
    for j in range(count):
        row = builder.sext(builder.load(builder.gep(ops.rows, [builder.add(first, ir.Constant(index, j))])), index)
        x_rows.append(builder.gep(ops.x, [builder.mul(row, ops.depth)]))
        sums_rows.append(builder.gep(ops.x_sums, [builder.mul(row, ops.x_sums_width)]) if fmt == "int4" else None)
    with cgutils.for_range(builder, ops.pairs) as pair_loop:
        ops.at_pair(builder, pair_loop.index)
        _emit_pair(builder, fmt, cpu, ops, x_rows, sums_rows, first, pair_loop.index)


# Activation rows per pass up to which symmetric int4 codes go in as they are, their zero's part
# of each span's products taken off at its end (8 times lane_sums), rather than the zero taken
# off every code: one step of codes meets few rows, whereas the subtraction costs per span and
# row (one core, [1024, 1024] experts in groups of 128: 1.24x faster at 1 row, 1.14x at 2, and
# at 4 rows folded 0.93x).
FOLDED_ROWS = 2


def _flush_span(builder, group, kind):
    """The elements whose sums turn into float32 at once: a group, or a step where a 4-bit
    step holds two groups of 32."""
    span = ir.Constant(group.type, kind.span)
    return builder.select(builder.icmp_signed(">", group, span), group, span)


def _emit_pair(builder, fmt, cpu, ops, x_rows, sums_rows, first, p):
    """The code for pair p of weight rows (ops.at_pair) against the activation rows at x_rows
    (and int4's lane sums at sums_rows): every group and its chunks, then the sums stored in
    rows 2p and 2p + 1 of ops.out."""
    kind = ops.kind
    index = ops.depth.type
    count = len(x_rows)
    fold = fmt == "int4" and not ops.zero_points and count <= FOLDED_ROWS
    slots = [(r, j) for r in range(2) for j in range(count)]  # (weight row, activation row)
    partials = {q: cgutils.alloca_once(builder, kind.partial_type) for q in slots}
    sums = {q: cgutils.alloca_once(builder, _vec(F32, kind.lanes)) for q in slots}
    for q in slots:
        builder.store(ir.Constant(kind.partial_type, None), partials[q])
        builder.store(_const(F32, 0.0, kind.lanes), sums[q])
    group, span = ops.group, ir.Constant(index, kind.span)
    flush_span = _flush_span(builder, group, kind)
    num_groups = builder.udiv(builder.add(ops.depth, builder.sub(flush_span, ir.Constant(index, 1))), flush_span)
    long_groups = builder.icmp_signed(">", group, ir.Constant(index, FLUSH))
    with cgutils.for_range(builder, num_groups) as group_loop:
        k0 = builder.mul(group_loop.index, flush_span)
        k1 = builder.add(k0, flush_span) if ops.whole_spans else _min(builder, builder.add(k0, flush_span), ops.depth)
        # the groups of the first and second half of a step's lanes
        halves = [builder.udiv(k0, group)]
        halves.append(halves[0] if kind.span == CHUNK else
                      builder.udiv(builder.add(k0, ir.Constant(index, kind.span // 2)), group))
        if isinstance(group, ir.Constant) and kind.span == 2 * group.constant:
            scales = _step_scales(builder, ops.scales, halves[0], kind.lanes)
        else:
            scales = [_halves(builder, functools.partial(_group_scale, builder, ops.scales[r]), halves, kind.lanes)
                      for r in range(2)]
        zeros = None  # int4's, per lane of the step's codes (<32 x i8>), unless folded
        if fmt == "int4" and not fold:
            zeros = [_halves(builder, functools.partial(_group_zero, builder, ops.zeros[r], ops.has_zeros), halves,
                             CHUNK) if ops.zero_points else _const(I8, 8) for r in range(2)]
        first_chunk = builder.udiv(k0, span)

        def flush(last):
            for r, j in slots:
                partial = kind.to_float(builder, builder.load(partials[r, j]))
                if fold and last:  # the zero points' part of the span's products, at once
                    sums_at = builder.gep(sums_rows[j], [builder.mul(group_loop.index, ir.Constant(index, kind.lanes))])
                    x_sums = _load(builder, sums_at, ir.Constant(index, 0), _vec(F32, kind.lanes))
                    partial = builder.fsub(partial, builder.fmul(x_sums, _const(F32, 8.0, kind.lanes)))
                scaled = builder.fmul(partial, scales[r], flags=("fast",))
                builder.store(builder.fadd(builder.load(sums[r, j]), scaled, flags=("fast",)), sums[r, j])
                builder.store(ir.Constant(kind.partial_type, None), partials[r, j])

        with cgutils.for_range(builder, builder.udiv(builder.sub(k1, k0), span)) as c:
            chunk = builder.add(first_chunk, c.index)
            offset = builder.mul(chunk, span)
            xs = [kind.load_x(builder, x_row, ops.x_element, offset) for x_row in x_rows]
            for r in range(2):
                _prefetch(builder, ops.codes[r], builder.add(builder.mul(chunk, ir.Constant(index, kind.step_bytes)),
                                                             ir.Constant(index, PREFETCH_BYTES)))
                w = kind.values(builder, ops.codes[r], chunk, cpu, *([] if zeros is None else [zeros[r]]))
                for j in range(count):
                    builder.store(kind.step(builder, builder.load(partials[r, j]), w, xs[j], cpu), partials[r, j])
            # a group longer than FLUSH elements flushes on the way too
            span_done = builder.icmp_unsigned("==", builder.and_(builder.add(c.index, ir.Constant(index, 1)),
                                                                 ir.Constant(index, FLUSH // kind.span - 1)),
                                              ir.Constant(index, 0))
            with builder.if_then(builder.and_(long_groups, span_done), likely=False):
                flush(False)
        flush(True)
    for r, j in slots:
        total = builder.fmul(horizontal_sum(builder, builder.load(sums[r, j])), ir.Constant(F32, kind.result_factor))
        out_row = builder.add(builder.mul(p, ir.Constant(index, 2)), ir.Constant(index, r))
        column = builder.add(first, ir.Constant(index, j))
        builder.store(total, builder.gep(ops.out, [builder.add(builder.mul(out_row, ops.out_width), column)]))


# Group sizes the code is specialized for, per format, where K holds whole groups: a group's
# trip count known, LLVM unrolls its chunks and drops the loop. Other sizes take the general
# code. mxfp4's scales take 32 columns, fp8's blocks 128: a copy for another size would only
# lengthen the compile (an fp8 decode step's first call: 41 s with copies for 32 and 64).
GROUP_SIZES = {"int8": (32, 64, 128), "int4": (32, 64, 128), "e2m1": (32,), "e4m3": (128,)}


def _emit_group_sizes(builder, fmt, cpu, ops, sizes):
    """The passes, in a copy per group size of sizes (one compare each) and one for the rest."""
    if not sizes:
        _emit_passes(builder, fmt, cpu, ops)
        return
    size = ir.Constant(ops.group.type, sizes[0])
    # K in whole flush spans too (not so where fp8's last block is partial): a span's steps are
    # then a constant number, which LLVM unrolls with no bounds to check (1.2-1.6x at one row)
    flush_span = _flush_span(builder, size, ops.kind)
    whole = builder.icmp_signed("==", builder.srem(ops.depth, flush_span), ir.Constant(size.type, 0))
    with builder.if_else(builder.and_(builder.icmp_signed("==", ops.group, size), whole)) as (known, other):
        with known:
            general, ops.group, ops.whole_spans = ops.group, size, True
            _emit_passes(builder, fmt, cpu, ops)
            ops.group, ops.whole_spans = general, False
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
                or x_sums.dtype != types.float32 or rows.dtype != types.int32 or out.dtype != types.float32):
            return None
        indices = (e, n_a, n_b, stride, pairs, per_scale, start, count, group)
        if not all(isinstance(i, types.Integer) for i in indices):
            return None
        signature = types.void(codes, scales, zeros, has_zeros, e, n_a, n_b, stride, pairs, per_scale, x, x_sums, rows,
                               start, count, group, out)

        def codegen(context, builder, sig, args):
            cpu = cpu_features if cpu_features is not None else context.codegen()._get_host_cpu_features()
            ops = _Operands(context, builder, sig, args)
            ops.kind = kind
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
