"""How much memory there is for a benchmark's weights, and how much the process has held.

A full-size layer may not fit: DeepSeek-V3's experts take 22.5 GB in bfloat16 and 11.3 GB in
fp8. The bench makes quantized experts in their format directly, gives the peers a float copy
only where fits_in_memory says it fits, and reports the resident memory before the experts
were made and the peak since (Linux's VmRSS and VmHWM, the peak reset through
/proc/self/clear_refs; elsewhere ru_maxrss, the peak since the process started).
"""

from __future__ import annotations

import sys
from typing import Optional

import torch


def fits_in_memory(nbytes: float, device: torch.device) -> Optional[str]:
    """None when nbytes fit on the device beside what it holds now (a fifth of what is free
    kept for the work around them), else how much is needed and free."""
    available = available_memory(device)
    if available is None or nbytes <= 0.8 * available:
        return None
    return f"{nbytes / 1e9:.1f} GB, {available / 1e9:.1f} GB available"


def available_memory(device: torch.device) -> Optional[int]:
    """Bytes that can be allocated on the device now without swapping, or None when unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return _kib_field("/proc/meminfo", "MemAvailable")


def resident_memory() -> Optional[int]:
    """The bytes this process holds in memory now, or None where unknown (Linux's VmRSS)."""
    return _kib_field("/proc/self/status", "VmRSS")


def reset_peak_memory() -> None:
    """Start this process's peak resident memory over from what it holds now (Linux: the
    VmHWM that peak_resident_memory reads; elsewhere the peak stays the whole process's)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_resident_memory() -> Optional[int]:
    """The most bytes this process has held in memory since reset_peak_memory (Linux's VmHWM;
    elsewhere ru_maxrss, since it started), or None where unknown."""
    peak = _kib_field("/proc/self/status", "VmHWM")
    if peak is not None:
        return peak
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


def _kib_field(path: str, field: str) -> Optional[int]:
    """Bytes of a "Field: N kB" line of a /proc file, or None without one."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
