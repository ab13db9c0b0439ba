"""Setup factories shared by the `moe-dispatch` command and benchmarks/: expert weights and
routed inputs for a preset, built the same way wherever they are timed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional

import torch

from .. import activations
from ..experts import ExpertWeights
from ..formats.quantized import quantize
from .presets import Preset

Tensor = torch.Tensor
ROUTINGS = ("uniform", "skewed", "zipf")
ZIPF_EXPONENT = 1.2


@dataclass
class Experts:
    """The routed experts of one layer of a preset."""

    preset: Preset
    weights: ExpertWeights

    @property
    def dtype(self) -> torch.dtype:
        return self.weights.w_gate_up.dtype

    @property
    def device(self) -> torch.device:
        return self.weights.w_gate_up.device

    @property
    def weights_format(self) -> Optional[str]:
        """The quantized format of the weights, None for float weights."""
        return getattr(self.weights.w_gate_up, "format", None)

    def expert_bytes(self) -> float:
        """The bytes of one expert's weights and biases, as stored."""
        held = (t for t in (self.weights.w_gate_up, self.weights.w_down, self.weights.b_gate_up, self.weights.b_down)
                if t is not None)
        return sum(t.nbytes for t in held) / self.weights.num_experts

    def trained(self) -> tuple[Tensor, ...]:
        """The tensors a training step differentiates (the biases when there are some; no
        quantized weight)."""
        return tuple(t for t in self.weights.grad_targets() if t is not None)


@dataclass
class Inputs:
    """One batch routed to the experts: what moe_mlp takes besides the weights."""

    x: Tensor  # [T, H]
    weights: Tensor  # [T, k] float32
    ids: Tensor  # [T, k] int64
    routing: str

    @property
    def num_tokens(self) -> int:
        return self.x.shape[0]


def _generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def make_experts(preset: Preset, dtype: torch.dtype, device, seed: int = 0, requires_grad: bool = False) -> Experts:
    """Weights drawn like nn.Linear's init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), on the device;
    requires_grad for timing backward passes."""
    device = torch.device(device)
    gen = _generator(device, seed)
    e, h, i = preset.num_experts, preset.hidden_size, preset.intermediate_size
    width = activations.get(preset.activation).width(i)

    def uniform(shape, fan_in):
        bound = 1 / math.sqrt(fan_in)
        t = torch.empty(shape, device=device, dtype=dtype)
        return t.uniform_(-bound, bound, generator=gen).requires_grad_(requires_grad)

    w_gate_up, w_down = uniform((e, width, h), h), uniform((e, h, i), i)
    b_gate_up = uniform((e, width), h) if preset.bias else None
    b_down = uniform((e, h), i) if preset.bias else None
    return Experts(preset, ExpertWeights(w_gate_up, w_down, b_gate_up, b_down, preset.activation))


def quantized_experts(experts: Experts, format: str) -> tuple[Experts, Experts]:
    """(experts with their weights quantized to format, the same values dequantized to float for
    the peers, which have no quantized path). int4 takes groups of 128 along K, or the largest
    of 64 and 32 that divides a scaled-down K."""
    w = experts.weights

    def quantized(weight: Tensor):
        groups = [g for g in (128, 64, 32) if weight.shape[2] % g == 0] if format == "int4" else []
        return quantize(weight, format, group_size=groups[0] if groups else None)

    gate_up, down = quantized(w.w_gate_up), quantized(w.w_down)
    return (Experts(experts.preset, replace(w, w_gate_up=gate_up, w_down=down)),
            Experts(experts.preset, replace(w, w_gate_up=gate_up.dequantize(), w_down=down.dequantize())))


def expert_popularity(num_experts: int, routing: str, gen: torch.Generator) -> Tensor:
    """Log-probability [E] of each expert under the routing: uniform, or Zipf over a random
    ranking of the experts."""
    if routing == "zipf":
        rank = torch.randperm(num_experts, generator=gen, device=gen.device).float() + 1
        return -ZIPF_EXPONENT * rank.log()
    return torch.zeros(num_experts, device=gen.device)


def make_ids(num_tokens: int, preset: Preset, routing: str, device, seed: int = 0) -> Tensor:
    """[T, k] int64, k distinct experts per token.

    uniform: every expert equally likely; skewed: half the tokens send one of their k
    choices to expert 0, the rest are uniform; zipf: expert e drawn with probability
    proportional to 1 / rank(e)^1.2. Sampling without replacement is top-k of Gumbel noise
    added to the log-probabilities.
    """
    if routing not in ROUTINGS:
        raise ValueError(f"unknown routing {routing!r}; choose from {', '.join(ROUTINGS)}")
    device = torch.device(device)
    gen = _generator(device, seed + 1)
    e = preset.num_experts
    u = torch.rand(num_tokens, e, generator=gen, device=device).clamp_(1e-9, 1 - 1e-9)
    scores = expert_popularity(e, routing, gen) - (-u.log()).log()
    if routing == "skewed":
        scores[: (num_tokens + 1) // 2, 0] = torch.inf  # token order carries no meaning here
    return scores.topk(preset.top_k, dim=-1).indices


def make_inputs(preset: Preset, num_tokens: int, dtype: torch.dtype, device, routing: str = "uniform",
                seed: int = 0) -> Inputs:
    """Activations of order one, routed ids and routing weights (times the preset's scaling)."""
    device = torch.device(device)
    gen = _generator(device, seed + 2)
    x = torch.randn(num_tokens, preset.hidden_size, generator=gen, device=device).to(dtype)
    ids = make_ids(num_tokens, preset, routing, device, seed)
    logits = torch.randn(num_tokens, preset.top_k, generator=gen, device=device)
    weights = logits.softmax(-1) * preset.routed_scaling
    return Inputs(x, weights, ids, routing)


def distinct_experts(ids: Tensor) -> int:
    """How many experts a batch touches (a host sync: call it outside timed regions)."""
    return int(torch.unique(ids).numel())
