"""The dispatch plan as a parallel stable counting sort: histogram, prefix sum, scatter. O(T*k).

The T*k slots are cut into contiguous chunks, one per task. Each task counts its chunk's
experts; a prefix sum over (expert, chunk) gives every chunk the first row it owns in each
expert; each task then scatters its slots in order. Chunks are in slot order and each is
walked in order, so an expert's rows come out in ascending slot (hence token) order: the
same plan as a stable sort, without sorting.
"""

from __future__ import annotations

import types

import numpy as np
from numba import prange

from .caching import njit

# Slots per chunk below which another task costs more than it saves.
MIN_SLOTS_PER_CHUNK = 4096


def make_plan(ids, num_experts, num_chunks, counts, offsets, token_of_row, row_of_slot):
    """Fill the plan of ids; return the number of ids outside [0, num_experts) (0: success).

    ids:          [T, k] int (any integer type), C-contiguous
    counts:       [E] int32 out;  offsets: [E+1] int32 out
    token_of_row: [T*k] int32 out; row_of_slot: [T, k] int32 out
    Grid: num_chunks tasks over contiguous slot ranges. Nothing is written past counts and
    offsets when an id is out of range, so a bad id is never used as an index.
    """
    top_k = ids.shape[1]
    slots = ids.ravel()
    num_slots = slots.shape[0]
    out_rows = row_of_slot.ravel()
    chunk = (num_slots + num_chunks - 1) // max(num_chunks, 1)
    histogram = np.zeros((num_chunks, num_experts), dtype=np.int64)
    bad = np.zeros(num_chunks, dtype=np.int64)

    # ---- histogram per chunk
    for c in prange(num_chunks):
        for s in range(c * chunk, min((c + 1) * chunk, num_slots)):
            e = slots[s]
            if e < 0 or e >= num_experts:
                bad[c] += 1
            else:
                histogram[c, e] += 1
    num_bad = bad.sum()
    if num_bad:
        return num_bad

    # ---- prefix sum: offsets, then each chunk's first row in each expert
    offsets[0] = 0
    for e in range(num_experts):
        start = offsets[e]
        for c in range(num_chunks):
            count = histogram[c, e]
            histogram[c, e] = start
            start += count
        counts[e] = start - offsets[e]
        offsets[e + 1] = start

    # ---- stable scatter
    for c in prange(num_chunks):
        for s in range(c * chunk, min((c + 1) * chunk, num_slots)):
            e = slots[s]
            row = histogram[c, e]
            histogram[c, e] = row + 1
            token_of_row[row] = s // top_k
            out_rows[s] = row
    return 0


def _named(func, name):
    """func under another name: Numba's cache files are named after the function."""
    copy = types.FunctionType(func.__code__, func.__globals__, name, func.__defaults__, func.__closure__)
    copy.__qualname__ = copy.__name__ = name
    copy.__doc__ = func.__doc__
    return copy


# One chunk needs no threads: the serial build skips a parallel launch (tens of microseconds,
# most of a decode step's plan).
make_plan_serial = njit(cache=True)(_named(make_plan, "make_plan_serial"))
make_plan_parallel = njit(cache=True, parallel=True)(_named(make_plan, "make_plan_parallel"))
