"""The work an op must do at least: FLOPs and the bytes it cannot avoid moving.

Bytes count each distinct expert's weights once (a decode step is bound by them), the
activations read and written once, and nothing for intermediates a fused kernel keeps on
chip. A backward pass reads the weights again and writes their gradients, and does twice
the forward's FLOPs (input and weight gradients).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .. import activations
from .presets import Preset


@dataclass(frozen=True)
class Work:
    flops: float
    bytes: float
    # which bandwidth bounds the bytes: "read" (weights streamed in) or "copy" (data moved)
    traffic: str = "read"

    def __add__(self, other: "Work") -> "Work":
        return Work(self.flops + other.flops, self.bytes + other.bytes, self.traffic)


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def gate_up_width(preset: Preset) -> int:
    return activations.get(preset.activation).width(preset.intermediate_size)


def expert_bytes(preset: Preset, dtype: torch.dtype) -> int:
    """Bytes of one expert's weights and biases."""
    h, i, w1 = preset.hidden_size, preset.intermediate_size, gate_up_width(preset)
    params = w1 * h + h * i + ((w1 + h) if preset.bias else 0)
    return params * element_size(dtype)


def dense_bytes(preset: Preset, dtype: torch.dtype) -> int:
    """The bytes of all the preset's experts as float weights of dtype."""
    return preset.num_experts * expert_bytes(preset, dtype)


def moe_mlp_work(preset: Preset, num_tokens: int, touched: int, dtype: torch.dtype,
                 backward: bool = False, bytes_per_expert: Optional[float] = None) -> Work:
    """The routed experts of one layer for T tokens that touch `touched` distinct experts;
    bytes_per_expert: what one expert's weights hold when not float weights of dtype."""
    h, i, w1 = preset.hidden_size, preset.intermediate_size, gate_up_width(preset)
    rows = num_tokens * preset.top_k
    flops = 2.0 * rows * h * (w1 + i)
    activations = 2 * num_tokens * h * element_size(dtype) + rows * (4 + 8)  # x, out, weights, ids
    weights = touched * (expert_bytes(preset, dtype) if bytes_per_expert is None else bytes_per_expert)
    if backward:
        return Work(3 * flops, 3 * weights + 3 * activations)
    return Work(flops, weights + activations)


def layer_work(preset: Preset, num_tokens: int, touched: int, dtype: torch.dtype, backward: bool = False,
               bytes_per_expert: Optional[float] = None) -> Work:
    """The whole MoE layer: the routed experts (moe_mlp_work), the router's GEMM and the shared
    experts (a SwiGLU MLP of width n_shared * I), their weights float of dtype."""
    h, e, size = preset.hidden_size, preset.num_experts, element_size(dtype)
    shared = preset.n_shared_experts * preset.intermediate_size
    work = Work(2.0 * num_tokens * h * (e + 3 * shared), (e + 3 * shared) * h * size)
    if backward:
        work = Work(3 * work.flops, 3 * work.bytes)
    return moe_mlp_work(preset, num_tokens, touched, dtype, backward, bytes_per_expert) + work


def dense_flops(preset: Preset, num_tokens: int) -> float:
    """FLOPs of the dense MLP with the same active FLOPs (width k * I)."""
    return moe_mlp_work(preset, num_tokens, 0, torch.float32).flops


def grouped_mm_work(rows: int, k_dim: int, n_dim: int, touched: int, dtype: torch.dtype) -> Work:
    """[rows, K] @ w[e] [K, N] over `touched` experts."""
    size = element_size(dtype)
    return Work(2.0 * rows * k_dim * n_dim, (rows * (k_dim + n_dim) + touched * k_dim * n_dim) * size)


def permute_work(rows: int, hidden: int, dtype: torch.dtype) -> Work:
    """Gather rows: each row read once and written once."""
    return Work(0.0, 2.0 * rows * hidden * element_size(dtype), "copy")


def unpermute_work(num_tokens: int, rows: int, hidden: int, dtype: torch.dtype) -> Work:
    """Weighted sum of k rows per token: rows and weights read, tokens written."""
    size = element_size(dtype)
    return Work(2.0 * rows * hidden, (rows + num_tokens) * hidden * size + rows * 8, "copy")
