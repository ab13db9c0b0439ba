"""MoE layer shapes of public models, taken from their Hugging Face configs.

`scaled(preset, f)` shrinks the hidden and intermediate sizes (rounded to multiples of 16)
so that CPU runs finish; the expert count, top-k and routing stay those of the model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch

# The dtypes benchmarks run in, by the name the command line takes.
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class Preset:
    name: str
    num_experts: int
    top_k: int
    hidden_size: int
    intermediate_size: int
    scoring: str = "softmax"
    renormalize: bool = True
    n_groups: Optional[int] = None
    topk_groups: Optional[int] = None
    routed_scaling: float = 1.0
    n_shared_experts: int = 0
    bias: bool = False
    activation: str = "swiglu"
    scale: float = 1.0

    @property
    def label(self) -> str:
        return self.name if self.scale == 1.0 else f"{self.name}@{self.scale:g}"

    def layer_kwargs(self) -> dict:
        """Keyword arguments of moe_dispatch.MoE for this shape."""
        return dict(
            hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_experts=self.num_experts, top_k=self.top_k, activation=self.activation,
            scoring=self.scoring, renormalize=self.renormalize, n_groups=self.n_groups,
            topk_groups=self.topk_groups, routed_scaling=self.routed_scaling,
            n_shared_experts=self.n_shared_experts, bias=self.bias,
        )

    def describe(self) -> str:
        extra = []
        if self.n_groups:
            extra.append(f"{self.n_groups} groups/top-{self.topk_groups}")
        if self.scoring != "softmax":
            extra.append(self.scoring)
        if self.routed_scaling != 1.0:
            extra.append(f"scale {self.routed_scaling:g}")
        if self.n_shared_experts:
            extra.append(f"{self.n_shared_experts} shared")
        if self.bias:
            extra.append("biases")
        tail = f" ({', '.join(extra)})" if extra else ""
        return (f"{self.label}: E={self.num_experts} k={self.top_k} H={self.hidden_size} "
                f"I={self.intermediate_size}{tail}")


PRESETS = {
    p.name: p
    for p in (
        Preset("mixtral-8x7b", 8, 2, 4096, 14336),
        Preset("deepseek-v3", 256, 8, 7168, 2048, scoring="sigmoid", n_groups=8, topk_groups=4,
               routed_scaling=2.5, n_shared_experts=1),
        Preset("deepseek-v2-lite", 64, 6, 2048, 1408, renormalize=False, n_shared_experts=2),
        Preset("qwen3-30b-a3b", 128, 8, 2048, 768),
        Preset("olmoe-1b-7b", 64, 8, 2048, 1024, renormalize=False),
        Preset("gpt-oss-20b", 32, 4, 2880, 2880, bias=True, activation="clamped_swiglu"),
    )
}


# What a run without arguments measures: about a minute on a 2-core CPU; the real shape on a GPU.
DEFAULT_PRESET = "qwen3-30b-a3b"
DEFAULT_SCALE = {"cpu": 0.25, "cuda": 1.0}
DEFAULT_TOKENS = {"cpu": (1, 16, 128, 512), "cuda": (1, 16, 128, 1024, 8192)}


def _round16(value: float) -> int:
    return max(16, int(round(value / 16)) * 16)


def scaled(preset: Preset, factor: float) -> Preset:
    """The preset with H and I multiplied by factor, each rounded to a multiple of 16."""
    if not factor > 0:
        raise ValueError(f"scale must be positive, got {factor}")
    if factor == 1.0:
        return preset
    return dataclasses.replace(
        preset, hidden_size=_round16(preset.hidden_size * factor),
        intermediate_size=_round16(preset.intermediate_size * factor), scale=factor,
    )


def get_preset(name: str, scale: float = 1.0) -> Preset:
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return scaled(PRESETS[name], scale)
