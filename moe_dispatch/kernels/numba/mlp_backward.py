"""The row-wise middle of the expert MLP's backward, in one pass (Backend.moe_mlp_backward_rows).

Between the backward's GEMMs every row needs its activation, the activation's derivative,
the routing weight's gradient and two weighted copies; as torch operations those are
a dozen passes over [R, 2I] float32 temporaries, here one read of each input.
"""

from __future__ import annotations

from numba import prange

from .activations import activate_and_grad, is_gated
from .caching import njit
from .grouped_mm import FASTMATH
from .scalars import like, narrow, widen
from .vector_width import wide_vectors


@njit(cache=True, parallel=True, fastmath=FASTMATH)
def backward_rows(h, g, dyp, row_weight, act, a, dh, do, d_row):
    """Per row r, with w = row_weight[r] and g = dy @ w_down[e] (g[r]):
      a[r]     = act(h[r])                         (gated: act(gate, up))
      d_row[r] = g[r] . a[r]                       (the routing weight's gradient, less bias)
      dh[r]    = d act(h[r]) against g[r] * w      (gated: gate's and up's, where h holds them)
      do[r]    = dyp[r] * w
    h: [R, 2I] gated or [R, I]; g: [R, I]; dyp: [R, H]; row_weight: [R] float32 (float64
    for float64); act: FusedActivation; a: [R, I], dh like h, do like dyp (x's type, 16-bit
    as bits); d_row: [R] like row_weight. Math in float32 (float64). Grid: one task per row.
    """
    for r in prange(h.shape[0]):
        wide_vectors()
        w = row_weight[r]
        d_row[r] = _row(h, g, r, row_weight, act, a, dh)  # a loop that vectorizes (GELU's erf does not)
        for n in range(dyp.shape[1]):
            do[r, n] = narrow(widen(dyp[r, n]) * w, do.dtype)


@njit(cache=True, inline="always", fastmath=FASTMATH)
def _row(h, g, r, row_weight, act, a, dh):
    """backward_rows' a[r] and dh[r]; returns d_row[r]. Through views of the gate and up
    columns, indexed by the loop's counter (an index LLVM cannot prove non-negative, i * step +
    shift, keeps Numba's wraparound in every access), contiguous ones where gates come first:
    the loop vectorizes (swiglu at H=I=64: 0.19 ms for 1024 rows strided, 0.03 contiguous)."""
    w = row_weight[r]
    if act.step == 1:
        return _row_views(h[r, :], h[r, act.shift:], g[r], w, act, a[r], dh[r, :], dh[r, act.shift:])
    return _row_views(h[r, ::act.step], h[r, act.shift::act.step], g[r], w, act, a[r], dh[r, ::act.step],
                      dh[r, act.shift::act.step])


@njit(cache=True, inline="always", fastmath=FASTMATH)
def _row_views(gates, ups, grads, w, act, values, d_gates, d_ups):
    """_row on its views (ups and d_ups: gates and d_gates for a plain activation)."""
    dot = like(w, 0.0)
    if is_gated(act):
        for i in range(grads.shape[0]):
            gi = widen(grads[i])
            value, d_gate, d_up = activate_and_grad(widen(gates[i]), widen(ups[i]), act, True)
            d_gates[i] = narrow(gi * w * d_gate, d_gates.dtype)
            d_ups[i] = narrow(gi * w * d_up, d_ups.dtype)
            values[i] = narrow(value, values.dtype)
            dot += gi * value
    else:
        for i in range(grads.shape[0]):
            gi = widen(grads[i])
            gate = widen(gates[i])
            value, d_gate, _ = activate_and_grad(gate, gate, act, True)
            d_gates[i] = narrow(gi * w * d_gate, d_gates.dtype)
            values[i] = narrow(value, values.dtype)
            dot += gi * value
    return dot
