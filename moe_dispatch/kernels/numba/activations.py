"""The expert activations as the Numba kernels fuse them: one branch per entry of the registry
(moe_dispatch/activations.py). The activation's class says which (class_constants.py), so a
kernel compiles the one branch it is called with, and the loops around it vectorize. Math in
the argument's type: float32, float64 for float64 inputs.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from ...activations import ACTIVATIONS, IDENTITY, Activation
from .caching import njit
from .class_constants import class_constants
from .scalars import like
from .vector_math import exp

SILU, GELU, RELU, SWIGLU, GEGLU, CLAMPED_SWIGLU = (
    ACTIVATIONS[name].code for name in ("silu", "gelu", "relu", "swiglu", "geglu", "clamped_swiglu")
)
_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


class FusedActivation(NamedTuple):
    """What a kernel needs to activate GEMM1's output h: the entry's constants, and where a
    gated one's columns lie (gate column i at i * step, up column at i * step + shift). Its
    class, one per code (FUSED_CLASSES), says which activation: code_of and is_gated."""

    p0: float
    p1: float
    step: int
    shift: int


def _fused_class(name: str) -> type:
    # a module attribute, which Numba's cache pickles by name
    cls = type(name, (FusedActivation,), {"__slots__": (), "__module__": __name__, "__qualname__": name})
    globals()[name] = cls
    return cls


# IDENTITY's class stands for no activation: the product itself (tile_products.PRODUCT).
FUSED_CLASSES = {IDENTITY: _fused_class("FusedProduct")} | {
    a.code: _fused_class("Fused" + a.name.title().replace("_", "")) for a in ACTIVATIONS.values()}
# code_of(act), is_gated(act): the activation's code and whether it is gated, constants in
# compiled code
code_of, code_of_type = class_constants({cls: code for code, cls in FUSED_CLASSES.items()})
is_gated, _ = class_constants({FUSED_CLASSES[a.code]: a.gated for a in ACTIVATIONS.values()}
                              | {FUSED_CLASSES[IDENTITY]: False})


def fused(activation: Activation, columns: tuple[int, int]) -> FusedActivation:
    if activation.code not in FUSED_CLASSES:
        raise ValueError(f"the numba kernels have no branch for {activation!r}, registered after they were imported")
    return FUSED_CLASSES[activation.code](*activation.params, *columns)


@njit(cache=True, inline="always")
def _exp(v, vectorized):
    """e^v: in a loop that vectorizes, the kernels' own (vector_math.py); one element at a time,
    the C library's, which is faster there (the fused float32 kernels at 32 rows per expert ran
    1.1x slower on the other)."""
    return exp(v) if vectorized else math.exp(v)


@njit(cache=True, inline="always")
def _sigmoid(v, vectorized):
    return like(v, 1.0) / (like(v, 1.0) + _exp(-v, vectorized))


@njit(cache=True, inline="always")
def _clamped(g, u, limit):
    """The clamped SwiGLU's gate (at most limit) and up (within +-limit); NaN passes, as in torch."""
    return limit if g > limit else g, limit if u > limit else (-limit if u < -limit else u)


@njit(cache=True, inline="always")
def activate(g, u, act, vectorized=False):
    """act(g) for a plain activation, act(g, u) for a gated one (u is ignored otherwise);
    an exp overflowing to inf gives silu's -0.0 limit. vectorized: called in a loop that
    vectorizes (a constant)."""
    code, one, half = code_of(act), like(g, 1.0), like(g, 0.5)
    if code == CLAMPED_SWIGLU:
        alpha, limit = like(g, act.p0), like(g, act.p1)
        gate, up = _clamped(g, u, limit)
        return (up + one) * gate * _sigmoid(alpha * gate, vectorized)
    if code == SILU or code == SWIGLU:
        y = g / (one + _exp(-g, vectorized))
    elif code == GELU or code == GEGLU:
        y = half * g * (one + math.erf(g * like(g, _INV_SQRT2)))
    else:
        y = g if g > 0 else g * like(g, 0.0)
    return y * u if is_gated(act) else y


@njit(cache=True, inline="always")
def activate_and_grad(g, u, act, vectorized=False):
    """(act, d act / dg, d act / du) of activate(g, u, act, vectorized), sharing one exp; d/du
    is 0 for a plain activation."""
    code, zero, one, half = code_of(act), like(g, 0.0), like(g, 1.0), like(g, 0.5)
    if code == CLAMPED_SWIGLU:
        alpha, limit = like(g, act.p0), like(g, act.p1)
        gate, up = _clamped(g, u, limit)
        up += one
        s = _sigmoid(alpha * gate, vectorized)
        glu = gate * s
        # torch's clamp passes the gradient where the input lies within its bounds, bounds included
        d_gate = up * (s + alpha * gate * s * (one - s)) if g <= limit else zero
        return up * glu, d_gate, glu if -limit <= u <= limit else zero
    if code == SILU or code == SWIGLU:
        s = one / (one + _exp(-g, vectorized))
        y, d = g * s, s * (one + g * (one - s))
    elif code == GELU or code == GEGLU:
        cdf = half * (one + math.erf(g * like(g, _INV_SQRT2)))
        y, d = g * cdf, cdf + g * _exp(-half * g * g, vectorized) * like(g, _INV_SQRT_2PI)
    elif g > 0:
        y, d = g, one
    else:
        y, d = g * zero, zero
    if is_gated(act):
        return y * u, d * u, y
    return y, d, zero


@njit(cache=True, inline="always")
def activate_strip(gate, up, out, count, act):
    """out[j] = activate(gate[j], up[j], act) for j < count (up ignored for a plain activation):
    a loop that vectorizes (exp does; GELU's erf does not)."""
    for j in range(count):
        out[j] = activate(gate[j], up[j], act, True)
