"""The blocked path's experts side by side: each thread takes whole experts (or blocks of a
large expert's rows) and runs their library products on one core.

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
from typing import Callable, NamedTuple, Optional, Sequence

import numpy as np
import torch

# No task's rows exceed a (2 * threads)-th of the step's, down to this many: smaller blocks
# would read the expert's weights once more per block for little balance.
MIN_SPLIT_ROWS = 64


class Task(NamedTuple):
    expert: int
    start: int  # the task's rows, start:end, in the plan's order
    end: int


def expert_tasks(bounds: np.ndarray, threads: int, experts: Optional[Sequence[int]] = None,
                 split: bool = True) -> list[Task]:
    """The tasks of the experts with rows (or of these experts), largest first; with split, an
    expert of more rows than a (2 * threads)-th of all the tasks' becomes blocks of that many."""
    counts = np.diff(bounds)
    experts = np.flatnonzero(counts).tolist() if experts is None else experts
    rows = int(sum(counts[e] for e in experts))
    block = max(MIN_SPLIT_ROWS, -(-rows // (2 * threads)))
    tasks = []
    for e in experts:
        start, end = int(bounds[e]), int(bounds[e + 1])
        step = block if split else end - start
        tasks.extend(Task(e, s, min(s + step, end)) for s in range(start, end, step))
    tasks.sort(key=lambda task: task.start - task.end)
    return tasks


_pool: Optional[ThreadPoolExecutor] = None
_pool_lock = threading.Lock()


def _workers(count: int) -> ThreadPoolExecutor:
    """The pool of helper threads, grown to at least count."""
    global _pool
    with _pool_lock:
        if _pool is None or _pool._max_workers < count:
            if _pool is not None:
                _pool.shutdown(wait=False)
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
