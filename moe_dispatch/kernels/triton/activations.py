"""The expert activations as the Triton kernels fuse them: one branch per entry of the registry
(moe_dispatch/activations.py), chosen by its code, a constexpr; P0 and P1 are the entry's
constants. Math in float32.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ...activations import ACTIVATIONS, IDENTITY as _IDENTITY

IDENTITY = tl.constexpr(_IDENTITY)
SILU = tl.constexpr(ACTIVATIONS["silu"].code)
GELU = tl.constexpr(ACTIVATIONS["gelu"].code)
RELU = tl.constexpr(ACTIVATIONS["relu"].code)
SWIGLU = tl.constexpr(ACTIVATIONS["swiglu"].code)
GEGLU = tl.constexpr(ACTIVATIONS["geglu"].code)
CLAMPED_SWIGLU = tl.constexpr(ACTIVATIONS["clamped_swiglu"].code)


@triton.jit
def _gelu_cdf(x):
    return 0.5 * (1.0 + tl.erf(x * 0.7071067811865476))


@triton.jit
def activate(gate, up, ACT: tl.constexpr, P0: tl.constexpr, P1: tl.constexpr):
    """act(gate) for a plain activation (up is ignored), act(gate, up) for a gated one;
    gelu is the exact (erf) one, as torch's default."""
    if ACT == CLAMPED_SWIGLU:
        g = tl.minimum(gate, P1)
        u = tl.minimum(tl.maximum(up, -P1), P1)
        y = (u + 1.0) * g * tl.sigmoid(P0 * g)
    elif (ACT == SILU) or (ACT == SWIGLU):
        y = gate * tl.sigmoid(gate)
    elif (ACT == GELU) or (ACT == GEGLU):
        y = gate * _gelu_cdf(gate)
    elif ACT == RELU:
        y = tl.maximum(gate, 0.0)
    else:
        y = gate
    if (ACT == SWIGLU) or (ACT == GEGLU):
        y = y * up
    return y


@triton.jit
def activate_grad(gate, up, ACT: tl.constexpr, P0: tl.constexpr, P1: tl.constexpr):
    """(act, d act / d gate, d act / d up) of activate(gate, up, ...); d/d up is 0 for a plain one."""
    zero = tl.zeros(gate.shape, tl.float32)
    if ACT == CLAMPED_SWIGLU:
        g = tl.minimum(gate, P1)
        u = tl.minimum(tl.maximum(up, -P1), P1) + 1.0
        s = tl.sigmoid(P0 * g)
        glu = g * s
        # torch's clamp passes the gradient where the input lies within its bounds, bounds included
        d_gate = tl.where(gate <= P1, u * (s + P0 * g * s * (1.0 - s)), 0.0)
        d_up = tl.where((up >= -P1) & (up <= P1), glu, 0.0)
        y = u * glu
    else:
        if (ACT == SILU) or (ACT == SWIGLU):
            s = tl.sigmoid(gate)
            y = gate * s
            d = s * (1.0 + gate * (1.0 - s))
        elif (ACT == GELU) or (ACT == GEGLU):
            cdf = _gelu_cdf(gate)
            y = gate * cdf
            d = cdf + gate * tl.exp(-0.5 * gate * gate) * 0.3989422804014327
        elif ACT == RELU:
            y = tl.maximum(gate, 0.0)
            d = tl.where(gate > 0, 1.0, 0.0)
        else:
            y = gate
            d = zero + 1.0
        if (ACT == SWIGLU) or (ACT == GEGLU):
            d_gate = d * up
            d_up = y
            y = y * up
        else:
            d_gate = d
            d_up = zero
    return y, d_gate, d_up
