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
from ..formats import FORMATS
from ..formats.quantized import QuantizedWeight, quantize
from ..layers import MoE
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


def _uniform(shape, fan_in: int, dtype: torch.dtype, device, gen: torch.Generator, requires_grad: bool = False):
    """nn.Linear's init, U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1 / math.sqrt(fan_in)
    t = torch.empty(shape, device=device, dtype=dtype)
    return t.uniform_(-bound, bound, generator=gen).requires_grad_(requires_grad)


def make_experts(preset: Preset, dtype: torch.dtype, device, seed: int = 0, requires_grad: bool = False) -> Experts:
    """Weights drawn like nn.Linear's init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), on the device;
    requires_grad for timing backward passes."""
    device = torch.device(device)
    gen = _generator(device, seed)
    e, h, i = preset.num_experts, preset.hidden_size, preset.intermediate_size
    width = activations.get(preset.activation).width(i)

    def uniform(shape, fan_in):
        return _uniform(shape, fan_in, dtype, device, gen, requires_grad)

    w_gate_up, w_down = uniform((e, width, h), h), uniform((e, h, i), i)
    b_gate_up = uniform((e, width), h) if preset.bias else None
    b_down = uniform((e, h), i) if preset.bias else None
    return Experts(preset, ExpertWeights(w_gate_up, w_down, b_gate_up, b_down, preset.activation))


# The largest magnitude a code of each format is worth: codes drawn over the format's range,
# times a block scale near bound / it, spread a weight over [-bound, bound].
_LARGEST_CODE = {"int8": 127.0, "int4": 8.0, "fp8": 448.0, "mxfp4": 6.0}


def quantized_experts(preset: Preset, format: str, dtype: torch.dtype, device, seed: int = 0,
                      precision: str = "weight-only") -> Experts:
    """The preset's experts made directly in a quantized format, one expert at a time, so that
    no float copy of them ever exists (DeepSeek-V3's take 11 GB in fp8, 22.5 GB in bfloat16):
    peak memory is the format's bytes plus one expert's temporaries.

    Codes are drawn uniformly over the format's values (fp8: uniform over [-448, 448], rounded
    to e4m3), every block's scale is bound / the largest code value times U(0.5, 1) (mxfp4:
    the largest power of two up to bound / 6), bound = 1/sqrt(fan_in) as in make_experts; the block
    is quantize's for the format (int4: groups of 128, or the largest of 64 and 32 that
    divides a scaled-down K); dtype: the activations'; precision: the weights' (QuantizedWeight)."""
    if format not in _LARGEST_CODE:
        raise ValueError(f"format must be one of {tuple(_LARGEST_CODE)}, got {format!r}")
    device = torch.device(device)
    gen = _generator(device, seed)
    e, h, i = preset.num_experts, preset.hidden_size, preset.intermediate_size
    width = activations.get(preset.activation).width(i)
    cls = FORMATS[format]

    def weight(out_features: int, in_features: int) -> QuantizedWeight:
        # the block quantize chooses: asked of one row of zeros
        block = quantize(torch.zeros(1, 1, in_features), format, group_size=_group_size(format, in_features)).block
        codes = torch.empty(e, out_features, in_features // cls.codes_per_byte, dtype=cls.code_dtype, device=device)
        for expert in codes:
            _draw_codes(format, expert, gen)
        grid = (e, -(-out_features // block[0]), -(-in_features // block[1]))
        scale = 1 / math.sqrt(in_features) / _LARGEST_CODE[format]
        if cls.scale_dtype == torch.uint8:  # e8m0: 2^(s - 127)
            scales = torch.full(grid, 127 + math.floor(math.log2(scale)), dtype=torch.uint8, device=device)
        else:
            scales = torch.empty(grid, device=device).uniform_(0.5 * scale, scale, generator=gen)
        return cls(codes, scales, block, dtype=dtype, precision=precision)

    w_gate_up, w_down = weight(width, h), weight(h, i)
    b_gate_up = _uniform((e, width), h, dtype, device, gen) if preset.bias else None
    b_down = _uniform((e, h), i, dtype, device, gen) if preset.bias else None
    return Experts(preset, ExpertWeights(w_gate_up, w_down, b_gate_up, b_down, preset.activation))


def quantize_experts(experts: Experts, format: str) -> Experts:
    """Float experts with their weights quantized to format by quantize (round to nearest),
    with the groups quantized_experts takes."""
    w = experts.weights
    gate_up, down = (quantize(weight, format, group_size=_group_size(format, weight.shape[2]))
                     for weight in (w.w_gate_up, w.w_down))
    return Experts(experts.preset, replace(w, w_gate_up=gate_up, w_down=down))


def _group_size(format: str, in_features: int) -> Optional[int]:
    """int4: groups of 128, or the largest of 64 and 32 that divides a scaled-down K; the
    format's default block otherwise."""
    groups = [g for g in (128, 64, 32) if in_features % g == 0] if format == "int4" else []
    return groups[0] if groups else None


def _draw_codes(format: str, codes: Tensor, gen: torch.Generator) -> None:
    """Fill one expert's codes in place with codes drawn uniformly over the format's values."""
    if format == "fp8":  # uniform values (random bytes would give log-uniform magnitudes)
        codes.copy_(torch.empty(codes.shape, device=codes.device).uniform_(-448, 448, generator=gen))
    elif format == "int8":
        codes.random_(-127, 128, generator=gen)
    else:  # two 4-bit codes a byte, any byte
        codes.random_(0, 256, generator=gen)


def dequantized(experts: Experts) -> Experts:
    """The same experts with float weights of their activations' dtype (for the peers)."""
    return Experts(experts.preset, experts.weights.dense())


def make_layer(experts: Experts, seed: int = 0) -> MoE:
    """The preset's whole MoE layer around `experts` (shared, not copied): its router, its
    correction bias (sigmoid scoring; drawn from U(-0.1, 0.1), so that it shifts the choice)
    and its shared experts, each weight drawn like nn.Linear's init."""
    preset = experts.preset
    options = {name: value for name, value in preset.layer_kwargs().items()
               if name not in ("hidden_size", "intermediate_size", "num_experts", "top_k", "activation", "bias")}
    layer = MoE.from_experts(experts.weights, preset.top_k, **options)
    gen = _generator(experts.device, seed + 4)
    with torch.no_grad():
        for module in [m for m in (layer.router, layer.shared_experts) if m is not None]:
            for p in module.parameters():
                p.copy_(_uniform(p.shape, p.shape[1], p.dtype, p.device, gen))
        if preset.scoring == "sigmoid":
            layer.expert_bias.uniform_(-0.1, 0.1, generator=gen)
    return layer.requires_grad_(False)


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
