"""Dot products of bfloat16 weight rows with bfloat16 activation rows, by AVX512-BF16's
vdpbf16ps: the decode kernels' inner loop where the CPU has it.

Widening bfloat16 weights to float32 (a shift or a mask per element) and multiplying in
float32 kept one core at about 6 G weights/s in a decode step of a few rows per expert, so
that two cores, not the memory, set the pace. vdpbf16ps multiplies 32 pairs of bfloat16 and
adds them into 16 float32 sums in one instruction, reading the weights' and the activations'
own bits: each step of 64 bytes of two weight rows meets up to four activation rows, with no
conversion at all.

Like oneDNN's bfloat16 products on the same processors (which torch's CPU matmul and the
blocked path call), the instruction reads subnormal inputs as zero and flushes subnormal
products: a difference only for values below 1e-38.

bf16_dots is plain Python (numpy), which NUMBA_DISABLE_JIT=1 runs, with an overload that
compiles the vector code in its place: vdpbf16ps where the CPU has AVX512-BF16, else the same
sums widened to float32 in generic vector IR (correct everywhere; the decode kernels take
these dot products only where TAKES_BF16_DOTS).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from .packed_dots import F32, I16, I32, INTO_OUTER_CACHES, PREFETCH_BYTES, _load, _prefetch, _vec, \
    bf16_dot_instruction, emit_row_passes, horizontal_sum, pairs_multiply_add
from .vector_width import host_cpu_features

STEP = 32  # elements of each row per step: 64 bytes


# Whether the CPU Numba compiles for multiplies bfloat16 pairs in one instruction: where it
# does, the decode kernels take bf16_dots on the activations' own bits (kernels/numba/mlp.py).
TAKES_BF16_DOTS = bf16_dot_instruction(host_cpu_features())


def bf16_dots(src, index, gather, start, end, w_a, w_b, out):
    """out[0, i] = src[row] . w_a and out[1, i] = src[row] . w_b for i < end - start, where
    row = index[start + i] when gather, else start + i: src [rows, K] uint16 (bfloat16 bits),
    w_a and w_b [K/2] uint32 (two bfloat16 each, the lower address first), K a multiple of
    STEP; float32 sums in out [>= 2, >= end - start]."""
    def widened(bits):
        return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32).astype(np.float64)

    for i in range(end - start):
        row = index[start + i] if gather else start + i
        x = widened(src[row])
        for j, w in enumerate((w_a, w_b)):
            out[j, i] = np.float32(np.dot(widened(w.view(np.uint16)), x))


class _Operands:
    def __init__(self, context, builder, sig, args):
        rows = len(args) - 6  # weight rows, args 5 to 5 + rows - 1; out last
        arrays = {i: context.make_array(sig.args[i])(context, builder, args[i])
                  for i in (0, 1, *range(5, 5 + rows), 5 + rows)}
        index = types.intp
        self.gather = args[2]
        self.start, self.end = (context.cast(builder, args[i], sig.args[i], index) for i in (3, 4))
        self.src = builder.bitcast(arrays[0].data, I16.as_pointer())
        self.depth = cgutils.unpack_tuple(builder, arrays[0].shape, 2)[1]
        self.index = arrays[1].data
        self.weights = [builder.bitcast(arrays[i].data, I16.as_pointer()) for i in range(5, 5 + rows)]
        self.out = arrays[5 + rows].data
        self.out_width = cgutils.unpack_tuple(builder, arrays[5 + rows].shape, 2)[1]

    def row(self, builder, i):
        """Where activation row i of this call starts."""
        position = builder.add(self.start, i)
        gathered = builder.sext(builder.load(builder.gep(self.index, [position])), position.type)
        return builder.gep(self.src, [builder.mul(builder.select(self.gather, gathered, position), self.depth)])


def bf16_quad_dots(src, index, gather, start, end, w0, w1, w2, w3, out):
    """bf16_dots over four weight rows: out[j, i] = src[row] . w_j for j < 4. Each activation
    row's load meets four weight rows, 16 sums a pass, where two pairs load it twice for 8
    each: for steps whose many rows per expert make the multiply-adds, not the weights'
    stream, set the pace (on a Zen 5 against two pairs: olmoe-1b-7b x0.5 at 12 rows per
    expert 1.22x, mixtral-8x7b x0.5 at 16 rows 1.37x; docs/benchmarks.md)."""
    bf16_dots(src, index, gather, start, end, w0, w1, out[:2])
    bf16_dots(src, index, gather, start, end, w2, w3, out[2:])


def _emit_pass(builder, cpu, ops, first, count):
    """count activation rows from the first-th: every step of the weight rows, then the sums
    into ops.out."""
    acc_type, pairs = _vec(F32, STEP // 2), _vec(I32, STEP // 2)
    multiply_add = pairs_multiply_add(acc_type, bf16_dot_instruction(cpu))
    index = ops.depth.type
    rows = [ops.row(builder, builder.add(first, ir.Constant(index, j))) for j in range(count)]
    sums = {}
    for r in range(len(ops.weights)):
        for j in range(count):
            sums[r, j] = cgutils.alloca_once(builder, acc_type)
            builder.store(ir.Constant(acc_type, None), sums[r, j])
    with cgutils.for_range(builder, builder.udiv(ops.depth, ir.Constant(index, STEP))) as steps:
        offset = builder.mul(steps.index, ir.Constant(index, STEP))
        ws = []
        for weights in ops.weights:
            # not into L1, whose lines the activation rows need where a pass has several
            # (olmoe-1b-7b x0.5, 2 threads, each revision first in turn on a Zen 4: T=16 1.16x
            # and 1.35x faster than into L1)
            _prefetch(builder, weights, builder.add(offset, ir.Constant(index, PREFETCH_BYTES // 2)),
                      INTO_OUTER_CACHES)
            ws.append(_load(builder, weights, offset, _vec(I16, STEP)))
        for j, row in enumerate(rows):
            x = _load(builder, row, offset, _vec(I16, STEP))
            for r, w in enumerate(ws):
                builder.store(multiply_add(builder, builder.load(sums[r, j]), builder.bitcast(w, pairs),
                                           builder.bitcast(x, pairs)), sums[r, j])
    for (r, j), acc in sums.items():
        column = builder.add(first, ir.Constant(index, j))
        target = builder.gep(ops.out, [builder.add(builder.mul(ir.Constant(index, r), ops.out_width), column)])
        builder.store(horizontal_sum(builder, builder.load(acc)), target)


def _typed(src, index, start, end, weights, out):
    """Whether bf16_dots's (or bf16_quad_dots's) arguments are arrays and integers it reads."""
    arrays = ((src, 2, types.uint16), (index, 1, types.int32), *((w, 1, types.uint32) for w in weights),
              (out, 2, types.float32))
    return (all(isinstance(a, types.Array) and a.ndim == ndim and a.layout == "C" and a.dtype == dtype
                for a, ndim, dtype in arrays)
            and all(isinstance(i, types.Integer) for i in (start, end)))


def _codegen(cpu_features):
    def codegen(context, builder, sig, args):
        cpu = cpu_features if cpu_features is not None else host_cpu_features()
        ops = _Operands(context, builder, sig, args)
        emit_row_passes(builder, builder.sub(ops.end, ops.start),
                        lambda first, count: _emit_pass(builder, cpu, ops, first, count))
        return context.get_dummy_value()

    return codegen


def bf16_dots_intrinsic(cpu_features=None):
    """The vector code of bf16_dots, for the CPU features given (a "+avx512bf16,..." string),
    by default those Numba compiles for."""

    @intrinsic
    def dots(typingctx, src, index, gather, start, end, w_a, w_b, out):
        if not _typed(src, index, start, end, (w_a, w_b), out):
            return None
        return types.void(src, index, gather, start, end, w_a, w_b, out), _codegen(cpu_features)

    return dots


def bf16_quad_dots_intrinsic(cpu_features=None):
    """The vector code of bf16_quad_dots, as bf16_dots_intrinsic."""

    @intrinsic
    def dots(typingctx, src, index, gather, start, end, w0, w1, w2, w3, out):
        if not _typed(src, index, start, end, (w0, w1, w2, w3), out):
            return None
        return types.void(src, index, gather, start, end, w0, w1, w2, w3, out), _codegen(cpu_features)

    return dots


_kernel, _quad_kernel = bf16_dots_intrinsic(), bf16_quad_dots_intrinsic()


@overload(bf16_dots, inline="always")
def _bf16_dots(src, index, gather, start, end, w_a, w_b, out):
    return lambda src, index, gather, start, end, w_a, w_b, out: _kernel(src, index, gather, start, end, w_a, w_b,
                                                                          out)


@overload(bf16_quad_dots, inline="always")
def _bf16_quad_dots(src, index, gather, start, end, w0, w1, w2, w3, out):
    return lambda src, index, gather, start, end, w0, w1, w2, w3, out: _quad_kernel(
        src, index, gather, start, end, w0, w1, w2, w3, out)
