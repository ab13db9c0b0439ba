"""make_plan: the permutation every backend must build exactly."""

import pytest
import torch

import moe_dispatch as md
from cases import CASES
from reference import naive_plan


def test_worked_example(backend):
    # docs/architecture.md's example: 4 tokens, 3 experts, top-2.
    ids = torch.tensor([[0, 2], [1, 0], [2, 1], [0, 2]])
    plan = md.make_plan(ids, 3, backend=backend)
    assert plan.counts.tolist() == [3, 2, 3]
    assert plan.offsets.tolist() == [0, 3, 5, 8]
    assert plan.token_of_row.tolist() == [0, 1, 3, 1, 2, 0, 2, 3]
    assert plan.row_of_slot.tolist() == [[0, 5], [3, 1], [6, 4], [2, 7]]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("id_dtype", [torch.int64, torch.int32], ids=["int64", "int32"])
def test_matches_naive_plan(backend, case, id_dtype, gen):
    ids = case.ids(gen).to(id_dtype)
    plan = md.make_plan(ids, case.experts, backend=backend)
    counts, offsets, token_of_row, row_of_slot = naive_plan(ids, case.experts)
    assert plan.counts.dtype == plan.offsets.dtype == torch.int32
    assert plan.counts.tolist() == counts
    assert plan.offsets.tolist() == offsets
    assert plan.token_of_row.tolist() == token_of_row
    assert plan.row_of_slot.tolist() == row_of_slot


@pytest.mark.parametrize("case", CASES)
def test_invariants(backend, case, gen):
    ids = case.ids(gen)
    ids_before = ids.clone()
    plan = md.make_plan(ids, case.experts, backend=backend)
    T, k = ids.shape
    assert plan.num_tokens == T and plan.top_k == k and plan.num_experts == case.experts
    # offsets are the running sum of the counts, 0 first and T*k last
    assert plan.offsets[0] == 0 and plan.offsets[-1] == T * k
    assert torch.equal(plan.offsets[1:] - plan.offsets[:-1], plan.counts)
    # row_of_slot inverts token_of_row, and each row holds its slot's expert
    rows = plan.row_of_slot.long()
    assert torch.equal(plan.token_of_row.long()[rows], torch.arange(T)[:, None].expand(T, k))
    assert sorted(rows.flatten().tolist()) == list(range(T * k))
    expert_of_row = torch.repeat_interleave(torch.arange(case.experts), plan.counts.long())
    assert torch.equal(expert_of_row[rows], ids)
    # within an expert, rows are in ascending token order
    for e in range(case.experts):
        tokens = plan.token_of_row[plan.offsets[e]:plan.offsets[e + 1]]
        assert torch.all(tokens[1:] >= tokens[:-1])
    assert torch.equal(ids, ids_before)


def test_deterministic(backend, gen):
    ids = torch.randint(0, 5, (64, 3), generator=gen)
    first = md.make_plan(ids, 5, backend=backend)
    again = md.make_plan(ids, 5, backend=backend)
    for name in ("counts", "offsets", "token_of_row", "row_of_slot"):
        assert torch.equal(getattr(first, name), getattr(again, name))


def test_repeated_expert_in_a_row(backend):
    # Not what a router emits, but legal: both slots go to expert 1, first choice first.
    ids = torch.tensor([[1, 1], [0, 1]])
    plan = md.make_plan(ids, 2, backend=backend)
    assert plan.token_of_row.tolist() == [1, 0, 0, 1]
    assert plan.row_of_slot.tolist() == [[1, 2], [0, 3]]
