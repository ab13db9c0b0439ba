"""A register tile of a matrix product, c[i, j] (+)= sum_k a[i, k] * b[k, j], written as LLVM
vector code (a Numba intrinsic): the inner loop of the float kernels whose experts have
enough rows that multiply-adds, not reading the weights, set their pace.

Dot products over K (grouped_mm.py) end each output in a horizontal sum of a vector, and
loops written over j with the sums in memory load and store them at every k: at K=64 they
ran at 25-50 GFLOP/s a core where the CPU does over 200. Here up to ROWS rows of a meet a
strip of up to VECTORS vectors of b's columns (b's rows contiguous: w_down[e] in GEMM1's
gradient, a chunk of activations transposed, a block of rows in a weight gradient): each k
loads the strip's vectors once and broadcasts one element of each row of a, the ROWS x VECTORS
sums stay in registers for the whole depth, and they reach c once.

Where a row of a lies is given per row (a gathered row of x, a weight row, or a column of a
transposed operand): row i's element k is a[a_rows[i] + k * k_stride]. a, b and c are flat
(ravelled) arrays of one float dtype; columns past `width` are neither read nor written
(masked), and a strip narrower than VECTORS vectors runs as many as it needs, the last a half
vector where that holds the rest (HALF_VECTORS).

bfloat16 operands come in pairs along k: a and b uint32 words of two bfloat16 each (the lower
address first), c float32, and each k is a pair. A word of a is broadcast and meets a vector
of b's words in one vdpbf16ps where the CPU has AVX512-BF16 (32 multiply-adds into 16 float32
sums, twice float32's rate), else both halves widened to float32 (correct everywhere). Like
oneDNN's bfloat16 products, vdpbf16ps reads subnormal inputs as zero.

product_tile is plain Python (numpy), which NUMBA_DISABLE_JIT=1 runs, with an overload that
compiles the vector code in its place."""

from __future__ import annotations

import llvmlite.binding as llvm
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from .caching import njit
from .packed_dots import INTO_OUTER_CACHES, _broadcast, _fma, _intrinsic_call, _prefetch, _vector_name, \
    bf16_dot_instruction, pairs_multiply_add
from .vector_width import host_cpu_features, widest_vector_bytes

# A tile's sums stay in registers: ROWS x VECTORS of the CPU's widest vectors, 24 of AVX-512's
# 32 registers (4 x 4 ran 0.85x as fast at K=512), or 12 of AVX2's 16 (6 x 4 of them, twice
# the registers there are, ran at 30 GFLOP/s a core where the library's product ran at 90);
# VECTORS loads and ROWS broadcasts per ROWS x VECTORS multiply-adds.
ROWS = 6
VECTOR_BYTES = widest_vector_bytes()
VECTORS = 4 if VECTOR_BYTES == 64 else 2
STRIP_BYTES = VECTORS * VECTOR_BYTES  # the columns of a tile (AVX-512): 64 float32, 32 float64
# A strip whose last vector would be at most half full ends in a half vector (AVX-512): where
# the CPU runs 512-bit operations as two halves (Zen 4) it costs half, elsewhere as much.
HALF_VECTORS = VECTOR_BYTES == 64
LINE = 64  # bytes of a cache line
# Rows of b that meet every row of a before the next ones: a strip's 64 KB, in L2, and 1 KB of
# each row of a, which streams from memory when a is a weight (K=1024, N=512 at 64 rows: 202
# GFLOP/s on two cores, 116 with the whole depth at once; on a Zen 5 core, 64 experts of
# [1024, 1024] from memory at 64 rows: float32 250 GFLOP/s, 227 with 128 rows of b, 177 with
# 64; bfloat16 pairs 517, 466 with 128 pairs).
DEPTH_BLOCK = 256
# Rows of a whose sums stay in L2 while the depth goes by: 40 tiles, 240 x 256 float32 sums.
BLOCK_ROWS = 40 * ROWS


@njit(cache=True, inline="always")
def row_offsets(base, first, count, step):
    """The ROWS offsets base + i * step of rows i = first, first + 1, ... of an operand whose
    rows are step elements apart, the ones past count repeating the last (never read)."""
    last = count - 1
    return (base + first * step, base + (first + min(1, last)) * step, base + (first + min(2, last)) * step,
            base + (first + min(3, last)) * step, base + (first + min(4, last)) * step,
            base + (first + min(5, last)) * step)


@njit(cache=True, inline="always")
def vector_part(lanes):
    """The lanes of the least part of a vector of lanes that a strip takes: half of it where
    HALF_VECTORS, else all."""
    return lanes // 2 if HALF_VECTORS else lanes


@njit(cache=True, inline="always")
def strip_columns(width, lanes):
    """The columns of each strip of a product width columns wide, vectors of lanes (the last
    strip has the rest): the strips share the columns evenly, in whole vectors or halves of
    them (HALF_VECTORS), so 72 columns of float32 go as 40 and 32, not 64 and a strip of 8
    lanes, whose 6 sums are too few to keep the multiply-adds busy, nor 48 and 24 (a strip of
    1.5 vectors runs at 0.88x the rate of one of 2.5 on a Zen 4 core)."""
    part = vector_part(lanes)
    strips = (width + VECTORS * lanes - 1) // (VECTORS * lanes)
    return max(part, ((width + strips - 1) // max(strips, 1) + part - 1) // part * part)


@njit(cache=True, inline="always")
def strip_parts(width, lanes):
    """What a row of a costs against width columns: the parts of vectors its strips take (a
    strip's last vector a half one where HALF_VECTORS and it is at most half full), a strip of
    one vector counted as two (its sums are too few to keep the multiply-adds busy)."""
    part = vector_part(lanes)
    strip = strip_columns(width, lanes)
    parts = 0
    for j in range(0, width, strip):
        parts += max(2 * lanes // part, (min(strip, width - j) + part - 1) // part)
    return parts


@njit(cache=True, inline="always")
def strip_product(a, a_start, a_stride, num_rows, depth, b, b_start, b_stride, c, c_start, c_stride, width):
    """c[c_start + i * c_stride + j] = sum over k < depth of a[a_start + i * a_stride + k] *
    b[b_start + k * b_stride + j] for i < num_rows, j < width: each row of a contiguous.

    BLOCK_ROWS rows of a at a time, whose sums stay in L2 while DEPTH_BLOCK rows of b at a
    time meet them, a strip of b's columns at a time (strip_columns; in L1) against every row
    of the block (whose DEPTH_BLOCK elements stay in L2 from strip to strip)."""
    strip = strip_columns(width, VECTOR_BYTES // c.itemsize)
    for i0 in range(0, num_rows, BLOCK_ROWS):
        i1 = min(num_rows, i0 + BLOCK_ROWS)
        for k0 in range(0, max(depth, 1), DEPTH_BLOCK):  # a depth of 0 writes zeros
            for j in range(0, width, strip):
                for i in range(i0, i1, ROWS):
                    count = min(ROWS, i1 - i)
                    ahead, ahead_k, after = next_tile(i, i0, i1, k0, j + strip >= width, depth, num_rows)
                    product_tile(a, row_offsets(a_start + k0, i, count, a_stride), count, 1, b,
                                 b_start + k0 * b_stride + j, b_stride, min(depth - k0, DEPTH_BLOCK), c,
                                 c_start + i * c_stride + j, c_stride, min(strip, width - j), k0 > 0,
                                 row_offsets(a_start + ahead_k, ahead, after, a_stride), after)


@njit(cache=True, inline="always")
def next_tile(i, i0, i1, k0, last_strip, depth, num_rows):
    """(first row, depth offset, rows) of a's part that strip_product's next tile reads, after
    the tile of rows i in the block [i0, i1) at depth k0: the block's next rows; after its last
    tile, on the last strip, the block's first rows at the next depth, or the next block's at
    depth 0. No rows (0) before another strip, which reads the block's rows again from L2."""
    if i + ROWS < i1:
        return i + ROWS, k0, min(ROWS, i1 - i - ROWS)
    if not last_strip:
        return i0, k0, 0
    if k0 + DEPTH_BLOCK < depth:
        return i0, k0 + DEPTH_BLOCK, min(ROWS, i1 - i0)
    return i1, 0, min(ROWS, num_rows - i1)


def product_tile(a, a_rows, count, k_stride, b, b_start, b_stride, depth, c, c_start, c_stride, width, accumulate,
                 ahead, ahead_count):
    """c[c_start + i * c_stride + j] = (c's value there when accumulate) + sum over k < depth of
    a[a_rows[i] + k * k_stride] * b[b_start + k * b_stride + j], for i < count <= ROWS and
    j < width <= STRIP_BYTES / itemsize; a_rows: a tuple of ROWS offsets (the first count
    read). bfloat16 pairs (a and b uint32): each product is the sum of the two halves'.

    ahead: ROWS offsets of the rows of a that the next tile reads (those past its ahead_count
    rows repeating its last, as row_offsets gives them), asked of the caches along the depth as
    this tile's rows go by where k_stride is a literal 1; ahead_count 0: no next tile. A hint,
    never read."""
    for i in range(count):
        values = _wide(a[a_rows[i] + np.arange(depth) * k_stride])
        block = _wide(b[b_start + np.arange(depth)[:, None] * b_stride + np.arange(width)])
        target = c_start + i * c_stride + np.arange(width)
        total = np.einsum("kp,kjp->j", values, block) if a.dtype == np.uint32 else values @ block
        c[target] = (c[target] + total) if accumulate else total


def _wide(x):
    """x as float64; uint32 bfloat16 pairs as a new last axis of two (the lower half first)."""
    if x.dtype != np.uint32:
        return x.astype(np.float64)
    halves = np.stack((x << np.uint32(16), x & np.uint32(0xFFFF0000)), axis=-1)
    return halves.view(np.float32).astype(np.float64)


def _operand_types(a, b, c):
    """Whether a, b and c are flat arrays the tile multiplies: all of one float dtype, or
    bfloat16 pairs (a and b uint32, c float32)."""
    if not all(isinstance(x, types.Array) and x.ndim == 1 for x in (a, b, c)):
        return False
    if (a.dtype, b.dtype, c.dtype) == (types.uint32, types.uint32, types.float32):
        return True
    return c.dtype in (types.float32, types.float64) and a.dtype == b.dtype == c.dtype


def _tile_intrinsic(cpu_features=None):
    """The vector code of product_tile, for the CPU features given (a "+avx512bf16,..." string),
    by default those Numba compiles for."""

    @intrinsic(prefer_literal=True)
    def tile(typingctx, a, a_rows, count, k_stride, b, b_start, b_stride, depth, c, c_start, c_stride, width,
             accumulate, ahead, ahead_count):
        if not _operand_types(a, b, c):
            return None
        if not all(isinstance(r, types.UniTuple) and r.count == ROWS and isinstance(r.dtype, types.Integer)
                   for r in (a_rows, ahead)):
            return None
        scalars = (count, k_stride, b_start, b_stride, depth, c_start, c_stride, width, ahead_count)
        if not all(isinstance(s, types.Integer) for s in scalars):
            return None

        def codegen(context, builder, sig, args):
            index = types.intp
            data = [context.make_array(sig.args[i])(context, builder, args[i]).data for i in (0, 4, 8)]
            a_ptr, b_ptr, c_ptr = data
            dtype = sig.args[8].dtype
            lanes = VECTOR_BYTES * 8 // dtype.bitwidth
            part = vector_part(lanes)
            cpu = cpu_features if cpu_features is not None else host_cpu_features()

            def piece_kind(n):  # (sums, b's elements, multiply-add) of a vector of n lanes
                vector = ir.VectorType(context.get_data_type(dtype), n)
                operand = ir.VectorType(context.get_data_type(sig.args[4].dtype), n)
                if sig.args[0].dtype != types.uint32:
                    return vector, operand, _fma(vector)
                fast = bf16_dot_instruction(cpu) and (n == 16 or "+avx512vl" in cpu)
                return vector, operand, pairs_multiply_add(vector, fast)

            kinds = {n: piece_kind(n) for n in {lanes, part}}
            rows = [context.cast(builder, r, sig.args[1].dtype, index)
                    for r in cgutils.unpack_tuple(builder, args[1], ROWS)]
            (count_, k_stride_, b_start_, b_stride_, depth_, c_start_, c_stride_, width_) = (
                context.cast(builder, args[i], sig.args[i], index) for i in (2, 3, 5, 6, 7, 9, 10, 11))
            accumulate_ = context.cast(builder, args[12], sig.args[12], types.boolean)
            index_type = rows[0].type
            ahead_ = None
            if isinstance(sig.args[3], types.IntegerLiteral):
                # rows of a contiguous (the strips' products): a pointer a row, where a stride
                # known only at run time took one per row and k, spilled (one vector: 0.7x)
                k_stride_ = ir.Constant(index_type, sig.args[3].literal_value)
                if sig.args[3].literal_value == 1:
                    ahead_ = ([context.cast(builder, r, sig.args[13].dtype, index)
                               for r in cgutils.unpack_tuple(builder, args[13], ROWS)],
                              builder.icmp_signed(">", context.cast(builder, args[14], sig.args[14], index),
                                                  ir.Constant(index_type, 0)),
                              LINE * 8 // sig.args[0].dtype.bitwidth)

            def piece(start, n):  # a vector of n lanes from column start on, masked to the width
                lane = ir.Constant(ir.VectorType(index_type, n), list(range(start, start + n)))
                mask = builder.icmp_signed("<", lane, _broadcast(builder, width_, n))
                return (start, mask) + kinds[n]

            # one loop per (rows, parts): the parts of a vector a strip of width columns needs,
            # whole vectors and, where the last one would be half empty, a half one
            parts = builder.udiv(builder.add(width_, ir.Constant(index_type, part - 1)),
                                 ir.Constant(index_type, part))
            switch_end = builder.append_basic_block("tile.end")
            switch = builder.switch(count_, switch_end)
            for n in range(1, ROWS + 1):
                block = builder.append_basic_block(f"tile.rows{n}")
                switch.add_case(ir.Constant(index_type, n), block)
                builder.position_at_end(block)
                inner = builder.switch(parts, switch_end)
                for p in range(1, VECTORS * lanes // part + 1):
                    case = builder.append_basic_block(f"tile.rows{n}.parts{p}")
                    inner.add_case(ir.Constant(index_type, p), case)
                    builder.position_at_end(case)
                    whole, rest = divmod(p * part, lanes)
                    pieces = [piece(v * lanes, lanes) for v in range(whole)] + ([piece(whole * lanes, rest)]
                                                                                   if rest else [])
                    _emit_rows(builder, n, pieces, a_ptr, rows, k_stride_, b_ptr, b_start_, b_stride_, depth_,
                               c_ptr, c_start_, c_stride_, accumulate_, ahead_)
                    builder.branch(switch_end)
            builder.position_at_end(switch_end)
            return context.get_dummy_value()

        return types.void(a, a_rows, count, k_stride, b, b_start, b_stride, depth, c, c_start, c_stride, width,
                          accumulate, ahead, ahead_count), codegen

    return tile


def _pointer_name(vector) -> str:
    """The name suffix of a pointer to vector: LLVM 15 made pointers opaque."""
    return "p0" if llvm.llvm_version_info[0] >= 15 else f"p0{_vector_name(vector)}"


def _masked_load(builder, ptr, mask, passthru):
    vector = passthru.type
    name = f"llvm.masked.load.{_vector_name(vector)}.{_pointer_name(vector)}"
    return _intrinsic_call(builder, name, vector, [builder.bitcast(ptr, vector.as_pointer()),
                                                   ir.Constant(ir.IntType(32), 4), mask, passthru])


def _masked_store(builder, value, ptr, mask):
    vector = value.type
    name = f"llvm.masked.store.{_vector_name(vector)}.{_pointer_name(vector)}"
    _intrinsic_call(builder, name, ir.VoidType(), [value, builder.bitcast(ptr, vector.as_pointer()),
                                                   ir.Constant(ir.IntType(32), 4), mask])


def _emit_rows(builder, n, pieces, a_ptr, rows, k_stride, b_ptr, b_start, b_stride, depth, c_ptr, c_start,
               c_stride, accumulate, ahead):
    """n rows of sums over the depth against the pieces of a strip of b: (first column, mask,
    sums' vector type, b's vector type, multiply-add) of each vector, whole or half. ahead:
    None, or (the next tile's rows, whether to ask for them, a's elements a cache line)."""
    index_type = rows[0].type
    # A strip of one vector keeps two sets of sums, one for even k and one for odd: its n sums
    # alone are too few for the multiply-adds' latency (one Zen 5 core, bfloat16 [1024, 2048]
    # against 16 columns: 240 -> 350 GFLOP/s in cache, 175 -> 210 from memory). Strips of two
    # vectors gained as much alone but cost wider ones 2-4% inside the expert MLP.
    sets = 2 if len(pieces) == 1 else 1
    sums = [[[cgutils.alloca_once_value(builder, ir.Constant(vector, None)) for _, _, vector, _, _ in pieces]
             for _ in range(n)] for _ in range(sets)]

    def step(k, target):
        b_row = builder.gep(b_ptr, [builder.add(b_start, builder.mul(k, b_stride))])
        strip = [_masked_load(builder, builder.gep(b_row, [ir.Constant(index_type, start)]), mask,
                              ir.Constant(operand, None))
                 for start, mask, _, operand, _ in pieces]
        at = builder.mul(k, k_stride)
        for i in range(n):
            value = builder.load(builder.gep(a_ptr, [builder.add(rows[i], at)]))
            for v, (b_vector, (_, _, vector, _, multiply_add)) in enumerate(zip(strip, pieces)):
                total = multiply_add(builder, builder.load(target[i][v]), _broadcast(builder, value, vector.count),
                                     b_vector)
                builder.store(total, target[i][v])

    set_count = ir.Constant(index_type, sets)
    with cgutils.for_range(builder, builder.udiv(depth, set_count)) as loop:
        k = builder.mul(loop.index, set_count)
        if ahead is not None:
            # a line of each of the next tile's rows as a line of this tile's goes by, into
            # L2: left to the hardware's prefetchers, a tile's six short streams (a K block of
            # weight rows) came from memory at ~7 GB/s a core. One Zen 4 core, the experts'
            # weights from memory, GFLOP/s (register_tiles_speed.py): [1440, 720] against 8
            # columns bfloat16 43 -> 95, float32 29 -> 53; [1024, 1024] against 16 columns
            # bfloat16 81 -> 125, float32 54 -> 60-77, against 64 183 -> 211 and 98 -> 103.
            # Into L1 0.7-0.8x of that; two tiles ahead no faster.
            next_rows, wanted, line = ahead
            new_line = builder.icmp_unsigned("==", builder.and_(k, ir.Constant(index_type, line - 1)),
                                             ir.Constant(index_type, 0))
            with builder.if_then(builder.and_(wanted, new_line)):
                for row in next_rows:
                    _prefetch(builder, a_ptr, builder.add(row, k), INTO_OUTER_CACHES)
        for s in range(sets):
            step(builder.add(k, ir.Constant(index_type, s)), sums[s])
    if sets == 2:
        with builder.if_then(builder.trunc(depth, ir.IntType(1))):  # an odd depth's last k
            step(builder.sub(depth, ir.Constant(index_type, 1)), sums[0])
        for i in range(n):
            for v in range(len(pieces)):
                builder.store(builder.fadd(builder.load(sums[0][i][v]), builder.load(sums[1][i][v])), sums[0][i][v])
    for i in range(n):
        c_row = builder.gep(c_ptr, [builder.add(c_start, builder.mul(ir.Constant(index_type, i), c_stride))])
        for v, (start, mask, vector, _, _) in enumerate(pieces):
            target = builder.gep(c_row, [ir.Constant(index_type, start)])
            total = builder.load(sums[0][i][v])
            with builder.if_then(accumulate):
                builder.store(builder.fadd(total, _masked_load(builder, target, mask, ir.Constant(vector, None))),
                              sums[0][i][v])
            _masked_store(builder, builder.load(sums[0][i][v]), target, mask)


_tile = _tile_intrinsic()


# Compiled once per signature and called, not inlined into each kernel: its 48 loops inlined
# at every call made a first bfloat16 prefill compile for 56 s, called 32 (a call costs
# nothing against a tile's depth block). prefer_literal, here and on _tile: a stride of 1 stays a
# constant.
@overload(product_tile, prefer_literal=True)
def _product_tile(a, a_rows, count, k_stride, b, b_start, b_stride, depth, c, c_start, c_stride, width,
                  accumulate, ahead, ahead_count):
    def impl(a, a_rows, count, k_stride, b, b_start, b_stride, depth, c, c_start, c_stride, width, accumulate,
             ahead, ahead_count):
        _tile(a, a_rows, count, k_stride, b, b_start, b_stride, depth, c, c_start, c_stride, width, accumulate,
              ahead, ahead_count)
    return impl
