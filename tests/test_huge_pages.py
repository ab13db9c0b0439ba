"""Large CPU buffers asked for on huge pages: the same tensor as new_empty's, the advice taken
where Linux's transparent huge pages are on."""

import sys
from pathlib import Path

import pytest
import torch

from moe_dispatch.backends import huge_pages

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


@pytest.mark.parametrize("shape", [(3, 5), (4, 1024, 1024)], ids=["small", "large"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.int32])
def test_new_empty_is_new_emptys_tensor(shape, dtype):
    like = torch.zeros(2, dtype=dtype)
    t = huge_pages.new_empty(like, *shape)
    assert (t.shape, t.dtype, t.device, t.is_contiguous()) == (torch.Size(shape), dtype, like.device, True)
    t.fill_(7)  # every byte of it is the caller's to write
    assert bool((t == 7).all())


def _vm_flags(address: int) -> list:
    """The VmFlags of this process's mapping that holds address."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            start, end = (int(part, 16) for part in head.split("-"))
            inside = start <= address < end
        elif inside and head == "VmFlags:":
            return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.skipif(not sys.platform.startswith("linux") or not THP.exists()
                    or "[never]" in THP.read_text(), reason="needs Linux with transparent huge pages on")
def test_a_large_buffer_is_advised_to_take_huge_pages():
    like = torch.zeros(1)
    large = huge_pages.new_empty(like, huge_pages.MIN_BYTES // 4 + 2 * huge_pages.PAGE_BYTES)
    first_page = -(-large.data_ptr() // huge_pages.PAGE_BYTES) * huge_pages.PAGE_BYTES
    assert "hg" in _vm_flags(first_page)
