"""The blocked path's experts side by side (backends/expert_threads.py): how the tasks are cut
and handed out, and the numba backend's products through them against the reference."""

import threading

import numpy as np
import pytest
import torch

import moe_dispatch as md
from conftest import (assert_close, expert_weights, large_groups_everywhere, needs_numba, output_and_grads,
                      random_weights)
from moe_dispatch.backends.expert_threads import MIN_TASK_ROWS, RUN_ROWS, Task, expert_tasks, run_tasks
from reference import naive_moe_mlp


@pytest.fixture
def two_threads():
    """torch (and so the blocked path) on two threads, whatever the machine has."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _bounds(counts):
    return np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)


@pytest.mark.parametrize("counts, threads", [
    ([5, 0, 300, 7, 64, 1], 2),  # one expert holds most rows: cut into parts
    ([100] * 8, 4),  # even experts, each alone
    ([3, 0, 2, 9] * 20, 2),  # many small experts: runs of consecutive ones
    ([0, 0, 3], 2),  # a single small expert
    ([0, 0], 2),  # no rows at all
    ([1000, 1], 1),  # one thread still cuts the largest (it cannot know the others' load)
])
def test_tasks_cover_every_row_once_largest_first(counts, threads):
    bounds = _bounds(counts)
    tasks = expert_tasks(bounds, threads)
    covered = np.zeros(int(bounds[-1]), dtype=int)
    block = max(MIN_TASK_ROWS, -(-int(bounds[-1]) // (4 * threads)))
    for first, last, start, end in tasks:
        assert bounds[first] <= start < end <= bounds[last]
        if last - first > 1:  # a run: whole experts of fewer than RUN_ROWS rows, within a block
            assert (start, end) == (bounds[first], bounds[last]) and end - start <= block
            assert all(0 <= count < RUN_ROWS for count in counts[first:last])
        else:
            assert end - start <= 2 * block
        covered[start:end] += 1
    assert (covered == 1).all()
    sizes = [end - start for *_, start, end in tasks]
    assert sizes == sorted(sizes, reverse=True)


def test_tasks_of_chosen_experts_and_whole_ones():
    bounds = _bounds([400, 2, 0, 90, 5, 6])
    assert sorted(expert_tasks(bounds, 2, [0, 3], whole_experts=True)) == [Task(0, 1, 0, 400), Task(3, 4, 402, 492)]
    # a run never spans an expert left out: its rows lie between
    assert sorted(expert_tasks(bounds, 2, [1, 4, 5])) == [Task(1, 2, 400, 402), Task(4, 6, 492, 503)]


def test_run_tasks_runs_each_task_once_on_its_own_slot():
    tasks = [Task(e, e + 1, e, e + 1) for e in range(40)]
    done, slot_threads = [], {}
    lock = threading.Lock()

    def work(task, slot):
        with lock:
            done.append(task)
            # a slot's buffers belong to one thread at a time
            assert slot_threads.setdefault(slot, threading.get_ident()) == threading.get_ident()
        assert torch.get_num_threads() == 1

    before = torch.get_num_threads()
    run_tasks(tasks, work, threads=3)
    assert sorted(done) == tasks
    assert set(slot_threads) <= {0, 1, 2}
    assert torch.get_num_threads() == before


def test_helpers_take_the_callers_grad_mode():
    modes = []
    with torch.no_grad():
        run_tasks([Task(e, e + 1, 0, 1) for e in range(8)], lambda task, slot: modes.append(torch.is_grad_enabled()), 2)
    assert modes and not any(modes)
    with torch.inference_mode():
        run_tasks([Task(e, e + 1, 0, 1) for e in range(8)],
                  lambda task, slot: modes.append(torch.is_inference_mode_enabled()), 2)
    assert modes[-1]


def test_the_first_error_is_raised_once_every_thread_stopped():
    running = []

    def work(task, slot):
        running.append(task)
        if task.first == 3:
            raise ValueError("expert 3")

    before = torch.get_num_threads()
    with pytest.raises(ValueError, match="expert 3"):
        run_tasks([Task(e, e + 1, 0, 1) for e in range(50)], work, threads=2)
    assert len(running) < 50  # the handing out stopped
    assert torch.get_num_threads() == before


@needs_numba
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_blocked_path_with_an_expert_cut_into_blocks(dtype, gen, monkeypatch, two_threads):
    """Most tokens on one expert: its rows go to several threads in blocks, forward (GEMM1,
    activation, GEMM2 per block) and backward (grouped_mm per block, weight gradients whole)."""
    large_groups_everywhere(monkeypatch)
    num_tokens, hidden, inter, num_experts = 5 * MIN_TASK_ROWS + 5, 48, 40, 6
    ids = torch.stack([torch.where(torch.arange(num_tokens) % 7 == 0, 4, 1), torch.arange(num_tokens) % 6], 1)
    ids[ids[:, 0] == ids[:, 1], 1] = 0
    x = torch.randn(num_tokens, hidden, generator=gen).to(dtype)
    weights = random_weights(num_tokens, 2, gen).to(dtype)
    w_gate_up, w_down, b_gate_up, b_down = expert_weights(num_experts, hidden, inter, gen, dtype, bias=True)
    tensors = (x, weights, w_gate_up, w_down, b_gate_up, b_down)
    out, grads = output_and_grads(lambda x, w, wg, wd, bg, bd: md.moe_mlp(
        x, w, ids, wg, wd, b_gate_up=bg, b_down=bd, backend="numba"), tensors)
    ref, ref_grads = output_and_grads(lambda x, w, wg, wd, bg, bd: naive_moe_mlp(
        x.double(), w.double(), ids, wg.double(), wd.double(), bg.double(), bd.double()), tensors)
    assert_close(out, ref)
    if dtype == torch.float32:  # bfloat16 gradients are sums of H rounded products: too coarse here
        for got, want in zip(grads, ref_grads):
            assert_close(got, want, dtype)
