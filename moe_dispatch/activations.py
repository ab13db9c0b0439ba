"""The expert activations: one registry entry each, read by every backend.

An entry names the activation, says whether it is gated, gives its float32 definition and
derivative in PyTorch (what the reference computes and the fused kernels must match), and
the code and constants the jit functions take (kernels/numba/activations.py and
kernels/triton/activations.py each branch on the code). Adding an activation means adding an
entry here and a branch to each of those two jit functions; nothing else names activations.

Gated activations read h = [gate | up] (gate columns first, as transformers 5 stores
gate_up_proj), or gate and up columns alternating when the weights say so (gpt-oss), and
return act(gate, up) of width I; the others return act(h).

float64 inputs stay float64, so the reference passes torch.autograd.gradcheck.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
from torch.nn import functional as F

Tensor = torch.Tensor
# The code of no activation at all: the plain grouped GEMM's epilogue.
IDENTITY = 0


@dataclass(frozen=True)
class Activation:
    """One expert activation.

    forward(gate, up) -> y and derivative(gate, up) -> (dy/dgate, dy/dup) compute in the
    dtype they are given (float32, or float64); `up` is None for a plain activation, whose
    dy/dup is None too. params are constants of the definition that the jit functions take
    as P0 and P1 (the clamped SwiGLU's alpha and limit). glu_of: for act(gate) * up, the name of
    the plain activation act.
    """

    name: str
    code: int
    gated: bool
    forward: Callable[[Tensor, Optional[Tensor]], Tensor]
    derivative: Callable[[Tensor, Optional[Tensor]], tuple[Tensor, Optional[Tensor]]]
    params: tuple[float, float] = (0.0, 0.0)
    glu_of: Optional[str] = None

    def width(self, intermediate_size: int) -> int:
        """The columns of GEMM1's output: 2I gated (gate and up), I otherwise."""
        return 2 * intermediate_size if self.gated else intermediate_size

    def __repr__(self) -> str:
        return f"Activation({self.name!r})"


ACTIVATIONS: dict[str, Activation] = {}


def register(activation: Activation) -> Activation:
    if activation.name in ACTIVATIONS or activation.code in {a.code for a in ACTIVATIONS.values()} | {IDENTITY}:
        raise ValueError(f"an activation named {activation.name!r} or coded {activation.code} exists already")
    ACTIVATIONS[activation.name] = activation
    return activation


def get(activation: Union[str, Activation], name: str = "activation") -> Activation:
    """The registry entry of `activation` (a name or an entry); ValueError naming the argument
    otherwise. An Activation that is not the registered entry of its name is refused: the
    kernels know the registered codes only."""
    key = activation.name if isinstance(activation, Activation) else activation
    found = ACTIVATIONS.get(key) if isinstance(key, str) else None
    if found is None or isinstance(activation, Activation) and activation is not found:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, ACTIVATIONS))}; got {activation!r}")
    return found


# ---- the definitions ---------------------------------------------------------------------------


def _silu_grad(g: Tensor) -> Tensor:
    s = torch.sigmoid(g)
    return s * (1 + g * (1 - s))


def _gelu_grad(g: Tensor) -> Tensor:
    cdf = 0.5 * (1 + torch.erf(g / math.sqrt(2)))
    return cdf + g * torch.exp(-0.5 * g * g) / math.sqrt(2 * math.pi)


def _relu_grad(g: Tensor) -> Tensor:
    return (g > 0).to(g.dtype)  # torch's relu'(0) is 0


def _plain(name: str, code: int, act: Callable, grad: Callable) -> Activation:
    return register(Activation(name, code, False, lambda g, u: act(g), lambda g, u: (grad(g), None)))


def _glu(name: str, code: int, plain: Activation) -> Activation:
    act, grad = plain.forward, plain.derivative
    return register(Activation(name, code, True, lambda g, u: act(g, None) * u,
                               lambda g, u: (grad(g, None)[0] * u, act(g, None)), glu_of=plain.name))


def glu(plain: str) -> Optional[Activation]:
    """The gated entry that computes act(gate) * up for the plain activation named `plain`, if any."""
    return next((a for a in ACTIVATIONS.values() if a.glu_of is not None and a.glu_of == plain), None)


SILU = _plain("silu", 1, F.silu, _silu_grad)
GELU = _plain("gelu", 2, F.gelu, _gelu_grad)
RELU = _plain("relu", 3, torch.relu, _relu_grad)
SWIGLU = _glu("swiglu", 4, SILU)
GEGLU = _glu("geglu", 5, GELU)


def _clamped_glu(g: Tensor, u: Tensor, alpha: float, limit: float) -> tuple[Tensor, Tensor]:
    gate = g.clamp(max=limit)
    return gate * torch.sigmoid(alpha * gate), u.clamp(-limit, limit)


def _clamped_swiglu(g: Tensor, u: Tensor) -> Tensor:
    glu, up = _clamped_glu(g, u, *CLAMPED_SWIGLU_PARAMS)
    return (up + 1) * glu


def _clamped_swiglu_derivative(g: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
    alpha, limit = CLAMPED_SWIGLU_PARAMS
    glu, up = _clamped_glu(g, u, alpha, limit)
    gate = g.clamp(max=limit)
    s = torch.sigmoid(alpha * gate)
    # torch's clamp passes the gradient where the input lies within its bounds, bounds included
    d_gate = (up + 1) * (s + alpha * gate * s * (1 - s)) * (g <= limit)
    return d_gate, glu * ((u >= -limit) & (u <= limit))


# gpt-oss's SwiGLU: the gate clamped from above, the up projection from both sides, and up + 1.
CLAMPED_SWIGLU_PARAMS = (1.702, 7.0)  # (alpha, limit), as gpt-oss's config sets them
CLAMPED_SWIGLU = register(Activation("clamped_swiglu", 6, True, _clamped_swiglu, _clamped_swiglu_derivative,
                                     CLAMPED_SWIGLU_PARAMS))


# ---- the activation of GEMM1's output ----------------------------------------------------------


def upcast(t: Tensor) -> Tensor:
    """t in the precision sums are kept in: float32, or float64 for float64 inputs."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def gate_up_columns(activation: Union[str, Activation], interleaved: bool, intermediate_size: int) -> tuple[int, int]:
    """(step, shift): gate column i of GEMM1's output lies at i * step, its up column at
    i * step + shift ((1, I) gate columns first, (2, 1) interleaved; (1, 0) without a gate)."""
    if not get(activation).gated:
        return 1, 0
    return (2, 1) if interleaved else (1, intermediate_size)


def gate_and_up(h: Tensor, activation: Union[str, Activation],
                interleaved: bool = False) -> tuple[Tensor, Optional[Tensor]]:
    """(gate, up) views of h [R, 2I] for a gated activation ((h, None) for a plain one):
    gate columns first then up columns, or alternating when interleaved."""
    if not get(activation).gated:
        return h, None
    if interleaved:
        return h[:, 0::2], h[:, 1::2]
    return h.chunk(2, dim=-1)


def activate(h: Tensor, activation: Union[str, Activation], interleaved: bool = False) -> Tensor:
    """act(h) in float32 (see upcast); [R, 2I] -> [R, I] when gated, [R, I] -> [R, I] otherwise."""
    activation = get(activation)
    gate, up = gate_and_up(upcast(h), activation, interleaved)
    return activation.forward(gate, up)


def activate_backward(h: Tensor, grad: Tensor, activation: Union[str, Activation],
                      interleaved: bool = False) -> Tensor:
    """d loss / d h in float32, laid out as h, given grad = d loss / d activate(h)."""
    activation = get(activation)
    gate, up = gate_and_up(upcast(h), activation, interleaved)
    grad = upcast(grad)
    d_gate, d_up = activation.derivative(gate, up)
    if not activation.gated:
        return grad * d_gate
    dh = torch.empty_like(upcast(h))
    dh_gate, dh_up = gate_and_up(dh, activation, interleaved)
    torch.mul(grad, d_gate, out=dh_gate)
    torch.mul(grad, d_up, out=dh_up)
    return dh
