"""The blocked path's experts side by side: each thread takes tasks (an expert, a run of small
consecutive ones, or a part of a large one's rows) and runs their library products on one core.

Split over two threads, the product of one expert's few dozen rows runs no faster than on one
(the threads meet at the end of every product, a few hundred times per step), and where another
process holds a core each meeting waits for a descheduled thread: a T=512 step of 64 experts
took ten times its quiet time that way. Here the threads meet once per step, and the tasks are
handed out largest first from one shared queue (as llama.cpp's mul_mat_id hands out chunks
from a counter), so a thread slowed by another process just takes fewer (docs/cpu.md, "Threads").
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator, NamedTuple, Optional, Sequence

import numpy as np
import torch

# A task holds about a (4 * threads)-th of the step's rows, at least this many: enough tasks
# for a thread slowed by another process to take fewer, few enough that each one's fixed
# cost (a dozen torch calls) stays small beside its products.
MIN_TASK_ROWS = 64
# Experts with fewer rows go together in runs (one torch._grouped_mm per run saves a dozen
# torch calls per expert); larger ones, whose calls cost little beside their products, alone:
# a run's product comes out in fresh memory and is copied, which a lone expert's is not.
RUN_ROWS = 128


class Task(NamedTuple):
    first: int  # the experts first:last (one, or a run of consecutive ones)
    last: int
    start: int  # the task's rows, start:end, in the plan's order
    end: int


def expert_tasks(bounds: np.ndarray, threads: int, experts: Optional[Sequence[int]] = None,
                 whole_experts: bool = False) -> list[Task]:
    """The tasks of the experts with rows (or of these experts, in ascending order), largest
    first. A block is a (4 * threads)-th of the rows, at least MIN_TASK_ROWS: consecutive
    experts of fewer than RUN_ROWS rows go together up to a block, an expert with more than
    two blocks is cut into equal parts of about one (each part reads the expert's weights
    again, so only where one thread would otherwise hold up the rest). whole_experts: one task
    per expert."""
    counts = np.diff(bounds)
    experts = np.flatnonzero(counts).tolist() if experts is None else [e for e in experts if counts[e]]
    block = max(MIN_TASK_ROWS, -(-int(sum(counts[e] for e in experts)) // (4 * threads)))
    tasks: list[Task] = []
    grouping = False  # whether tasks[-1] is a run that may take the next expert
    for e in experts:
        start, end = int(bounds[e]), int(bounds[e + 1])
        if whole_experts:
            tasks.append(Task(e, e + 1, start, end))
        elif end - start > 2 * block:
            cuts = np.linspace(start, end, -(-(end - start) // block) + 1).round().astype(int).tolist()
            tasks.extend(Task(e, e + 1, s, t) for s, t in zip(cuts, cuts[1:]))
            grouping = False
        elif grouping and end - start < RUN_ROWS and tasks[-1].end == start and end - tasks[-1].start <= block:
            tasks[-1] = tasks[-1]._replace(last=e + 1, end=end)
        else:
            tasks.append(Task(e, e + 1, start, end))
            grouping = end - start < RUN_ROWS
    tasks.sort(key=lambda task: task.start - task.end)
    return tasks


def expert_rows(task: Task, bounds: np.ndarray) -> Iterator[tuple[int, int, int]]:
    """(e, start, end) for each expert with rows in the task: its rows start:end in the plan's
    order, within the task's."""
    for e in range(task.first, task.last):
        start, end = max(task.start, int(bounds[e])), min(task.end, int(bounds[e + 1]))
        if start < end:
            yield e, start, end


_pool: Optional[ThreadPoolExecutor] = None
_pool_size = 0
_pool_lock = threading.Lock()


def _workers(count: int) -> ThreadPoolExecutor:
    """The pool of helper threads, grown to at least count."""
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None or _pool_size < count:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool_size = count
            # each thread's OpenMP thread count is its own: oneDNN reads the calling thread's
            _pool = ThreadPoolExecutor(count, thread_name_prefix="moe-dispatch-experts",
                                       initializer=torch.set_num_threads, initargs=(1,))
        return _pool


def _forget_pool() -> None:
    global _pool
    _pool = None  # a forked child has the pool object but none of its threads


os.register_at_fork(after_in_child=_forget_pool)


def run_tasks(tasks: Sequence[Task], work: Callable[[Task, int], None], threads: int) -> None:
    """work(task, slot) for every task, on up to `threads` threads at once (the caller's
    among them), each with torch on one thread; slot in range(threads) tells a thread's
    buffers from another's. The first exception stops the handing out and is raised once
    every thread has stopped."""
    threads = min(threads, len(tasks))
    if threads <= 1:
        for task in tasks:
            work(task, 0)
        return
    queue, lock = iter(tasks), threading.Lock()
    errors: list[BaseException] = []
    # grad and inference mode are per thread: the helpers take the caller's
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

    def drain(slot: int) -> None:
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            while not errors:
                with lock:
                    task = next(queue, None)
                if task is None:
                    return
                try:
                    work(task, slot)
                except BaseException as error:
                    errors.append(error)

    # torch's thread count is one number for every thread: one for the duration, so that
    # each thread's products and copies stay on its own core.
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        helpers = [_workers(threads - 1).submit(drain, slot) for slot in range(1, threads)]
        drain(0)
        for helper in helpers:
            helper.result()
    finally:
        torch.set_num_threads(torch_threads)
    if errors:
        raise errors[0]
