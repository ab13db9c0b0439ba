"""A block of up to 16 x 16 32-bit elements transposed in vector registers: the register tiles'
operands moved between rows and columns (expert_tiles.py).

Element by element, a transposition reads or writes one of its sides 64 bytes or more apart,
one element at a time: the bfloat16 expert MLP spent a quarter of its time gathering x^T and
writing o^T back as rows (64 rows per expert). Here 16 rows are loaded as 16 vectors (one
load each), swapped in four rounds of two-vector shuffles (64 shuffles), and stored as 16
vectors.

transpose_block is plain Python (numpy), which NUMBA_DISABLE_JIT=1 runs, with an overload
that compiles the vector code in its place.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

from .outer_products import _masked_load, _masked_store
from .packed_dots import I32, _broadcast, _const

BLOCK = 16  # rows and columns of a block


def transpose_block(src, offsets, count, width, dst, dst_start, dst_stride):
    """dst[dst_start + l * dst_stride + i] = src[offsets[i] + l] for i < count <= BLOCK and
    l < width <= BLOCK: src and dst flat arrays of one 32-bit type (or two that share their
    bits, uint32 and float32); offsets: at least count integers."""
    for i in range(count):
        for lane in range(width):
            dst[dst_start + lane * dst_stride + i] = src[offsets[i] + lane]


def _transposed(builder, rows):
    """The 16 vectors of the transpose of the 16 x 16 matrix whose rows are `rows`: at each
    round, the off-diagonal h x h blocks of every 2h x 2h block swap."""
    for h in (8, 4, 2, 1):
        swapped = list(rows)
        for i in range(BLOCK):
            if i & h:
                continue
            low = [lane if not lane & h else BLOCK + lane - h for lane in range(BLOCK)]
            high = [lane + h if not lane & h else BLOCK + lane for lane in range(BLOCK)]
            swapped[i] = builder.shuffle_vector(rows[i], rows[i + h], _const(I32, low, BLOCK))
            swapped[i + h] = builder.shuffle_vector(rows[i], rows[i + h], _const(I32, high, BLOCK))
        rows = swapped
    return rows


@intrinsic
def _transpose(typingctx, src, offsets, count, width, dst, dst_start, dst_stride):
    words = (types.uint32, types.int32, types.float32)
    if not (isinstance(src, types.Array) and isinstance(dst, types.Array) and src.ndim == dst.ndim == 1
            and src.dtype in words and dst.dtype in words):
        return None
    if not (isinstance(offsets, types.Array) and offsets.ndim == 1 and isinstance(offsets.dtype, types.Integer)):
        return None
    if not all(isinstance(s, types.Integer) for s in (count, width, dst_start, dst_stride)):
        return None

    def codegen(context, builder, sig, args):
        index = context.get_value_type(types.intp)
        vector = ir.VectorType(I32, BLOCK)
        src_ptr, offsets_ptr, dst_ptr = (
            builder.bitcast(context.make_array(sig.args[i])(context, builder, args[i]).data, ir.PointerType(
                context.get_value_type(sig.args[i].dtype) if i == 1 else I32)) for i in (0, 1, 4))
        count_, width_, start, stride = (context.cast(builder, args[i], sig.args[i], types.intp) for i in (2, 3, 5, 6))
        lane = ir.Constant(ir.VectorType(index, BLOCK), list(range(BLOCK)))
        in_width = builder.icmp_signed("<", lane, _broadcast(builder, width_, BLOCK))
        in_count = builder.icmp_signed("<", lane, _broadcast(builder, count_, BLOCK))
        zero, none = ir.Constant(vector, None), ir.Constant(ir.VectorType(ir.IntType(1), BLOCK), None)
        first = context.cast(builder, builder.load(offsets_ptr), sig.args[1].dtype, types.intp)
        rows = []
        for i in range(BLOCK):
            present = builder.icmp_signed("<", ir.Constant(index, i), count_)
            # a row past count reads nothing (an all-false mask) at a valid address
            offset = builder.select(present, context.cast(builder, builder.load(builder.gep(
                offsets_ptr, [ir.Constant(index, i)])), sig.args[1].dtype, types.intp), first)
            mask = builder.select(present, in_width, none)
            rows.append(_masked_load(builder, builder.gep(src_ptr, [offset]), mask, zero))
        for lane_index, column in enumerate(_transposed(builder, rows)):
            present = builder.icmp_signed("<", ir.Constant(index, lane_index), width_)
            target = builder.gep(dst_ptr, [builder.add(start, builder.mul(ir.Constant(index, lane_index), stride))])
            _masked_store(builder, column, target, builder.select(present, in_count, none))
        return context.get_dummy_value()

    return types.void(src, offsets, count, width, dst, dst_start, dst_stride), codegen


@overload(transpose_block, inline="always")
def _transpose_block(src, offsets, count, width, dst, dst_start, dst_stride):
    return lambda src, offsets, count, width, dst, dst_start, dst_stride: _transpose(
        src, offsets, count, width, dst, dst_start, dst_stride)
