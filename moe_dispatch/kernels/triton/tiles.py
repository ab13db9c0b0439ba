"""What a Triton launch is given beside its tensors: the tile config, and how its dots multiply."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton


@dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 2
    split_k: int = 1
    tma: bool = False  # weight tiles through the tensor memory accelerator (sm_90+; grouped GEMM only)


def expert_block(num_experts: int) -> int:
    """E_PAD: a power of two >= E, at least 16 so that small expert counts share one compile."""
    return max(16, triton.next_power_of_2(num_experts))


# ---- the precision of tl.dot ---------------------------------------------------------------


def _tf32_allowed() -> bool:
    """torch's matmul TF32 setting. Reading the legacy allow_tf32 raises once the newer
    fp32_precision API was used, so that one is asked first ("none": never set)."""
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", "none")
    if precision != "none":
        return precision == "tf32"
    return bool(matmul.allow_tf32)


def dot_precision(dtype: torch.dtype, device: torch.device) -> str:
    """tf32 only for float32 on a GPU whose torch setting allows it."""
    if dtype == torch.float32 and device.type == "cuda" and _tf32_allowed():
        return "tf32"
    return "ieee"


def dot_upcast(dtype: torch.dtype, device: torch.device) -> bool:
    """The interpreter (CPU tensors) multiplies bf16 bit patterns in tl.dot: go through float32."""
    return dtype == torch.bfloat16 and device.type != "cuda"
