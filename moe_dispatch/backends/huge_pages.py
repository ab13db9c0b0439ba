"""Large CPU buffers on 2 MB pages, where Linux hands them out on request (transparent huge
pages in "madvise" mode, the default of many distributions).

A buffer larger than glibc's mmap threshold (at most 32 MB) is new memory on every call, mapped
4 KB page by page as it is first written: a weight gradient of 64 experts of [1024, 1024]
bfloat16 (128 MB) takes 32,768 page faults, 26 ms on two cores, where the same writes take
7.6-9.1 ms on 2 MB pages and 3.8 on memory already mapped (docs/cpu.md, "Memory").
"""

from __future__ import annotations

import ctypes
import functools
import sys
from typing import Callable, Optional

import torch

Tensor = torch.Tensor

MIN_BYTES = 4 << 20  # smaller buffers hold at most one whole huge page
PAGE_BYTES = 2 << 20
_MADV_HUGEPAGE = 14  # Linux's value on every architecture


@functools.cache
def _madvise() -> Optional[Callable[[int, int, int], int]]:
    if not sys.platform.startswith("linux"):
        return None
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise


def new_empty(like: Tensor, *shape: int) -> Tensor:
    """like.new_empty(shape); when it is a large CPU buffer, the whole 2 MB pages within it asked
    to be huge pages before anything is written (where the kernel refuses, as with transparent
    huge pages off, it keeps 4 KB pages)."""
    t = like.new_empty(shape)
    size = t.numel() * t.element_size()
    madvise = _madvise()
    if size >= MIN_BYTES and t.device.type == "cpu" and madvise is not None:
        start = -(-t.data_ptr() // PAGE_BYTES) * PAGE_BYTES
        end = (t.data_ptr() + size) // PAGE_BYTES * PAGE_BYTES
        if end > start:
            madvise(start, end - start, _MADV_HUGEPAGE)
    return t
