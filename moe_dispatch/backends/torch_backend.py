"""The reference backend: plain PyTorch, short and obviously correct, runs on any device.

It defines what the fast backends must compute. It is vectorized over tokens; grouped_mm
loops over experts, reading the offsets on the host (a sync on GPUs, which the fast
backends avoid).
"""

from __future__ import annotations

from typing import Optional

import torch

from ..activations import upcast
from ..plan import DispatchPlan
from .base import Backend

Tensor = torch.Tensor


class TorchBackend(Backend):
    name = "torch"

    def make_plan(self, ids: Tensor, num_experts: int) -> DispatchPlan:
        num_tokens, top_k = ids.shape
        flat = ids.reshape(-1).long()
        if flat.is_cuda:
            # Checking on the host would sync; a device-side assert still fails loudly.
            torch._assert_async(((flat >= 0) & (flat < num_experts)).all())
        counts = torch.bincount(flat, minlength=num_experts)
        offsets = torch.zeros(num_experts + 1, dtype=torch.int32, device=ids.device)
        offsets[1:] = counts.cumsum(0)
        # A stable sort by expert keeps each expert's slots in ascending token order.
        slot_of_row = torch.sort(flat, stable=True).indices
        row_of_slot = torch.empty_like(slot_of_row)
        row_of_slot[slot_of_row] = torch.arange(flat.numel(), device=ids.device)
        return DispatchPlan(
            counts.to(torch.int32),
            offsets,
            (slot_of_row // top_k).to(torch.int32),
            row_of_slot.view(num_tokens, top_k).to(torch.int32),
        )

    def permute(self, x: Tensor, token_of_row: Tensor) -> Tensor:
        return x.index_select(0, token_of_row)

    def unpermute(self, ys: Tensor, row_of_slot: Tensor, weights: Optional[Tensor]) -> Tensor:
        gathered = upcast(ys.index_select(0, row_of_slot.reshape(-1)))
        gathered = gathered.view(*row_of_slot.shape, ys.shape[1])
        if weights is not None:
            gathered = gathered * upcast(weights)[..., None]
        return gathered.sum(1).to(ys.dtype)

    def grouped_mm(self, a: Tensor, w: Tensor, offsets: Tensor, bias: Optional[Tensor] = None) -> Tensor:
        out = a.new_empty(a.shape[0], w.shape[2])
        bounds = offsets.tolist()
        for e, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
            if start == end:
                continue
            y = a[start:end] @ w[e]
            if bias is not None:
                y = upcast(y) + upcast(bias[e])
            out[start:end] = y
        return out

    def grouped_mm_wgrad(self, a: Tensor, b: Tensor, offsets: Tensor, num_experts: int) -> Tensor:
        out = a.new_zeros(num_experts, a.shape[1], b.shape[1])
        bounds = offsets.tolist()
        for e, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
            if start < end:
                out[e] = a[start:end].T @ b[start:end]
        return out
