"""The router and the top-k choice of a decode step, inside the step's own Numba call.

route_rows computes what MoE's router and routing.route give for softmax scoring without
groups or a bias: float32 logits x @ router.T, each row's top_k experts by logit (ties to the
lower id, NaN above every number, as the first of equals), and their weights, the softmax of
the chosen logits (renormalize) or the full softmax at the chosen experts, times scale. A
decode step's routing is a handful of torch operations on a [T, E] row each, whose calls cost
more than the step's arithmetic when the caches are cold (docs/cpu.md).
"""

from __future__ import annotations

import numpy as np
from numba import prange

from .caching import njit
from .grouped_mm import FASTMATH
from .scalars import widen


@njit(cache=True, inline="always")
def _ranks_before(a, b):
    """Whether logit a comes before b in top-k order: larger, or NaN where b is not."""
    return a > b or (a != a and b == b)


@njit(cache=True, parallel=True, fastmath=FASTMATH)
def route_rows(x, router, renormalize, scale, weights, ids):
    """weights, ids [T, k] = the routing of x [T, H] (16-bit floats as bits, or float32/64)
    by router [E, H] float32: ids int64, weights in their own type, computed in float32."""
    num_tokens, hidden = x.shape
    num_experts, top_k = router.shape[0], ids.shape[1]
    rows = np.empty((num_tokens, hidden), dtype=np.float32)
    for t in range(num_tokens):
        for h in range(hidden):
            rows[t, h] = np.float32(widen(x[t, h]))
    logits = np.empty((num_tokens, num_experts), dtype=np.float32)
    for e in prange(num_experts):  # each expert's router row read once, from memory
        for t in range(num_tokens):
            total = np.float32(0.0)
            for h in range(hidden):
                total += rows[t, h] * router[e, h]
            logits[t, e] = total
    taken = np.empty(num_experts, dtype=np.bool_)
    for t in range(num_tokens):
        row = logits[t]
        taken[:] = False
        for j in range(top_k):
            best = -1
            for e in range(num_experts):
                if not taken[e] and (best < 0 or _ranks_before(row[e], row[best])):
                    best = e
            taken[best] = True
            ids[t, j] = best
        peak = row[ids[t, 0]]
        total = np.float32(0.0)
        if renormalize:
            for j in range(top_k):
                total += np.exp(row[ids[t, j]] - peak)
        else:
            for e in range(num_experts):
                total += np.exp(row[e] - peak)
        for j in range(top_k):
            weights[t, j] = np.exp(row[ids[t, j]] - peak) / total * np.float32(scale)
