"""Scalar helpers every Numba kernel inlines: 16-bit floats widened to float32, results
narrowed back, and constants of an accumulator's type.

Numba has no float16 or bfloat16 type, so 16-bit tensors arrive as their bit patterns:
bfloat16 as uint16, float16 as int16 (see moe_dispatch/backends/numba_backend.py). The
element type of an array therefore says how to widen it. Each helper is a plain Python
function, which is what runs under NUMBA_DISABLE_JIT=1, with an overload that Numba
compiles in its place: bit casts in registers, so a 16-bit weight costs two bytes of
memory traffic and a shift.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

from .caching import njit

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


def holds_bfloat16(a):
    """Whether array a holds bfloat16 bits (uint16), known when a compiles."""
    return a.dtype == np.uint16


@overload(holds_bfloat16, inline="always")
def _holds_bfloat16(a):
    answer = a.dtype == types.uint16
    return lambda a: answer


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


def like(v, value):
    """value as a float of v's type (float32 or float64): a float64 constant would turn
    float32 math into float64."""
    return type(v)(value)


@overload(like)
def _like(v, value):
    if v == types.float32:
        return lambda v, value: np.float32(value)
    return lambda v, value: np.float64(value)


# ---- quantized codes: a half's bits, and powers of two ------------------------------------


def half_value(bits):
    """The float32 value of the float16 whose bits are the low 16 of the int bits: the
    quantized kernels turn e4m3 and e2m1 codes into float16 bits with shifts and masks."""
    return np.float32(np.array(int(bits) & 0xFFFF, dtype=np.uint16).view(np.float16)[()])


@overload(half_value, inline="always")
def _half_value(bits):
    if isinstance(bits, types.Integer):
        return lambda bits: _f32_from_half_bits(np.int16(bits))  # truncates to the low 16 bits
    return None


def pow2(exponent):
    """2.0 ** exponent as a float32, exact for exponent in [-127, 127] (2^-127 a subnormal)."""
    return np.float32(np.ldexp(np.float32(1.0), int(exponent)))


@overload(pow2, inline="always")
def _pow2(exponent):
    if isinstance(exponent, types.Integer):
        def impl(exponent):
            if exponent > -127:
                return _f32_from_bits(np.uint32(exponent + 127) << np.uint32(23))
            return _f32_from_bits(np.uint32(0x400000))
        return impl
    return None
