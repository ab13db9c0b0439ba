"""Large CPU buffers in transparent huge pages.

Fresh memory faults in one page at a time when it is first written. A training step's weight
gradients are fresh memory every step, and on a 2-core Zen 5 VM their 4 KB page faults cost
about 60 ms per 256 MB (a third of a float32 training step at T=512 on an E=64, H=1024, I=512
layer); in 2 MB pages, 11 ms. torch asks for huge pages only under THP_MEM_ALLOC_ENABLE=1;
empty() asks for them for the numba backend's largest outputs, through madvise, which Linux
honours where /sys/kernel/mm/transparent_hugepage/enabled says "always" or "madvise" and
ignores elsewhere.
"""

from __future__ import annotations

import math
import mmap

import torch

# Smaller buffers fault a few thousand times at most: not worth a mapping of their own.
MIN_BYTES = 16 << 20


def in_huge_pages(nbytes: int) -> bool:
    """Whether empty() maps a buffer of nbytes in huge pages."""
    return nbytes >= MIN_BYTES and hasattr(mmap, "MADV_HUGEPAGE")


def empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """torch.empty(shape, dtype=dtype) on the CPU, in huge pages when it is large and the
    platform can ask for them. The mapping lives as long as the tensor and its views."""
    nbytes = math.prod(shape) * dtype.itemsize
    if not in_huge_pages(nbytes):
        return torch.empty(shape, dtype=dtype)
    buffer = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    buffer.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(buffer, dtype=dtype).view(shape)
