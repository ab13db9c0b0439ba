"""make_plan: the permutation every backend must build exactly. The backend-only sections force
what default sizes never reach (numba's parallel chunks; the Triton kernels' chunks, steps and
scan passes) and reach the kernels' own id guards, which the front end's check hides."""

import pytest
import torch

import moe_dispatch as md
from cases import CASES
from conftest import HAS_CUDA, HAS_TRITON, needs_numba, needs_triton, random_ids
from conftest import TRITON_DEVICE as DEVICE
from moe_dispatch.backends import get_backend
from reference import naive_plan

if HAS_TRITON:
    from moe_dispatch.backends.torch_backend import TorchBackend
    from moe_dispatch.kernels.triton import plan as kplan


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


# ---- numba: the parallel plan, and its kernel's id check -------------------------------------


# 1200 slots share the chunks evenly; 903 leave the last chunk a slot more or less
@needs_numba
@pytest.mark.parametrize("tokens,top_k", [(300, 4), (301, 3)])
def test_parallel_plan_matches_torch(tokens, top_k, gen, monkeypatch):
    """Enough slots for several chunks: the parallel histogram and scatter stay stable."""
    from moe_dispatch.kernels.numba import plan as plan_kernels

    monkeypatch.setattr(plan_kernels, "MIN_SLOTS_PER_CHUNK", 64)
    ids = random_ids(tokens, top_k, 7, gen)
    ids[:150, 0] = 2  # one expert's rows span every chunk
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        got = get_backend("numba").make_plan(ids, 7)
    finally:
        torch.set_num_threads(before)
    for actual, expected in zip(got.tensors(), get_backend("torch").make_plan(ids, 7).tensors()):
        assert torch.equal(actual, expected)


@needs_numba
@pytest.mark.parametrize("bad", [-1, 5], ids=["negative", "E"])
def test_kernel_refuses_out_of_range_ids(bad, gen):
    """The front end validates ids; the kernel must still never index with a bad one."""
    ids = random_ids(6, 2, 5, gen)
    ids[3, 1] = bad
    before = ids.clone()
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 5\)"):
        get_backend("numba").make_plan(ids, 5)
    assert torch.equal(ids, before)


# ---- triton: the plan kernels' chunks, steps and scan passes ---------------------------------

PLAN_SHAPES = [
    # several chunks of one step each (E small: 128 slots a step)
    pytest.param(150, 3, 7, 512, 0, id="chunks"),
    # E wider than a step's one-hot (16 slots a step) and more steps than chunks: 8 steps a chunk
    pytest.param(150, 3, 300, 4, 0, id="wide-E-multistep"),
    # one launch (decode): 4 steps of 128 slots, the last one partial
    pytest.param(150, 3, 7, 512, 4, id="one-launch"),
    # one launch with E wider than a step's one-hot: 4 steps of 16 slots
    pytest.param(20, 3, 300, 512, 4, id="one-launch-wide-E"),
    # one expert, every slot on it
    pytest.param(33, 1, 1, 512, 4, id="E=1"),
    # 29 chunks, more than the scan reads in one pass (16 with E_PAD = 512): a running total across passes
    pytest.param(150, 3, 300, 512, 0, id="two-scan-passes"),
]


@needs_triton
@pytest.mark.usefixtures("garbage_memory")
@pytest.mark.parametrize("tokens,top_k,experts,max_chunks,one_launch_steps", PLAN_SHAPES)
def test_plan_kernels_match_the_naive_plan(tokens, top_k, experts, max_chunks, one_launch_steps, gen, monkeypatch):
    monkeypatch.setattr(kplan, "MAX_CHUNKS", max_chunks)
    monkeypatch.setattr(kplan, "ONE_LAUNCH_STEPS", one_launch_steps)
    ids = random_ids(tokens, top_k, experts, gen).to(DEVICE)
    counts, offsets, token_of_row, row_of_slot, all_placed = kplan.make_plan(ids, experts)
    ref = naive_plan(ids.cpu(), experts)
    assert all_placed.tolist() == [True]
    assert counts.tolist() == ref[0] and offsets.tolist() == ref[1]
    assert token_of_row.tolist() == ref[2] and row_of_slot.tolist() == ref[3]
    assert {t.dtype for t in (counts, offsets, token_of_row, row_of_slot)} == {torch.int32}


@needs_triton
def test_plan_accepts_int32_ids(gen):
    ids = random_ids(25, 3, 6, gen)
    got = kplan.make_plan(ids.to(torch.int32).to(DEVICE), 6)[:4]
    assert all(torch.equal(a.cpu(), b) for a, b in zip(got, TorchBackend().make_plan(ids, 6).tensors()))


@needs_triton
@pytest.mark.usefixtures("garbage_memory")
@pytest.mark.parametrize("one_launch_steps", [0, 4], ids=["three-launches", "one-launch"])
def test_plan_kernels_skip_out_of_range_ids(one_launch_steps, monkeypatch):
    # What CUDA relies on (CPU callers get a ValueError before any kernel): bad slots are
    # placed nowhere, get row -1, and offsets[E] counts only the good ones.
    monkeypatch.setattr(kplan, "ONE_LAUNCH_STEPS", one_launch_steps)
    ids = torch.tensor([[0, 5], [2, -1], [1, 2], [7, 0]], device=DEVICE)
    counts, offsets, token_of_row, row_of_slot, all_placed = kplan.make_plan(ids, 3)
    assert all_placed.tolist() == [False]
    assert counts.tolist() == [2, 1, 2]
    assert offsets.tolist() == [0, 2, 3, 5]
    assert row_of_slot.tolist() == [[0, -1], [3, -1], [2, 4], [-1, 1]]
    assert token_of_row.tolist() == [0, 3, 2, 1, 2, 0, 0, 0]  # unplaced rows still name a real token


@needs_triton
def test_bad_ids_raise_before_any_kernel_on_cpu():
    if HAS_CUDA:
        pytest.skip("CPU tensors only")
    with pytest.raises(ValueError, match="expert id 4"):
        md.make_plan(torch.tensor([[0, 4]]), 4, backend="triton")
