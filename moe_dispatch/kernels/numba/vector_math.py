"""e^x for float32 as LLVM code that vectorizes: the kernels' activations call exp(x).

Numba lowers math.exp to a call of the C library's expf, which LLVM cannot vectorize (Numba
has no vector math library unless Intel's SVML is installed), so an activation loop computed
one element per call: 2.8 ns each on this Xeon, more than the register tiles' products of a
small expert. exp here is plain arithmetic, bit casts and selects (Cephes' expf), which a loop
vectorizes like any other; float64 keeps math.exp.
"""

from __future__ import annotations

import math

from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

_F32, _I32 = ir.FloatType(), ir.IntType(32)


def emit_exp(builder, x):
    """e^x of a float32 or a vector of them, within 2 ulp (Cephes' expf: x = n ln2 + r,
    |r| <= ln2 / 2, a degree-7 polynomial for e^r, 2^n applied as two halves so that results
    below 2^-126 come out subnormal and above 2^128 infinite, as expf's); a NaN passes."""
    count = x.type.count if isinstance(x.type, ir.VectorType) else None

    def lanes(value, element=_F32):
        return ir.Constant(element if count is None else ir.VectorType(element, count),
                           value if count is None else [value] * count)

    suffix = "f32" if count is None else f"v{count}f32"
    lo, hi = builder.fcmp_ordered("<", x, lanes(-104.0)), builder.fcmp_ordered(">", x, lanes(89.0))
    clamped = builder.select(hi, lanes(89.0), builder.select(lo, lanes(-104.0), x))
    scaled = builder.fmul(clamped, lanes(1.4426950408889634))
    rint = builder.module.declare_intrinsic(f"llvm.rint.{suffix}", fnty=ir.FunctionType(scaled.type, [scaled.type]))
    rounded = builder.call(rint, [scaled])
    r = builder.fsub(builder.fsub(clamped, builder.fmul(rounded, lanes(0.693359375))),
                     builder.fmul(rounded, lanes(-2.12194440e-4)))
    poly = lanes(1.9875691500e-4)
    for c in (1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1):
        poly = builder.fadd(builder.fmul(poly, r), lanes(c))
    e_r = builder.fadd(builder.fadd(builder.fmul(poly, builder.fmul(r, r)), r), lanes(1.0))
    is_nan = builder.fcmp_unordered("uno", x, x)
    n = builder.fptosi(builder.select(is_nan, lanes(0.0), rounded), lanes(0, _I32).type)
    half = builder.ashr(n, lanes(1, _I32))
    result = e_r
    for part in (half, builder.sub(n, half)):
        power = builder.shl(builder.add(part, lanes(127, _I32)), lanes(23, _I32))
        result = builder.fmul(result, builder.bitcast(power, x.type))
    return builder.select(is_nan, x, result)


def exp(x):
    """e^x (math.exp in plain Python; float32 by emit_exp when compiled)."""
    return math.exp(x)


@intrinsic
def _exp32(typingctx, x):
    def codegen(context, builder, signature, args):
        return emit_exp(builder, args[0])

    return types.float32(types.float32), codegen


@overload(exp, inline="always")
def _exp(x):
    if x == types.float32:
        return lambda x: _exp32(x)
    if isinstance(x, types.Float):
        return lambda x: math.exp(x)
    return None
