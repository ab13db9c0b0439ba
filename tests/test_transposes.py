"""The 16 x 16 blocks of moe_dispatch/kernels/numba/transposes.py, compiled and as Python (what
NUMBA_DISABLE_JIT runs), against numpy's transpose."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import needs_numba

pytestmark = needs_numba


@pytest.mark.nojit
@pytest.mark.parametrize("dtype", [np.uint32, np.float32])
def test_a_block_moves_its_rows_and_columns_only(dtype):
    """Every count of rows and width up to a block, rows anywhere in the source; nothing
    written outside the block's columns and rows in the destination."""
    from numba import njit

    from moe_dispatch.kernels.numba.transposes import BLOCK, transpose_block

    @njit
    def run(src, offsets, count, width, dst, dst_start, dst_stride):
        transpose_block(src, offsets, count, width, dst, dst_start, dst_stride)

    rng = np.random.default_rng(0)
    src = rng.integers(0, 2**32, 1000, dtype=np.uint32).view(dtype)  # every bit pattern, NaNs too
    stride = BLOCK + 3
    for count in (1, 2, BLOCK - 1, BLOCK):
        for width in (1, 5, BLOCK):
            offsets = rng.choice(1000 - BLOCK, size=BLOCK, replace=False)
            dst = np.zeros(2 + BLOCK * stride, dtype=dtype)
            run(src, offsets, count, width, dst, 2, stride)
            want = np.zeros_like(dst)
            rows = np.stack([src[o:o + width] for o in offsets[:count]])  # [count, width]
            for lane in range(width):
                want[2 + lane * stride:2 + lane * stride + count] = rows[:, lane]
            np.testing.assert_array_equal(dst.view(np.uint32), want.view(np.uint32), err_msg=f"{count} x {width}")
