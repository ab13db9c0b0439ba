"""Scalar helpers every Numba kernel inlines: 16-bit floats widened to float32, results
narrowed back, and the expert activations.

Numba has no float16 or bfloat16 type, so 16-bit tensors arrive as their bit patterns:
bfloat16 as uint16, float16 as int16 (see moe_dispatch/backends/numba_backend.py). The
element type of an array therefore says how to widen it. Each helper is a plain Python
function, which is what runs under NUMBA_DISABLE_JIT=1, with an overload that Numba
compiles in its place: bit casts in registers, so a 16-bit weight costs two bytes of
memory traffic and a shift.
"""

from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

# Activation codes, shared by every kernel (a runtime argument: the branch sits in the
# epilogue, outside the dot products).
SILU, GELU, RELU = 0, 1, 2
ACTIVATION_CODES = {"swiglu": SILU, "silu": SILU, "geglu": GELU, "gelu": GELU, "relu": RELU}
_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


# ---- bit casts (jit only) ----------------------------------------------------------------


@intrinsic
def _f32_from_bits(typingctx, bits):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.uint32), codegen


@intrinsic
def _bits_from_f32(typingctx, value):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(types.float32), codegen


@intrinsic
def _f32_from_half_bits(typingctx, bits):
    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(types.int16), codegen


@intrinsic
def _half_bits_from_f32(typingctx, value):
    # fptrunc rounds to nearest even, as torch's float -> half conversion does.
    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return types.int16(types.float32), codegen


# ---- widen: one stored element -> its float32 (float64 stays float64) --------------------


def widen(v):
    if isinstance(v, np.uint16):
        return np.array(np.uint32(v) << np.uint32(16), dtype=np.uint32).view(np.float32)[()]
    if isinstance(v, np.int16):
        return np.float32(np.array(v, dtype=np.int16).view(np.float16)[()])
    return v


@overload(widen)
def _widen(v):
    if v == types.uint16:
        return lambda v: _f32_from_bits(np.uint32(v) << np.uint32(16))
    if v == types.int16:
        return lambda v: _f32_from_half_bits(v)
    if v in (types.float32, types.float64):
        return lambda v: v
    return None


# ---- two bfloat16 packed in a uint32 -> their two float32 -------------------------------


def bf16_pair(u):
    """(the element at the lower address, the one at the higher) of two bfloat16 read as one
    little-endian uint32: a shift and a mask, no 16-bit loads, so the loop vectorizes."""
    bits = np.array([np.uint32(u) << np.uint32(16), np.uint32(u) & np.uint32(0xFFFF0000)], dtype=np.uint32)
    lo, hi = bits.view(np.float32)
    return lo, hi


@overload(bf16_pair, inline="always")
def _bf16_pair(u):
    if u == types.uint32:
        return lambda u: (_f32_from_bits(u << np.uint32(16)), _f32_from_bits(u & np.uint32(0xFFFF0000)))
    return None


# ---- narrow: a float32 (or float64) result -> an element of dtype -------------------------


def _kind(dtype):
    """The element type behind a dtype argument: numpy's dtype, or Numba's type of one."""
    return dtype.dtype if isinstance(dtype, types.DType) else getattr(dtype, "instance_type", dtype)


def narrow(v, dtype):
    if dtype == np.uint16:
        if v != v:
            return np.uint16(0x7FC0)
        bits = int(np.array(np.float32(v), dtype=np.float32).view(np.uint32)[()])
        return np.uint16((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16)
    if dtype == np.int16:
        with np.errstate(over="ignore"):  # beyond float16's range is inf, as in torch
            return np.array(np.float16(v), dtype=np.float16).view(np.int16)[()]
    return dtype.type(v)


@njit(cache=True, inline="always")
def _bf16_bits(v):
    # Round to nearest even, NaN to the canonical quiet NaN, as torch rounds to bfloat16.
    f = np.float32(v)
    if f != f:
        return np.uint16(0x7FC0)
    bits = _bits_from_f32(f)
    return np.uint16((bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))


@overload(narrow)
def _narrow(v, dtype):
    kind = _kind(dtype)
    if kind == types.uint16:
        return lambda v, dtype: _bf16_bits(v)
    if kind == types.int16:
        return lambda v, dtype: _half_bits_from_f32(np.float32(v))
    if kind == types.float32:
        return lambda v, dtype: np.float32(v)
    if kind == types.float64:
        return lambda v, dtype: np.float64(v)
    return None


# ---- accumulators: float32, or float64 for float64 inputs --------------------------------


def acc_zero(dtype):
    """A zero accumulator for elements of dtype."""
    return np.float64(0.0) if dtype == np.float64 else np.float32(0.0)


@overload(acc_zero)
def _acc_zero(dtype):
    if _kind(dtype) == types.float64:
        return lambda dtype: np.float64(0.0)
    return lambda dtype: np.float32(0.0)


def acc_zeros(shape, dtype):
    """A zeroed accumulator array for elements of dtype."""
    return np.zeros(shape, dtype=np.float64 if dtype == np.float64 else np.float32)


@overload(acc_zeros)
def _acc_zeros(shape, dtype):
    if _kind(dtype) == types.float64:
        return lambda shape, dtype: np.zeros(shape, dtype=np.float64)
    return lambda shape, dtype: np.zeros(shape, dtype=np.float32)


# ---- activations: float32 math for float32 sums, float64 for float64 -----------------------


def act_value(g, code):
    """act(g) for code SILU, GELU or RELU; exp overflowing to inf gives silu's -0.0 limit."""
    if code == SILU:
        return g / (1.0 + math.exp(-g))
    if code == GELU:
        return 0.5 * g * (1.0 + math.erf(g * _INV_SQRT2))
    return g if g > 0.0 else 0.0 * g


@overload(act_value)
def _act_value(g, code):
    # Constants of g's own type: a float64 literal would promote float32 math to float64.
    kind = np.float32 if g == types.float32 else np.float64
    one, half, inv_sqrt2 = kind(1.0), kind(0.5), kind(_INV_SQRT2)

    def impl(g, code):
        if code == SILU:
            return g / (one + math.exp(-g))
        if code == GELU:
            return half * g * (one + math.erf(g * inv_sqrt2))
        return g if g > 0 else g * 0

    return impl


def act_and_grad(g, code):
    """(act(g), d act(g) / dg) for code SILU, GELU or RELU, sharing one exp."""
    if code == SILU:
        s = 1.0 / (1.0 + math.exp(-g))
        return g * s, s * (1.0 + g * (1.0 - s))
    if code == GELU:
        cdf = 0.5 * (1.0 + math.erf(g * _INV_SQRT2))
        return g * cdf, cdf + g * math.exp(-0.5 * g * g) * _INV_SQRT_2PI
    return (g, 1.0) if g > 0.0 else (0.0 * g, 0.0)


@overload(act_and_grad)
def _act_and_grad(g, code):
    kind = np.float32 if g == types.float32 else np.float64
    zero, one, half = kind(0.0), kind(1.0), kind(0.5)
    inv_sqrt2, inv_sqrt_2pi = kind(_INV_SQRT2), kind(_INV_SQRT_2PI)

    def impl(g, code):
        if code == SILU:
            s = one / (one + math.exp(-g))
            return g * s, s * (one + g * (one - s))
        if code == GELU:
            cdf = half * (one + math.erf(g * inv_sqrt2))
            return g * cdf, cdf + g * math.exp(-half * g * g) * inv_sqrt_2pi
        return (g, one) if g > 0 else (g * 0, zero)

    return impl
