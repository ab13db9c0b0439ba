"""Moving rows between token order and expert order, and the weighted combine.

Every kernel here is parallel over output rows, so no two tasks write the same row.
Index arrays come from a DispatchPlan; launchers check them with `indices_in_range`
first, so a hand-made plan can never send a kernel out of bounds.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from .caching import njit
from .scalars import acc_zero, acc_zeros, narrow, widen
from .vector_width import wide_vectors


@njit(cache=True)
def indices_in_range(indices, limit):
    """True when every entry of indices (any shape, C-contiguous) lies in [0, limit)."""
    for i in indices.ravel():
        if i < 0 or i >= limit:
            return False
    return True


@njit(cache=True)
def is_permutation(indices, size):
    """True when indices (any shape, C-contiguous) holds each of 0..size-1 exactly once."""
    if indices.size != size:
        return False
    seen = np.zeros(size, dtype=np.bool_)
    for i in indices.ravel():
        if i < 0 or i >= size or seen[i]:
            return False
        seen[i] = True
    return True


@njit(cache=True)
def offsets_valid(offsets, num_rows):
    """True when offsets starts at 0, never falls, and ends at num_rows."""
    if offsets[0] != 0 or offsets[-1] != num_rows:
        return False
    for e in range(offsets.shape[0] - 1):
        if offsets[e + 1] < offsets[e]:
            return False
    return True


@njit(cache=True, parallel=True)
def gather_rows(x, source_of_row, out):
    """out[r] = x[source_of_row[r]].

    x: [T, H]; source_of_row: [R] int32; out: [R, H] (x's element type). Grid: one task per row.
    """
    for r in prange(out.shape[0]):
        out[r, :] = x[source_of_row[r], :]


@njit(cache=True, parallel=True)
def combine(ys, row_of_slot, weights, out):
    """out[t] = sum_j weights[t, j] * ys[row_of_slot[t, j]], summed in float32.

    ys: [R, N]; row_of_slot: [T, k] int32; weights: [T, k] float32; out: [T, N] (ys's type).
    Grid: one task per token.
    """
    num_tokens, top_k = row_of_slot.shape
    width = ys.shape[1]
    for t in prange(num_tokens):
        wide_vectors()
        acc = acc_zeros(width, ys.dtype)
        for j in range(top_k):
            r = row_of_slot[t, j]
            w = weights[t, j]
            for n in range(width):
                acc[n] += w * widen(ys[r, n])
        for n in range(width):
            out[t, n] = narrow(acc[n], out.dtype)


@njit(cache=True, parallel=True)
def combine_backward(dy, ys, row_of_slot, weights, dys, dweights):
    """The gradients of combine: dys[row_of_slot[t, j]] = weights[t, j] * dy[t] and
    dweights[t, j] = dy[t] . ys[row_of_slot[t, j]], both in float32.

    dy: [T, N]; ys: [R, N]; row_of_slot: [T, k] int32; weights: [T, k] float32;
    dys: [R, N] out (dy's type); dweights: [T, k] float32 out. Grid: one task per token.
    """
    num_tokens, top_k = row_of_slot.shape
    width = dy.shape[1]
    for t in prange(num_tokens):
        wide_vectors()
        for j in range(top_k):
            r = row_of_slot[t, j]
            w = weights[t, j]
            dot = acc_zero(dy.dtype)
            for n in range(width):
                g = widen(dy[t, n])
                dot += g * widen(ys[r, n])
                dys[r, n] = narrow(w * g, dys.dtype)
            dweights[t, j] = dot
