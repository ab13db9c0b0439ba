"""The row-wise middle of the expert MLP's backward, in one pass (Backend.moe_mlp_backward_rows).

Between the backward's GEMMs every row needs its activation, the activation's derivative,
the routing weight's gradient and two weighted copies; as torch operations those are
a dozen passes over [R, 2I] float32 temporaries, here one read of each input.
"""

from __future__ import annotations

from numba import prange

from .activations import activate_and_grad
from .caching import njit
from .scalars import acc_zero, narrow, widen
from .vector_width import wide_vectors


@njit(cache=True, parallel=True)
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
    inter = g.shape[1]
    step, shift = act.step, act.shift
    for r in prange(h.shape[0]):
        wide_vectors()
        w = row_weight[r]
        dot = acc_zero(row_weight.dtype)
        for i in range(inter):
            gi = widen(g[r, i])
            gate = widen(h[r, i * step])
            if act.gated:
                value, d_gate, d_up = activate_and_grad(gate, widen(h[r, i * step + shift]), act)
                dh[r, i * step] = narrow(gi * w * d_gate, dh.dtype)
                dh[r, i * step + shift] = narrow(gi * w * d_up, dh.dtype)
            else:
                value, d_gate, _ = activate_and_grad(gate, gate, act)
                dh[r, i] = narrow(gi * w * d_gate, dh.dtype)
            a[r, i] = narrow(value, a.dtype)
            dot += gi * value
        d_row[r] = dot
        for n in range(dyp.shape[1]):
            do[r, n] = narrow(widen(dyp[r, n]) * w, do.dtype)
