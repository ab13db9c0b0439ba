"""The edge cases every op is tested on (DEVELOPERS.md, "Adding or changing a kernel"), shared
by every op's tests. Each says why it exists."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import pytest
import torch

from conftest import random_ids


@dataclass(frozen=True)
class Case:
    tokens: int
    top_k: int
    experts: int
    hidden: int = 24
    inter: int = 20
    # Builds ids [T, k] from (T, k, E, generator); None = a random distinct top-k per token.
    ids_fn: Optional[Callable] = None

    def ids(self, gen: torch.Generator) -> torch.Tensor:
        if self.ids_fn is not None:
            return self.ids_fn(self.tokens, self.top_k, self.experts, gen)
        return random_ids(self.tokens, self.top_k, self.experts, gen)


def _two_experts_only(T, k, E, gen):
    """Only experts 1 and E-2 get tokens: the rest are empty."""
    return torch.tensor([1, E - 2]).repeat(T, 1)[:, :k]


def _one_expert_takes_all(T, k, E, gen):
    """Every token's first choice is expert 3; the rest spread over the others."""
    ids = random_ids(T, k, E - 1, gen)
    ids = ids + (ids >= 3).long()  # never 3 in the random part
    ids[:, 0] = 3
    return ids


CASES = [
    # T below any block size
    pytest.param(Case(3, 2, 4), id="T<block"),
    # sizes that are multiples of nothing
    pytest.param(Case(37, 3, 5, hidden=33, inter=19), id="odd-sizes"),
    # a prime number of experts
    pytest.param(Case(20, 2, 13), id="prime-E"),
    # one choice per token: no combine sum
    pytest.param(Case(9, 1, 4), id="k=1"),
    # every expert chosen by every token
    pytest.param(Case(6, 4, 4), id="k=E"),
    # most experts receive no rows
    pytest.param(Case(11, 2, 8, ids_fn=_two_experts_only), id="empty-experts"),
    # one expert gets every token
    pytest.param(Case(17, 2, 6, ids_fn=_one_expert_takes_all), id="one-expert-all"),
    # an empty batch
    pytest.param(Case(0, 2, 4), id="T=0"),
    # a single decode token
    pytest.param(Case(1, 2, 6), id="T=1"),
    # the degenerate sizes (issue 21): a unit dimension is both strides' candidate for the
    # contiguous one (torch._grouped_mm refused a.T of a [R, 1] activation in numba's backward)
    pytest.param(Case(6, 2, 4, hidden=1), id="H=1"),
    pytest.param(Case(6, 2, 4, inter=1), id="I=1"),
    # a single expert: one group holds every row
    pytest.param(Case(5, 1, 1), id="E=1"),
]
