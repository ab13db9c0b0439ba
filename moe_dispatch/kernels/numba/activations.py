"""The expert activations as the Numba kernels fuse them: one branch per entry of the registry
(moe_dispatch/activations.py), chosen by its code at run time (the branch sits in an
epilogue, outside the dot products). Math in the argument's type: float32, float64 for
float64 inputs.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from ...activations import ACTIVATIONS, Activation
from .caching import njit
from .scalars import like

SILU, GELU, RELU, SWIGLU, GEGLU, CLAMPED_SWIGLU = (
    ACTIVATIONS[name].code for name in ("silu", "gelu", "relu", "swiglu", "geglu", "clamped_swiglu")
)
_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


class FusedActivation(NamedTuple):
    """What a kernel needs to activate GEMM1's output h: the entry's code and constants, and
    where a gated one's columns lie (gate column i at i * step, up column at i * step + shift)."""

    code: int
    p0: float
    p1: float
    gated: bool
    step: int
    shift: int


def fused(activation: Activation, columns: tuple[int, int]) -> FusedActivation:
    return FusedActivation(activation.code, *activation.params, activation.gated, *columns)


@njit(cache=True, inline="always")
def _sigmoid(v):
    return like(v, 1.0) / (like(v, 1.0) + math.exp(-v))


@njit(cache=True, inline="always")
def _clamped(g, u, limit):
    """The clamped SwiGLU's gate (at most limit) and up (within +-limit); NaN passes, as in torch."""
    return limit if g > limit else g, limit if u > limit else (-limit if u < -limit else u)


@njit(cache=True, inline="always")
def activate(g, u, act):
    """act(g) for a plain activation, act(g, u) for a gated one (u is ignored otherwise);
    an exp overflowing to inf gives silu's -0.0 limit."""
    code, one, half = act.code, like(g, 1.0), like(g, 0.5)
    if code == CLAMPED_SWIGLU:
        alpha, limit = like(g, act.p0), like(g, act.p1)
        gate, up = _clamped(g, u, limit)
        return (up + one) * gate * _sigmoid(alpha * gate)
    if code == SILU or code == SWIGLU:
        y = g / (one + math.exp(-g))
    elif code == GELU or code == GEGLU:
        y = half * g * (one + math.erf(g * like(g, _INV_SQRT2)))
    else:
        y = g if g > 0 else g * like(g, 0.0)
    return y * u if act.gated else y


@njit(cache=True, inline="always")
def activate_and_grad(g, u, act):
    """(act, d act / dg, d act / du) of activate(g, u, act), sharing one exp; d/du is 0 for a
    plain activation."""
    code, zero, one, half = act.code, like(g, 0.0), like(g, 1.0), like(g, 0.5)
    if code == CLAMPED_SWIGLU:
        alpha, limit = like(g, act.p0), like(g, act.p1)
        gate, up = _clamped(g, u, limit)
        up += one
        s = _sigmoid(alpha * gate)
        glu = gate * s
        # torch's clamp passes the gradient where the input lies within its bounds, bounds included
        d_gate = up * (s + alpha * gate * s * (one - s)) if g <= limit else zero
        return up * glu, d_gate, glu if -limit <= u <= limit else zero
    if code == SILU or code == SWIGLU:
        s = one / (one + math.exp(-g))
        y, d = g * s, s * (one + g * (one - s))
    elif code == GELU or code == GEGLU:
        cdf = half * (one + math.erf(g * like(g, _INV_SQRT2)))
        y, d = g * cdf, cdf + g * math.exp(-half * g * g) * like(g, _INV_SQRT_2PI)
    elif g > 0:
        y, d = g, one
    else:
        y, d = g * zero, zero
    if act.gated:
        return y * u, d * u, y
    return y, d, zero
