"""Expert activations and their derivatives, in float32: the definition kernels fuse.

float64 inputs stay float64, so the reference passes torch.autograd.gradcheck.

Gated activations read h = [gate | up] (gate columns first, as transformers 5 stores
gate_up_proj) and return act(gate) * up; the others return act(h).
"""

from __future__ import annotations

import math

import torch

GATED = ("swiglu", "geglu")
PLAIN = ("gelu", "relu", "silu")
ACTIVATIONS = GATED + PLAIN


def upcast(t: torch.Tensor) -> torch.Tensor:
    """t in the precision sums are kept in: float32, or float64 for float64 inputs."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def is_gated(activation: str) -> bool:
    return activation in GATED


def _base(activation: str) -> str:
    return {"swiglu": "silu", "geglu": "gelu"}.get(activation, activation)


def _act(name: str, g: torch.Tensor) -> torch.Tensor:
    if name == "silu":
        return torch.nn.functional.silu(g)
    if name == "gelu":
        return torch.nn.functional.gelu(g)
    return torch.relu(g)


def _act_grad(name: str, g: torch.Tensor) -> torch.Tensor:
    """d act(g) / dg."""
    if name == "silu":
        s = torch.sigmoid(g)
        return s * (1 + g * (1 - s))
    if name == "gelu":
        cdf = 0.5 * (1 + torch.erf(g / math.sqrt(2)))
        pdf = torch.exp(-0.5 * g * g) / math.sqrt(2 * math.pi)
        return cdf + g * pdf
    return (g > 0).to(g.dtype)


def activate(h: torch.Tensor, activation: str) -> torch.Tensor:
    """act(h) in float32 (see upcast); [R, 2I] -> [R, I] when gated, [R, I] -> [R, I] otherwise."""
    h = upcast(h)
    name = _base(activation)
    if is_gated(activation):
        gate, up = h.chunk(2, dim=-1)
        return _act(name, gate) * up
    return _act(name, h)


def activate_backward(h: torch.Tensor, grad: torch.Tensor, activation: str) -> torch.Tensor:
    """d loss / d h in float32, given grad = d loss / d activate(h)."""
    h, grad = upcast(h), upcast(grad)
    name = _base(activation)
    if is_gated(activation):
        gate, up = h.chunk(2, dim=-1)
        return torch.cat([grad * up * _act_grad(name, gate), grad * _act(name, gate)], dim=-1)
    return grad * _act_grad(name, h)
