"""This machine's roofline: read and copy bandwidth, and matmul peak per dtype.

Each figure is the best of repeated runs: the roofline is what the machine can reach, and
the best run is the one least disturbed by other work on it.

Measured once per device (and torch version) and cached in
$MOE_DISPATCH_CACHE_DIR (default ~/.cache/moe_dispatch)/roofline.json, next to the triton
backend's autotune results. The bandwidth of a shared machine drifts (a cloud VM's read
bandwidth has moved between 45 and 88 GB/s within 20 minutes), so `moe-dispatch bench` and
`profile` measure it again at the start of each run (half a second) and take the matmul
peaks, which take seconds, from the cache. Every benchmark result is placed against it: the
fastest an op could run is max(bytes / bandwidth, FLOPs / peak).
"""

from __future__ import annotations

import platform
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional

import torch

from .. import cache_files
from ..backends import cpu_matmul
from .costs import Work
from .presets import DTYPES
from .timing import measure, synchronize

# Bumped whenever the peaks are measured differently (2: oneDNN's float32 inner product).
METHOD = 2

@dataclass
class Roofline:
    device: str  # the cache key: what was measured
    read_gbps: float  # streaming a large tensor once (a reduction)
    copy_gbps: float  # bytes read plus bytes written by a large copy
    peak_tflops: dict  # dtype name -> dense matmul TFLOP/s
    torch: str
    measured_at: str
    method: int = 0  # how the peaks were measured: entries of another METHOD are measured again

    def bandwidth(self, traffic: str) -> float:
        return self.copy_gbps if traffic == "copy" else self.read_gbps

    def memory_ms(self, work: Work) -> float:
        return work.bytes / (self.bandwidth(work.traffic) * 1e9) * 1e3

    def compute_ms(self, work: Work, dtype: torch.dtype) -> float:
        peak = self.peak_tflops.get(str(dtype).removeprefix("torch."))
        return work.flops / (peak * 1e12) * 1e3 if peak and work.flops else 0.0

    def bound(self, work: Work, dtype: torch.dtype) -> tuple[float, str]:
        """(the least time in ms this work can take here, "memory" or "compute")."""
        memory, compute = self.memory_ms(work), self.compute_ms(work, dtype)
        return (memory, "memory") if memory >= compute else (compute, "compute")


def cache_path() -> Path:
    return cache_files.cache_dir() / "roofline.json"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_key(device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        threads = torch.get_num_threads()
        name = f"{_cpu_name()}, {threads} thread{'s' if threads > 1 else ''}"
    return f"{device.type}: {name} (torch {torch.__version__})"


def _bandwidth(device: torch.device, nbytes: int) -> tuple[float, float]:
    x = torch.ones(nbytes // 4, device=device)
    y = torch.empty_like(x)
    read = min(measure(lambda: x.sum(), device, warmup=1, budget_s=0.2))
    copy = min(measure(lambda: y.copy_(x), device, warmup=1, budget_s=0.2))
    return nbytes / read / 1e6, 2 * nbytes / copy / 1e6


def measure_bandwidth(device) -> tuple[float, float]:
    """(read, copy) GB/s, each the best of repeated runs over a buffer well beyond the caches."""
    device = torch.device(device)
    return _bandwidth(device, (2 << 30) if device.type == "cuda" else (256 << 20))


def _matmul_peak(device: torch.device, dtype: torch.dtype, max_n: int) -> float:
    """TFLOP/s of the fastest way torch multiplies matrices of dtype here: a @ b, a @ b.T
    (nn.Linear's layout), and on a CPU oneDNN's inner product and, for 16-bit types, the
    float32 routes. On a Zen 5, torch's CPU float16 matmul runs at 1-3 GFLOP/s in the first
    layout, 60 in the second and 150 through float32; its float32 matmul (MKL) at 0.2
    TFLOP/s, oneDNN's at 0.45. The numba backend takes the fastest of these routes."""
    forms = [lambda a, b: a @ b, lambda a, b: a @ b.T]
    if device.type == "cpu":
        if dtype.itemsize == 2:
            forms.append(lambda a, b: (a.float() @ b.float()).to(dtype))
        via = torch.float32 if cpu_matmul.computes_in_float32(dtype) else dtype  # as matmul_into computes it
        if cpu_matmul.onednn_available(via):
            forms.append(lambda a, b: cpu_matmul.onednn_linear(a.to(via), b.to(via)).to(dtype))
    return max(_square_matmul_tflops(device, dtype, max_n, form) for form in forms)


def _square_matmul_tflops(device: torch.device, dtype: torch.dtype, max_n: int, form) -> float:
    """TFLOP/s of form(a, b) on the largest square matrices up to max_n that take well under a
    second (sizes grow from small, for the forms that run at a few GFLOP/s)."""
    n, best = 256, 0.0
    while True:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        t0 = time.perf_counter()
        form(a, b)
        synchronize(device)
        first = time.perf_counter() - t0
        ms = min(measure(lambda: form(a, b), device, warmup=1, budget_s=0.2, max_repeats=50))
        best = max(best, 2 * n**3 / ms / 1e9)
        if n >= max_n or first > 0.05 and ms > 20:
            return best
        n *= 2


def measure_roofline(device) -> Roofline:
    device = torch.device(device)
    read, copy = measure_bandwidth(device)
    max_n = 8192 if device.type == "cuda" else 2048
    peaks = {name: _matmul_peak(device, dtype, max_n) for name, dtype in DTYPES.items()}
    return Roofline(device_key(device), read, copy, peaks, torch.__version__, _now(), METHOD)


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %Z")


def load_cache() -> dict:
    return cache_files.read_object(cache_path())


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def _roofline(entry) -> Optional[Roofline]:
    """The Roofline a cache entry holds, or None for one with other fields or wrong-typed values
    (hand-edited, or written by another version): such a figure would mislead every result."""
    try:
        found = Roofline(**entry)
    except TypeError:
        return None
    fine = (all(isinstance(v, str) for v in (found.device, found.torch, found.measured_at))
            and _number(found.read_gbps) and _number(found.copy_gbps)
            and isinstance(found.method, int) and isinstance(found.peak_tflops, dict)
            and all(isinstance(k, str) and _number(v) for k, v in found.peak_tflops.items()))
    return found if fine else None


def cached_roofline(device) -> Optional[Roofline]:
    key = device_key(torch.device(device))
    entry = load_cache().get(key)
    if entry is None:
        return None
    found = _roofline(entry)
    if found is None:
        cache_files.warn_once(cache_path(), f"the entry for {key!r} is not a roofline; measuring again")
    return found if found and found.method == METHOD else None  # another METHOD: measured again


def get_roofline(device, remeasure: bool = False, fresh_bandwidth: bool = False) -> Roofline:
    """The cached roofline of this device, measured (a few seconds) when missing; with
    fresh_bandwidth, its bandwidth measured now (half a second) and cached in its place."""
    device = torch.device(device)
    found = None if remeasure else cached_roofline(device)
    if found is None:
        roofline = measure_roofline(device)
    elif fresh_bandwidth:
        read, copy = measure_bandwidth(device)
        roofline = replace(found, read_gbps=read, copy_gbps=copy, measured_at=_now())
    else:
        return found
    # a read-only home still gets the figures, just not cached
    cache_files.write_object(cache_path(), {**load_cache(), roofline.device: asdict(roofline)})
    return roofline
