"""Index arrays read inside kernels: a row or slot index from memory is used only within its range."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def load_index(index_ptr, at, ok, limit):
    """(index_ptr[at], where it may be used): lanes not ok, and indices outside [0, limit), may
    not (they read -1). A plan from elsewhere or a bad expert id never leads a load or a store
    outside its tensor."""
    index = tl.load(index_ptr + at, mask=ok, other=-1)
    return index, ok & (index >= 0) & (index < limit)


@triton.jit
def gathered(index_ptr, rows, ok, limit):
    """(the source row of each row, where valid): through index_ptr when given (load_index),
    else the rows themselves."""
    if index_ptr is not None:
        source, source_ok = load_index(index_ptr, rows, ok, limit)
    else:
        source, source_ok = rows, ok
    return source, source_ok
