"""Wall-clock timing with warm-up outside the timed region; callers report the median."""

from __future__ import annotations

import ctypes
import statistics
import time
from typing import Callable, Optional

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(fn: Callable[[], object], device: torch.device) -> float:
    """Milliseconds of one call; on CUDA timed with events, the call's kernels finished."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


# mallopt's parameters, and the values keep_freed_memory gives them (mallopt takes a C int):
# blocks up to 1 GB come from the heap, whose free top goes back to the system past 1 GB.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
KEPT_BLOCK_BYTES = KEPT_FREE_BYTES = 1 << 30


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep the memory this process frees for its next allocations, as
    jemalloc and tcmalloc do: blocks up to 1 GB from the heap, whose free top is not returned
    to the system below 1 GB. Under glibc's defaults a block over 32 MB is always new memory
    and the heap's top goes back whenever it passes 64 MB, so whether a call's intermediates
    come back as fresh pages (a page fault each 4 KB) depends on the calls before it: a peer
    allocating 16 MB blocks took 29 ms in one run and 46 in the next (docs/benchmarks.md).
    False where the C library is not glibc."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, KEPT_BLOCK_BYTES)) and bool(mallopt(_M_TRIM_THRESHOLD, KEPT_FREE_BYTES))


def measure(fn: Callable[[], object], device, *, warmup: int = 2, budget_s: float = 0.3,
            min_repeats: int = 3, max_repeats: int = 200) -> list[float]:
    """Milliseconds of each timed call of fn, after `warmup` untimed calls (JIT compiles,
    autotuning and allocator growth happen there); about budget_s of timed calls, at least
    min_repeats."""
    return measure_many({"fn": fn}, device, warmup=warmup, budget_s=budget_s, min_repeats=min_repeats,
                        max_repeats=max_repeats)["fn"]


def measure_many(calls: dict, device, *, warmup: int = 2, budget_s: float = 0.3, min_repeats: int = 3,
                 max_repeats: int = 200, times: Optional[dict] = None, failed: Optional[dict] = None,
                 on_start: Callable[[str], None] = lambda name: None) -> dict:
    """{name: [ms, ...]} for several callables timed in turns, one call each per round, so a
    change in the machine's load during the run hits all of them alike.

    Each is warmed up first (on_start(name) is called as its warm-up begins), then timed until
    it has about budget_s of calls and at least min_repeats. Pass `times` to keep the samples
    taken so far when the run is interrupted. With `failed`, a callable whose warm-up raises
    (out of memory, an unsupported case) is left out and failed[name] says why; without it,
    the error propagates.
    """
    device = torch.device(device)
    times = {} if times is None else times
    for name, fn in calls.items():
        on_start(name)
        try:
            for _ in range(warmup):
                fn()
            synchronize(device)
        except Exception as exc:
            if failed is None:
                raise
            failed[name] = _reason(exc)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        times[name] = []
    spent = dict.fromkeys(times, 0.0)
    active = list(times)
    while active:
        for name in list(active):
            ms = time_once(calls[name], device)
            times[name].append(ms)
            spent[name] += ms / 1e3
            n = len(times[name])
            if n >= max_repeats or (n >= min_repeats and spent[name] >= budget_s):
                active.remove(name)
    return times


def capture_cuda_graphs(calls: dict, device, *, warmup: int = 2, failed: Optional[dict] = None) -> dict:
    """{name: replay} for the callables that can be captured in a CUDA graph, each replaying
    one call: how servers run decode, with no launch overhead on the host.

    Each is warmed up eagerly first (compiles and autotuning happen there), then run once under
    torch's sync debug mode: one that syncs with the host cannot be captured, and is left out
    with the reason in failed[name] (like one whose capture fails) rather than attempted.
    """
    device = torch.device(device)
    failed = {} if failed is None else failed
    replays = {}
    for name, fn in calls.items():
        try:
            for _ in range(warmup):
                fn()
            torch.cuda.synchronize(device)
            before = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("error")
            try:
                fn()
            except RuntimeError as exc:
                failed[name] = f"syncs with the host, so no CUDA graph: {_reason(exc)}"
                continue
            finally:
                torch.cuda.set_sync_debug_mode(before)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                output = fn()  # kept alive by the closure: the replays write into it
            replays[name] = lambda graph=graph, output=output: (graph.replay(), output)[1]
        except Exception as exc:
            failed[name] = _reason(exc)
            torch.cuda.synchronize(device)
    return replays


def _reason(exc: Exception) -> str:
    """The exception's type and the first line of its message."""
    message = str(exc).strip()
    return f"{type(exc).__name__}: {message.splitlines()[0] if message else ''}"


def median(times: list[float]) -> float:
    return statistics.median(times)
