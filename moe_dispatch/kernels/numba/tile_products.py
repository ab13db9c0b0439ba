"""Products of bfloat16 activation rows with bfloat16 expert weights on AMX tiles (Intel's
Advanced Matrix Extensions, Xeon from Sapphire Rapids on): the blocked path's products,
with no copy of the weights, and SwiGLU applied in GEMM1's epilogue. Quantized weights take
the same loop, each slice of weights dequantized to bfloat16 into L1 as the tiles reach it.

oneDNN multiplies bfloat16 on the same tiles, but first reorders each expert's [N, K] weight
into its own layout, on every call: at 16-128 rows per expert that copy costs about what the
product does. The tile instruction (tdpbf16ps) takes a left tile of 16 rows of 32 bfloat16
and a right tile whose rows hold pairs along K; 16 rows of a weight's own [N, K] layout are
such a left tile. So the roles swap: out.T = w @ a.T, the weight tiles read in place, the
few activation rows transposed into pairs once per call, and each 16x16 float32 result
transposed back in registers on its way out, bias added and rounded to bfloat16 (oneDNN's
rounding: to nearest even), or, for GEMM1 of a gated activation in EPILOGUES, the gate and up
tiles of 16 output columns rounded so and activated (a vector exp here: Numba's has no vector
math library).

Loop order: blocks of 32 weight rows (2 tiles), each against every block of 32 activation
rows (2 tiles; 8 tile registers with the 4 of sums), K in slices of SLICE_PAIRS: each slice
of the weight block stays in L1 while it meets the activation blocks, read from memory once,
while up to CHUNK_BYTES of transposed activations stay in the L2 cache.

Linux hands out the tile registers' state only to a process that asks for it (arch_prctl
ARCH_REQ_XCOMP_PERM); tiles_available() asks once, and the products run only where the CPU
and the kernel say yes and Numba compiles (NUMBA_DISABLE_JIT=1 leaves them out).
"""

from __future__ import annotations

import ctypes
import functools
import platform
import sys
import threading

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from ...activations import IDENTITY
from .activations import CLAMPED_SWIGLU, FUSED_CLASSES, SWIGLU, code_of, code_of_type
from .caching import njit
from .packed_dots import (BF16, F32, I8, I32, _broadcast, _const, _intrinsic_call, _prefetch, _row_start, _vec,
                          reads_chunks)
from .quantized import dequantize_row
from .vector_math import emit_exp
from .vector_width import host_cpu_features

TILE = 16  # rows of a tile, and float32 columns of a sum tile
DEPTH = 32  # bfloat16 elements of K per tile step: 64 bytes per tile row
# Bytes of transposed activations each pass over the weights keeps in the L2 cache (a
# thread's share on a 2 MB-per-core Xeon, with the weight block and the sums beside it).
CHUNK_BYTES = 512 * 1024
CHUNK_ROWS = 256  # at most, with their sums for 32 weight rows (32 KB) beside the slice below
# Pairs of K per slice of the weight block: each slice of 32 weight rows (16 KB) stays in the
# L1 cache while it meets every activation block.
SLICE_PAIRS = 128
# A quantized weight's slices are dequantized once per pass over the activations: passes of
# twice the rows dequantize half as often, worth more than the activations lost from L2
# (olmoe-1b-7b x0.5 at 512 rows per expert: int8 1.05x, fp8 1.10x faster; bfloat16 gained
# nothing from them).
QUANTIZED_CHUNK_BYTES, QUANTIZED_CHUNK_ROWS = 2 * CHUNK_BYTES, 2 * CHUNK_ROWS
# Every buffer a tile reads or writes starts on a cache line: a tile row from a line's middle
# is two lines' load (NumPy's large buffers start 16 bytes past a page, Numba's 32 past a line).
LINE = 64

_I64 = ir.IntType(64)
_VOID = ir.VoidType()
_ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA, _SYS_ARCH_PRCTL = 0x1023, 18, 158


@functools.cache
def tiles_available() -> bool:
    """Whether tile_products runs here: a CPU with AMX-BF16 that Numba compiles for, and a
    Linux kernel that grants this process the tile state."""
    features = host_cpu_features()
    if numba.config.DISABLE_JIT or "+amx-tile" not in features or "+amx-bf16" not in features:
        return False
    if not sys.platform.startswith("linux") or platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.syscall(_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA) == 0


# Tile registers: 4 of sums (2 weight tiles by 2 activation tiles), 2 of weights, 2 of activations.
_SUMS, _WEIGHTS, _ACTIVATIONS = 0, 4, 6


def tile_config(pairs: int = DEPTH // 2) -> np.ndarray:
    """The tile configuration (palette 1) for steps of `pairs` pairs along K (16, or fewer for
    the last step of a K that is no multiple of 32): weight tiles of 16 rows of that many
    pairs, activation tiles of that many rows of 16 (pairs of 16 activation rows)."""
    config = np.zeros(64, dtype=np.uint8)
    config[0] = 1
    bytes_per_row, rows = config[16:32].view(np.uint16), config[48:56]
    bytes_per_row[:8], rows[:8] = 4 * TILE, TILE
    bytes_per_row[_WEIGHTS:_WEIGHTS + 2] = 4 * pairs
    rows[_ACTIVATIONS:_ACTIVATIONS + 2] = pairs
    return config


_CONFIG = tile_config()


@functools.cache
def tail_config(depth: int) -> np.ndarray:
    """The configuration of the last step along K = depth (that of every step when K is a
    multiple of 32)."""
    return tile_config(depth // 2 % TILE or TILE)


def _tile(number):
    return ir.Constant(I8, number)


def _at(context, builder, array_type, array, row, column):
    """(the address of array[row, column] as a byte pointer, the array's row stride in bytes)."""
    a = context.make_array(array_type)(context, builder, array)
    row_stride, column_stride = cgutils.unpack_tuple(builder, a.strides, 2)
    offset = builder.add(builder.mul(row, row_stride), builder.mul(column, column_stride))
    return builder.gep(builder.bitcast(a.data, I8.as_pointer()), [offset]), row_stride


def _indices(context, builder, sig, args):
    return [context.cast(builder, a, t, types.intp) if isinstance(t, types.Integer) else a
            for a, t in zip(args, sig.args)]


def _transposed(builder, rows):
    """The 16 rows (vectors of 16 32-bit lanes) transposed: halves, then quarters, ... of the
    rows swapped with those of the rows 8, 4, 2, 1 further on, 64 two-source shuffles."""
    rows = list(rows)
    step = TILE // 2
    while step:
        low = _const(I32, [lane if not lane & step else TILE + lane - step for lane in range(TILE)], TILE)
        high = _const(I32, [lane + step if not lane & step else TILE + lane for lane in range(TILE)], TILE)
        for r in range(TILE):
            if not r & step:
                rows[r], rows[r + step] = (builder.shuffle_vector(rows[r], rows[r + step], low),
                                           builder.shuffle_vector(rows[r], rows[r + step], high))
        step //= 2
    return rows


@intrinsic
def _configure(typingctx, config):
    def codegen(context, builder, sig, args):
        data = context.make_array(sig.args[0])(context, builder, args[0]).data
        _intrinsic_call(builder, "llvm.x86.ldtilecfg", _VOID, [builder.bitcast(data, I8.as_pointer())])
        return context.get_dummy_value()

    return types.void(config), codegen


@intrinsic
def _release(typingctx):
    def codegen(context, builder, sig, args):
        _intrinsic_call(builder, "llvm.x86.tilerelease", _VOID, [])
        return context.get_dummy_value()

    return types.void(), codegen


@intrinsic
def _pack(typingctx, src, row, column, count, lanes, dst, dst_row, dst_column):
    """dst[dst_row + j, dst_column + i] = src[row + i, column + j] for i < count, j < lanes
    (at most 16), and 0 elsewhere in the 16x16 block: 32-bit elements (pairs of bfloat16), any
    row strides; nothing read past a row's column + lanes."""
    def codegen(context, builder, sig, args):
        src, row, column, count, lanes, dst, dst_row, dst_column = _indices(context, builder, sig, args)
        vector = _vec(I32, TILE)
        whole = builder.icmp_signed("==", lanes, ir.Constant(_I64, TILE))
        part = cgutils.alloca_once(builder, vector)
        rows = []
        for i in range(TILE):
            value = cgutils.alloca_once_value(builder, ir.Constant(vector, None))
            with builder.if_then(builder.icmp_signed("<", ir.Constant(_I64, i), count)):
                at, _ = _at(context, builder, sig.args[0], src, builder.add(row, ir.Constant(_I64, i)), column)
                with builder.if_else(whole) as (then, otherwise):
                    with then:
                        builder.store(builder.load(builder.bitcast(at, vector.as_pointer()), align=4), value)
                    with otherwise:
                        builder.store(ir.Constant(vector, None), part)
                        cgutils.raw_memcpy(builder, builder.bitcast(part, I8.as_pointer()), at, lanes, 4)
                        builder.store(builder.load(part), value)
            rows.append(builder.load(value))
        for j, values in enumerate(_transposed(builder, rows)):
            at, _ = _at(context, builder, sig.args[5], dst, builder.add(dst_row, ir.Constant(_I64, j)), dst_column)
            builder.store(values, builder.bitcast(at, vector.as_pointer()), align=4)
        return context.get_dummy_value()

    return types.void(src, row, column, count, lanes, dst, dst_row, dst_column), codegen


def _block_intrinsic(w_tiles, x_tiles):
    """sums[16 s + i, m + 16 t + j] (+)= w[n + s * second + i, k - first + w_first] .
    a[m + 16 t + j, k] over the pairs k of steps * 16 from first, for s < w_tiles, t < x_tiles:
    w [N, K/2] (or the slice of it from pair w_first on that _weight_slice made) and packed
    [K/2 rounded up to 16, 32] (the pairs of the activation rows m:m + 32, transposed by
    _pack) as uint32; the sums start from zero, or from what sums holds when accumulate."""
    sums = [[_SUMS + 2 * s + t for t in range(x_tiles)] for s in range(w_tiles)]
    w_tile = [_WEIGHTS + s for s in range(w_tiles)]
    x_tile = [_ACTIVATIONS + t for t in range(x_tiles)]

    @intrinsic
    def block(typingctx, w, n, second, w_first, packed, m, out, first, steps, accumulate):
        def codegen(context, builder, sig, args):
            w, n, second, w_first, packed, m, out, first, steps, accumulate = _indices(context, builder, sig, args)
            w_rows = [n, builder.add(n, second)]

            def sums_at(s, t):
                return _at(context, builder, sig.args[6], out, ir.Constant(_I64, TILE * s),
                           builder.add(m, ir.Constant(_I64, TILE * t)))

            with builder.if_else(accumulate) as (then, otherwise):
                with then:
                    for s in range(w_tiles):
                        for t in range(x_tiles):
                            _intrinsic_call(builder, "llvm.x86.tileloadd64", _VOID,
                                            [_tile(sums[s][t]), *sums_at(s, t)])
                with otherwise:
                    for s in range(w_tiles):
                        for t in range(x_tiles):
                            _intrinsic_call(builder, "llvm.x86.tilezero", _VOID, [_tile(sums[s][t])])
            pairs_per_step = ir.Constant(_I64, DEPTH // 2)
            with cgutils.for_range(builder, steps) as loop:
                step = builder.mul(loop.index, pairs_per_step)
                k, w_k = builder.add(first, step), builder.add(w_first, step)
                ahead, _ = _at(context, builder, sig.args[4], packed, builder.add(k, pairs_per_step),
                               ir.Constant(_I64, 0))
                for line in range(0, x_tiles * TILE * 4 * TILE, 64):
                    _prefetch(builder, ahead, ir.Constant(_I64, line))
                # each operand loaded just before its first product, so that loads overlap the
                # products in flight (tiles are not renamed: a load waits for the products
                # still reading the tile it overwrites)
                for s in range(w_tiles):
                    at, stride = _at(context, builder, sig.args[0], w, w_rows[s], w_k)
                    _intrinsic_call(builder, "llvm.x86.tileloadd64", _VOID, [_tile(w_tile[s]), at, stride])
                    for t in range(x_tiles):
                        if s == 0:
                            at, stride = _at(context, builder, sig.args[4], packed, k, ir.Constant(_I64, TILE * t))
                            _intrinsic_call(builder, "llvm.x86.tileloadd64", _VOID, [_tile(x_tile[t]), at, stride])
                        _intrinsic_call(builder, "llvm.x86.tdpbf16ps", _VOID,
                                        [_tile(sums[s][t]), _tile(w_tile[s]), _tile(x_tile[t])])
            for s in range(w_tiles):
                for t in range(x_tiles):
                    _intrinsic_call(builder, "llvm.x86.tilestored64", _VOID, [_tile(sums[s][t]), *sums_at(s, t)])
            return context.get_dummy_value()

        return types.void(w, n, second, w_first, packed, m, out, first, steps, accumulate), codegen

    return block


_block_2x2, _block_2x1, _block_1x2, _block_1x1 = (_block_intrinsic(w_tiles, x_tiles)
                                                  for w_tiles, x_tiles in ((2, 2), (2, 1), (1, 2), (1, 1)))


def _result_rows(context, builder, sums_type, sums, row, column, bias_type, bias, has_bias, n):
    """sums[row + j, column + i] + bias[n + j] (bias only when has_bias) as 16 float32 vectors
    over j, one per i: a 16x16 sums tile transposed back, its bias added."""
    vector = _vec(F32, TILE)
    rows = []
    for j in range(TILE):
        at, _ = _at(context, builder, sums_type, sums, builder.add(row, ir.Constant(_I64, j)), column)
        rows.append(builder.load(builder.bitcast(at, vector.as_pointer()), align=4))
    bias_at = builder.gep(context.make_array(bias_type)(context, builder, bias).data, [n])
    added = builder.select(has_bias, builder.load(builder.bitcast(bias_at, vector.as_pointer()), align=4),
                           ir.Constant(vector, None))
    return [builder.fadd(values, added) for values in _transposed(builder, rows)]


def _store_row(context, builder, out_type, out, m, i, n, count, values):
    """out[m + i, n:n + 16] = values rounded to bfloat16 (to nearest even), when i < count."""
    with builder.if_then(builder.icmp_signed("<", ir.Constant(_I64, i), count)):
        rounded = builder.fptrunc(values, _vec(BF16, TILE))
        at, _ = _at(context, builder, out_type, out, builder.add(m, ir.Constant(_I64, i)), n)
        builder.store(rounded, builder.bitcast(at, rounded.type.as_pointer()), align=2)


@intrinsic
def _store(typingctx, sums, row, column, count, bias, has_bias, out, m, n):
    """out[m + i, n + j] = bfloat16(sums[row + j, column + i] + bias[n + j]) for i < count,
    j < 16 (bias only when has_bias)."""
    def codegen(context, builder, sig, args):
        sums, row, column, count, bias, has_bias, out, m, n = _indices(context, builder, sig, args)
        values = _result_rows(context, builder, sig.args[0], sums, row, column, sig.args[4], bias, has_bias, n)
        for i, row_values in enumerate(values):
            _store_row(context, builder, sig.args[6], out, m, i, n, count, row_values)
        return context.get_dummy_value()

    return types.void(sums, row, column, count, bias, has_bias, out, m, n), codegen


def _sigmoid_times(builder, z, y):
    """y * sigmoid(z) as y / (1 + e^-z): e^-z overflowing to infinity gives y's signed zero."""
    negated = builder.fsub(_const(F32, -0.0, TILE), z)
    return builder.fdiv(y, builder.fadd(_const(F32, 1.0, TILE), emit_exp(builder, negated)))


def _swiglu(builder, g, u, alpha, limit):
    return builder.fmul(_sigmoid_times(builder, g, g), u)


def _clamped_swiglu(builder, g, u, alpha, limit):
    """gpt-oss's: the gate clamped from above, up within +-limit (NaN passes both, as torch's
    clamp passes it), (up + 1) * gate * sigmoid(alpha * gate)."""
    gate = builder.select(builder.fcmp_ordered(">", g, limit), limit, g)
    neg = builder.fsub(_const(F32, -0.0, TILE), limit)
    up = builder.select(builder.fcmp_ordered(">", u, limit), limit,
                        builder.select(builder.fcmp_ordered("<", u, neg), neg, u))
    glu = _sigmoid_times(builder, builder.fmul(alpha, gate), gate)
    return builder.fmul(builder.fadd(up, _const(F32, 1.0, TILE)), glu)


# The gated activations the tile products apply in their epilogue (the others run between the
# products, as torch defines them), and the stand-in that asks for the product itself.
EPILOGUES = {SWIGLU: _swiglu, CLAMPED_SWIGLU: _clamped_swiglu}
PRODUCT = FUSED_CLASSES[IDENTITY](0.0, 0.0, 1, 0)


@intrinsic
def _store_activated(typingctx, sums, column, count, bias, has_bias, row, second, interleaved, act, out, m, n):
    """out[m + i, n + j] = bfloat16(act(gate, up)) for i < count, j < 16, where the sums tiles
    hold GEMM1's rows row:row + 16 (sums rows 0:16) and row + second: row + second + 16
    (sums rows 16:32) at columns column + i, each plus its bias (when has_bias) and rounded to
    bfloat16 as the GEMM1 output is: gate j and up j are the first tile's and the second's row
    j, or, interleaved, rows 2j and 2j + 1 of the two tiles' 32."""
    def codegen(context, builder, sig, args):
        sums, column, count, bias, has_bias, row, second, interleaved, act, out, m, n = _indices(
            context, builder, sig, args)
        fields = sig.args[8].types  # FusedActivation's: p0, p1, step, shift
        # a code without an epilogue (PRODUCT's, where the caller stores the product instead)
        # leaves NaN
        epilogue = EPILOGUES.get(code_of_type(sig.args[8]), lambda *args: _const(F32, float("nan"), TILE))
        alpha, limit = (_broadcast(builder, context.cast(builder, builder.extract_value(act, i), fields[i],
                                                               types.float32), TILE) for i in (0, 1))
        vector = _vec(F32, TILE)
        tiles = []
        for s, first in enumerate((row, builder.add(row, second))):
            values = _result_rows(context, builder, sig.args[0], sums, ir.Constant(_I64, TILE * s), column,
                                  sig.args[3], bias, has_bias, first)
            tiles.append([builder.fpext(builder.fptrunc(v, _vec(BF16, TILE)), vector) for v in values])
        evens = _const(I32, range(0, 2 * TILE, 2), TILE)
        odds = _const(I32, range(1, 2 * TILE, 2), TILE)
        result = cgutils.alloca_once(builder, vector)
        for i in range(TILE):
            first, second_tile = tiles[0][i], tiles[1][i]
            gate = builder.select(interleaved, builder.shuffle_vector(first, second_tile, evens), first)
            up = builder.select(interleaved, builder.shuffle_vector(first, second_tile, odds), second_tile)
            with builder.if_then(builder.icmp_signed("<", ir.Constant(_I64, i), count)):
                builder.store(epilogue(builder, gate, up, alpha, limit), result)
            _store_row(context, builder, sig.args[9], out, m, i, n, count, builder.load(result))
        return context.get_dummy_value()

    return types.void(sums, column, count, bias, has_bias, row, second, interleaved, act, out, m, n), codegen


@njit(cache=True, nogil=True, inline="always")
def _blocks(w, e, n, second, chunk, padded, sums, k, steps, two_w, values, next_n, next_k):
    """The pairs k:k + 16 steps of expert e's weight rows n:n + 16 and (two_w) n + second:n +
    second + 16 against every block of the chunk's rows, into sums (added to what they hold
    from k > 0); the blocks reach the slice of rows next_n and pairs next_k next."""
    rows, n, second, w_k = _weight_slice(w, e, n, second, two_w, k, steps * TILE, values, next_n, next_k)
    for m in range(0, padded, 2 * TILE):
        x = chunk[m // (2 * TILE)]
        if not two_w:
            if padded - m >= 2 * TILE:
                _block_1x2(rows, n, second, w_k, x, m, sums, k, steps, k > 0)
            else:
                _block_1x1(rows, n, second, w_k, x, m, sums, k, steps, k > 0)
        elif padded - m >= 2 * TILE:
            _block_2x2(rows, n, second, w_k, x, m, sums, k, steps, k > 0)
        else:
            _block_2x1(rows, n, second, w_k, x, m, sums, k, steps, k > 0)


def _weight_slice(w, e, n, second, two_w, k, pairs, values, next_n, next_k):
    """(rows, n, second, w_k): where the blocks read the pairs k:k + pairs of expert e's
    weight rows n:n + 16 and (two_w) n + second:n + second + 16: in place for a bfloat16
    weight (uint32 [E, N, K/2]); for a quantized one (QuantizedRows), dequantized into values
    (uint32 [32, SLICE_PAIRS]: 16 KB that stay in the L1 cache while the tiles read them),
    with the codes of the slice the tiles reach next (rows from next_n, pairs from next_k)
    asked for: a slice's few lines per row are too short a stream for the hardware's
    prefetchers, and without the hint each slice waited on its codes."""


@overload(_weight_slice)
def _weight_slice_overload(w, e, n, second, two_w, k, pairs, values, next_n, next_k):
    if isinstance(w, types.Array):
        return lambda w, e, n, second, two_w, k, pairs, values, next_n, next_k: (w[e], n, second, k)

    def dequantized(w, e, n, second, two_w, k, pairs, values, next_n, next_k):
        row_bytes = w.codes.shape[2]
        span, ahead = row_bytes * 2 * pairs // w.depth, row_bytes * 2 * next_k // w.depth
        for i in range(TILE):
            _prefetch_bytes(w.codes, e, next_n + i, ahead, span)
            if two_w:
                _prefetch_bytes(w.codes, e, next_n + second + i, ahead, span)
        bits = values.view(np.uint16)
        for i in range(TILE):
            dequantize_row(w, e, n + i, 2 * k, bits[i, :2 * pairs])
            if two_w:
                dequantize_row(w, e, n + second + i, 2 * k, bits[TILE + i, :2 * pairs])
        return values, 0, TILE, 0

    return dequantized


@intrinsic
def _prefetch_bytes(typingctx, codes, e, n, first, count):
    """A hint to bring codes[e, n, first:first + count] (uint8 [E, N, B]) into the caches, line
    by line; never a fault, wherever it points."""
    def codegen(context, builder, sig, args):
        codes, e, n, first, count = _indices(context, builder, sig, args)
        row = _row_start(builder, context.make_array(sig.args[0])(context, builder, codes), e, n)
        line = ir.Constant(_I64, LINE)
        lines = builder.udiv(builder.add(count, ir.Constant(_I64, LINE - 1)), line)
        with cgutils.for_range(builder, lines) as loop:
            _prefetch(builder, row, builder.add(first, builder.mul(loop.index, line)))
        return context.get_dummy_value()

    return types.void(codes, e, n, first, count), codegen


def _chunk_rows(w):
    """The most activation rows a pass over the weights takes."""


@overload(_chunk_rows, inline="always")
def _chunk_rows_overload(w):
    if isinstance(w, types.Array):
        return lambda w: CHUNK_ROWS
    return lambda w: QUANTIZED_CHUNK_ROWS


def _width(w):
    """N of a weight as expert_products takes it."""


@overload(_width, inline="always")
def _width_overload(w):
    if isinstance(w, types.Array):
        return lambda w: w.shape[1]
    return lambda w: w.codes.shape[1]


@njit(cache=True, nogil=True)
def _expert_product(a, w, e, out, bias, has_bias, packed, sums, tail_config, act, inter, interleaved, values):
    rows, pairs = a.shape
    width = _width(w)
    whole = pairs // TILE * TILE  # pairs in whole steps; the rest in one step of tail_config
    depth = -(-pairs // TILE) * TILE
    block_words = depth * 2 * TILE  # one block of 32 activation rows, transposed
    chunk_rows = min(sums.shape[1], max(2 * TILE, packed.size // block_words * (2 * TILE)))
    # Blocks of weight rows n:n + 16 and n + second:n + second + 16: 32 consecutive rows, or
    # with an activation, the gate and up rows of 16 columns of its output.
    gated = code_of(act) != IDENTITY
    step = TILE if gated else 2 * TILE
    second = (TILE if interleaved else inter) if gated else TILE
    for first in range(0, rows, chunk_rows):
        count = min(chunk_rows, rows - first)
        padded = -(-count // TILE) * TILE
        blocks = -(-padded // (2 * TILE))
        chunk = packed[:blocks * block_words].reshape(blocks, depth, 2 * TILE)
        for m in range(0, padded, TILE):
            for k in range(0, pairs, TILE):
                _pack(a, first + m, k, min(TILE, count - m), min(TILE, pairs - k), chunk[m // (2 * TILE)], k,
                      m % (2 * TILE))
        for column in range(0, inter if gated else width, step):
            n = 2 * column if gated and interleaved else column
            next_n = n + (2 * step if gated and interleaved else step)
            two_w = gated or width - n >= 2 * TILE
            for k in range(0, whole, SLICE_PAIRS):
                steps = min(SLICE_PAIRS, whole - k) // TILE
                if k + SLICE_PAIRS < pairs:
                    _blocks(w, e, n, second, chunk, padded, sums, k, steps, two_w, values, n, k + SLICE_PAIRS)
                else:
                    _blocks(w, e, n, second, chunk, padded, sums, k, steps, two_w, values, next_n, 0)
            if whole < pairs:
                _configure(tail_config)
                _blocks(w, e, n, second, chunk, padded, sums, whole, 1, two_w, values, next_n, 0)
                _configure(_CONFIG)
            for m in range(0, padded, TILE):
                if gated:
                    _store_activated(sums, m, min(TILE, count - m), bias, has_bias, n, second, interleaved, act,
                                     out, first + m, column)
                else:
                    for s in range(2 if two_w else 1):
                        _store(sums, TILE * s, m, min(TILE, count - m), bias, has_bias, out, first + m, n + TILE * s)


@njit(cache=True, nogil=True, inline="always")
def _on_lines(flat, size):
    """size of flat's elements (flat holds LINE bytes more), from its first cache line's start."""
    skip = (LINE - flat.ctypes.data % LINE) % LINE // flat.itemsize
    return flat[skip:skip + size]


@njit(cache=True, nogil=True)
def expert_products(a, w, bounds, first, last, start, stop, out, bias, has_bias, packed, tail_config, act, inter,
                    interleaved):
    """out[r - start] = a[r - start] @ w[e].T (+ bias[e - first]) for each expert e in
    first:last and each of its rows r in bounds[e]:bounds[e + 1] within start:stop; a
    [stop - start, K/2] and w [E, N, K/2] as uint32 (pairs of bfloat16), or w a quantized
    weight (quantized.QuantizedRows, K and its groups in whole chunks: fits_quantized), its
    32-row slices dequantized to bfloat16 as the tiles reach them; out [stop - start, N]
    as uint16 (bfloat16 bits), bias [last - first, N] float32 (read when has_bias, else a
    [1, N] stand-in); N a multiple of 16, K even; tail_config: tail_config(K). packed: uint32
    scratch of at least 32 * K/2 elements, rounded up to 16 pairs (scratch()). With act (a
    FusedActivation) of a code in EPILOGUES, out [stop - start, inter] gets that activation of
    the product instead (gate and up columns as gate_up_columns lays them out: the first
    inter then the rest, or interleaved; inter a multiple of 16); act PRODUCT: the product.
    Call only where tiles_available()."""
    chunk_rows = _chunk_rows(w)
    sums = _on_lines(np.empty(2 * TILE * chunk_rows + LINE, dtype=np.float32),
                     2 * TILE * chunk_rows).reshape((2 * TILE, chunk_rows))
    values = _on_lines(np.empty(2 * TILE * SLICE_PAIRS + LINE, dtype=np.uint32),
                       2 * TILE * SLICE_PAIRS).reshape((2 * TILE, SLICE_PAIRS))
    _configure(_CONFIG)
    for e in range(first, last):
        begin, end = max(bounds[e], start) - start, min(bounds[e + 1], stop) - start
        if end > begin:
            _expert_product(a[begin:end], w, e, out[begin:end], bias[e - first if has_bias else 0], has_bias,
                            packed, sums, tail_config, act, inter, interleaved, values)
    _release()


def fits(depth: int, width: int) -> bool:
    """Whether expert_products takes weights [N=width, K=depth]."""
    return depth % 2 == 0 and width % TILE == 0 and depth > 0


def fits_quantized(depth: int, width: int, group: int) -> bool:
    """Whether expert_products takes a quantized weight [N=width, K=depth] in groups of group
    along K: its slices dequantize by whole chunks."""
    return fits(depth, width) and reads_chunks(depth, group)


_scratch = threading.local()


def scratch(depth: int, quantized: bool = False) -> np.ndarray:
    """This thread's buffer for expert_products' transposed activations, for depth K."""
    size = max((QUANTIZED_CHUNK_BYTES if quantized else CHUNK_BYTES) // 4, 2 * TILE * -(-depth // DEPTH) * TILE)
    buffer = getattr(_scratch, "buffer", None)
    if buffer is None or buffer.size < size:
        buffer = _scratch.buffer = _on_lines(np.empty(size + LINE // 4, dtype=np.uint32), size)
    return buffer
