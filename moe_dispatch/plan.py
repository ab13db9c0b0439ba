"""DispatchPlan: where every (token, choice) slot goes in expert order, and what follows from it."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DispatchPlan:
    """The permutation that groups a batch's (token, choice) slots by expert.

    Rows are the T*k slots sorted by expert; within one expert they are in ascending
    token order, so every backend builds the same plan (deterministic and stable).

    Fields (all on the device of the ids they were built from):
        counts:       [E]     int32  rows routed to each expert
        offsets:      [E+1]   int32  expert e owns rows offsets[e]:offsets[e+1]; 0 first, T*k last
        token_of_row: [T*k]   int32  the token that row r came from
        row_of_slot:  [T, k]  int32  the row that slot (t, j) went to; inverts token_of_row
    """

    counts: torch.Tensor
    offsets: torch.Tensor
    token_of_row: torch.Tensor
    row_of_slot: torch.Tensor

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(counts, offsets, token_of_row, row_of_slot): as the custom ops take a plan."""
        return self.counts, self.offsets, self.token_of_row, self.row_of_slot

    @property
    def num_experts(self) -> int:
        return self.counts.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.row_of_slot.shape[0]

    @property
    def top_k(self) -> int:
        return self.row_of_slot.shape[1]

    @property
    def num_rows(self) -> int:
        return self.token_of_row.shape[0]

    @property
    def device(self) -> torch.device:
        return self.counts.device

    def expert_of_row(self) -> torch.Tensor:
        """int64 [T*k]: the expert that owns each row."""
        return expert_of_row(self.offsets, self.num_rows)


def expert_of_row(offsets: torch.Tensor, num_rows: int) -> torch.Tensor:
    """int64 [R]: the expert that owns each of R rows under offsets [E+1] (no host sync)."""
    rows = torch.arange(num_rows, device=offsets.device, dtype=offsets.dtype)
    return torch.searchsorted(offsets[1:], rows, right=True)
