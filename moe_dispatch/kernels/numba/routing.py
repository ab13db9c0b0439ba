"""The router and the top-k choice of a decode step, inside the step's own Numba call.

route_rows computes what MoE's router and routing.route give: float32 logits x @ router.T,
scores (softmax or sigmoid), each row's top_k experts by score plus bias (with groups, among
the topk_groups best groups only, a group's score its two best biased scores summed) and
their weights, the chosen scores renormalized if asked, times scale. As route, a softmax
without bias or groups ranks the logits themselves. Ties go to the lower id, NaN above every
number. A decode step's routing is a handful of torch operations on a [T, E] row each, whose
calls cost more than the step's arithmetic when the caches are cold (docs/cpu.md).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import prange

from .caching import njit
from .grouped_mm import FASTMATH
from .scalars import widen


class Routing(NamedTuple):
    """A layer's routing as route_rows reads it: routing.route's options."""

    router: np.ndarray  # [E, H] float32; [0, 0]: none, the caller gives the weights and ids
    bias: np.ndarray  # [E] float32 added to the scores for the choice only; [0]: none
    sigmoid: bool  # sigmoid scores, else softmax
    n_groups: int  # 0: no groups
    topk_groups: int
    renormalize: bool
    scale: float


NO_ROUTING = Routing(np.zeros((0, 0), dtype=np.float32), np.zeros(0, dtype=np.float32), False, 0, 0, False, 1.0)


@njit(cache=True, inline="always")
def _ranks_before(a, b):
    """Whether a comes before b in top-k order: larger, or NaN where b is not."""
    return a > b or (a != a and b == b)


@njit(cache=True)
def _top_k(values, taken, out):
    """out[j] = the index of the j-th largest of values (ties to the lower index)."""
    taken[:values.shape[0]] = False
    for j in range(out.shape[0]):
        best = -1
        for e in range(values.shape[0]):
            if not taken[e] and (best < 0 or _ranks_before(values[e], values[best])):
                best = e
        taken[best] = True
        out[j] = best


@njit(cache=True)
def _keep_groups(choice, n_groups, topk_groups, taken, kept):
    """choice of the experts outside the topk_groups best groups set to -inf (a group's score:
    its two best choices summed, its one where groups are single experts)."""
    size = choice.shape[0] // n_groups
    group_scores = np.empty(n_groups, dtype=np.float32)
    for g in range(n_groups):
        first = second = np.float32(-np.inf)
        for e in range(g * size, (g + 1) * size):
            if _ranks_before(choice[e], first):
                first, second = choice[e], first
            elif _ranks_before(choice[e], second):
                second = choice[e]
        group_scores[g] = first + second if size > 1 else first
    _top_k(group_scores, taken, kept[:topk_groups])
    keep = np.zeros(n_groups, dtype=np.bool_)
    for g in kept[:topk_groups]:
        keep[g] = True
    for e in range(choice.shape[0]):
        if not keep[e // size]:
            choice[e] = -np.inf


@njit(cache=True, parallel=True, fastmath=FASTMATH)
def route_rows(x, routing, weights, ids):
    """weights, ids [T, k] = the routing of x [T, H] (16-bit floats as bits, or float32/64)
    by routing (a Routing): ids int64, weights in their own type, computed in float32."""
    router = routing.router
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
    # route's shortcut: a plain softmax ranks the logits themselves (scores that underflow to
    # 0 keep their order)
    by_logits = not routing.sigmoid and routing.bias.shape[0] == 0 and routing.n_groups == 0
    scores, choice = np.empty(num_experts, dtype=np.float32), np.empty(num_experts, dtype=np.float32)
    taken, kept = np.empty(num_experts, dtype=np.bool_), np.empty(max(routing.n_groups, 1), dtype=np.int64)
    for t in range(num_tokens):
        row = logits[t]
        if routing.sigmoid:
            for e in range(num_experts):
                scores[e] = np.float32(1.0) / (np.float32(1.0) + np.exp(-row[e]))
        else:
            peak = row[0]
            for e in range(num_experts):
                peak = row[e] if _ranks_before(row[e], peak) else peak
            total = np.float32(0.0)
            for e in range(num_experts):
                scores[e] = np.exp(row[e] - peak)
                total += scores[e]
            for e in range(num_experts):
                scores[e] /= total
        for e in range(num_experts):
            choice[e] = row[e] if by_logits else scores[e] + routing.bias[e] if routing.bias.shape[0] else scores[e]
        if routing.n_groups:
            _keep_groups(choice, routing.n_groups, routing.topk_groups, taken, kept)
        _top_k(choice, taken, ids[t])
        total = np.float32(0.0)
        for j in range(top_k):
            total += scores[ids[t, j]]
        total = max(total, np.float32(1e-20)) if routing.renormalize else np.float32(1.0)
        for j in range(top_k):
            weights[t, j] = scores[ids[t, j]] / total * np.float32(routing.scale)
