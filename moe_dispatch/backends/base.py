"""What a backend provides, and the MoE MLP composed from it.

A backend implements five primitives (make_plan, permute, unpermute, grouped_mm,
grouped_mm_wgrad). The MoE MLP forward and every backward are composed here from those
primitives, so a new backend is correct as soon as its primitives are; a fast backend
overrides the composites with fused kernels that compute the same thing. The MLP's methods
receive the plan as a DispatchPlan and the experts as one ExpertWeights.

Shapes: T tokens, k choices, R = T*k rows, E experts, H hidden, I intermediate.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, NamedTuple, Optional

import torch

from .. import formats
from ..activations import Activation, activate, activate_backward, upcast
from ..formats.quantized import QuantizedWeight, fp8_activation_values, w8a8
from ..plan import DispatchPlan, expert_of_row

if TYPE_CHECKING:
    from ..experts import ExpertWeights

Tensor = torch.Tensor


class ExpertGrads(NamedTuple):
    """moe_mlp's gradients, each in its input's dtype (weights': float32); None for an absent bias."""

    x: Tensor
    weights: Tensor
    w_gate_up: Optional[Tensor]  # None for a weight no gradient reaches (formats.trainable)
    w_down: Optional[Tensor]
    b_gate_up: Optional[Tensor]
    b_down: Optional[Tensor]


class Backend:
    name = "base"
    # True when make_plan itself raises ValueError for an id outside [0, E), before any
    # kernel indexes with it: the ops then skip their own scan of the ids.
    refuses_bad_ids = False
    # The quantized formats (formats/quantized.py) whose packed codes its kernels read; it
    # computes every other format on the dequantized values.
    native_formats: tuple[str, ...] = ()

    def unavailable_reason(self, device: torch.device) -> Optional[str]:
        """None when this backend can run on `device`, else why it cannot."""
        return None

    # ---- primitives ------------------------------------------------------------------
    def make_plan(self, ids: Tensor, num_experts: int) -> DispatchPlan:
        """ids: [T, k] int -> the DispatchPlan (int32 tensors) of ids."""
        raise NotImplementedError

    def permute(self, x: Tensor, token_of_row: Tensor) -> Tensor:
        """x: [T, H] -> [R, H], row r = x[token_of_row[r]]."""
        raise NotImplementedError

    def unpermute(self, ys: Tensor, row_of_slot: Tensor, weights: Optional[Tensor]) -> Tensor:
        """ys: [R, N] -> [T, N], y[t] = sum_j weights[t, j] * ys[row_of_slot[t, j]], float32 sums."""
        raise NotImplementedError

    def grouped_mm(self, a: Tensor, w: Tensor, offsets: Tensor, bias: Optional[Tensor] = None) -> Tensor:
        """a: [R, K], w: [E, K, N] (any strides), bias: [E, N] -> [R, N]; rows of expert e use w[e]."""
        raise NotImplementedError

    def grouped_mm_wgrad(self, a: Tensor, b: Tensor, offsets: Tensor, num_experts: int) -> Tensor:
        """a: [R, M], b: [R, N] -> [E, M, N], out[e] = a[rows of e].T @ b[rows of e] (0 if no rows)."""
        raise NotImplementedError

    def grouped_mm_quantized(self, a: Tensor, w: QuantizedWeight, offsets: Tensor, transposed: bool) -> Tensor:
        """grouped_mm with a quantized weight w [E, N, K]: a [R, K] -> [R, N] by w[e].T
        (transposed, the forward), or a [R, N] -> [R, K] by w[e] (its input's gradient). Each
        expert with rows is dequantized on its own, never all at once; the offsets are read
        on the host (a sync on GPUs). A w8a8 weight's forward product is w8a8_mm's."""
        if transposed and w8a8(w):
            return w8a8_mm(a, w, offsets)
        out = a.new_empty(a.shape[0], w.shape[2] if not transposed else w.shape[1])
        bounds = offsets.tolist()
        for e, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
            if start < end:
                matrix = w[e].dequantize(a.dtype)[0]
                out[start:end] = a[start:end] @ (matrix.T if transposed else matrix)
        return out

    def moe_mlp_from_ids(self, x: Tensor, weights: Tensor, ids: Tensor, experts: ExpertWeights) -> Optional[Tensor]:
        """moe_mlp's output from the ids, plan included, for a call that needs neither the plan
        nor autograd; None when this backend has no such one-step path for the call, and the
        caller then makes the plan and calls moe_mlp. A small batch's fixed costs are what
        one step saves. Ids outside [0, E) raise ValueError, as in make_plan."""
        return None

    def routed_decode(self, x: Tensor, router: Tensor, top_k: int, experts: ExpertWeights,
                      **route_options) -> Optional[Callable[[Tensor], Optional[Tensor]]]:
        """A layer's decode step, prepared once for activations of x's dtype and device: a
        function of x [T, H] that returns moe_mlp_from_ids's output for the ids and weights
        that routing.route (with route_options: its keyword arguments but backend) gives the
        logits x.float() @ router.T (router [E, H] float32; exactly equal scores in any order,
        as torch.topk), the routing in the same call, or None where that call takes no such
        step (the caller then routes and calls moe_mlp). None where this backend has no such
        path for these experts. The function keeps what it derives from router and experts:
        the caller prepares a new one when they change."""
        return None

    def warm_up_tokens(self, x: Tensor, experts: Optional[ExpertWeights], top_k: int, max_tokens: int) -> list[int]:
        """The numbers of tokens up to max_tokens at which warm_up runs a layer of these experts
        (None: experts composed from the ops) on activations of x's dtype, each expert given
        the same rows: every kernel that a call of up to max_tokens may compile or tune runs at
        one of them. The powers of two here."""
        return [1 << i for i in range(max_tokens.bit_length())]

    # ---- composites ------------------------------------------------------------------
    def unpermute_backward(
        self, dy: Tensor, ys: Tensor, token_of_row: Tensor, row_of_slot: Tensor, weights: Optional[Tensor]
    ) -> tuple[Tensor, Optional[Tensor]]:
        """(d ys [R, N], d weights [T, k] float32 or None)."""
        dys = self.permute(dy, token_of_row)
        if weights is None:
            return dys, None
        w_row = row_weights(weights, row_of_slot)
        dweights = (upcast(dys) * upcast(ys)).sum(-1)[row_of_slot.long()]
        return (upcast(dys) * w_row[:, None]).to(dys.dtype), dweights

    def moe_mlp(
        self, x: Tensor, weights: Tensor, plan: DispatchPlan, experts: ExpertWeights, save_for_backward: bool
    ) -> tuple[Tensor, Tensor]:
        """The routed expert MLP: (out [T, H], h [R, 2I or I], or [0, ...] unless saved).

        h is GEMM1's output before the activation, the one tensor the backward keeps; its
        column order is the backend's own (what its moe_mlp_backward reads).
        """
        xs = self.permute(x, plan.token_of_row)
        h = self._experts_mm(xs, experts.w_gate_up, plan.offsets, experts.b_gate_up)
        a = activate(h, experts.activation, experts.interleaved).to(x.dtype)
        o = self._experts_mm(a, experts.w_down, plan.offsets, experts.b_down)
        out = self.unpermute(o, plan.row_of_slot, weights)
        return out, (h if save_for_backward else h[:0])

    def _experts_mm(self, a: Tensor, w, offsets: Tensor, bias: Optional[Tensor]) -> Tensor:
        """a [R, K] @ w[e].T + bias[e] over each expert's rows, w [E, N, K] any weight: a w8a8
        one by w8a8_mm, any other on its dense values."""
        if w8a8(w):
            return w8a8_mm(a, w, offsets, bias)
        return self.grouped_mm(a, formats.dense(w).transpose(1, 2), offsets, bias)

    def moe_mlp_backward(
        self, dy: Tensor, x: Tensor, weights: Tensor, plan: DispatchPlan, experts: ExpertWeights, h: Tensor
    ) -> ExpertGrads:
        """moe_mlp's gradients.

        With o_r = a_r @ w_down[e].T + b_down[e] and g_r = dy[t] @ w_down[e], the routing
        weight's gradient is g_r . a_r + dy[t] . b_down[e], so GEMM2 is never recomputed.
        """
        w_gate_up, w_down, b_gate_up, b_down = experts.tensors()
        offsets, token_of_row, row_of_slot = plan.offsets, plan.token_of_row, plan.row_of_slot
        dyp = self.permute(dy, token_of_row)
        g = self.grouped_mm(dyp, w_down, offsets)
        a, d_row, dh, do = self.moe_mlp_backward_rows(h, g, dyp, row_weights(weights, row_of_slot),
                                                      experts.activation, experts.interleaved)
        if b_down is not None:
            d_row += (upcast(dyp) * upcast(b_down)[expert_of_row(offsets, dyp.shape[0])]).sum(-1)
        dweights = d_row[row_of_slot.long()]

        trains_down, trains_gate_up = (formats.trainable(w) for w in (experts.w_down, experts.w_gate_up))
        dw_down = self.grouped_mm_wgrad(do, a, offsets, experts.num_experts) if trains_down else None
        db_down = expert_sums(do, offsets) if b_down is not None else None

        xs = self.permute(x, token_of_row) if trains_gate_up else None
        dw_gate_up = self.grouped_mm_wgrad(dh, xs, offsets, experts.num_experts) if trains_gate_up else None
        db_gate_up = expert_sums(dh, offsets) if b_gate_up is not None else None
        dx = self.unpermute(self.grouped_mm(dh, w_gate_up, offsets), row_of_slot, None)
        return ExpertGrads(dx, dweights, dw_gate_up, dw_down, db_gate_up, db_down)

    def moe_mlp_backward_rows(
        self, h: Tensor, g: Tensor, dyp: Tensor, w_row: Tensor, activation: Activation, interleaved: bool = False
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The row-wise middle of moe_mlp's backward, for h [R, 2I or I] (GEMM1's output, gate
        and up columns alternating when interleaved), g [R, I] = dy @ w_down[e] per row, dyp
        [R, H] (dy in expert order) and the routing weights w_row [R] (float32):
        (a = act(h), d_row = g . act(h) (float32), dh = d act(h) against g * w_row, do = dyp * w_row),
        a, dh and do in dyp's dtype, everything computed in float32."""
        g, w_row = upcast(g), w_row[:, None]
        a = activate(h, activation, interleaved)
        d_row = (g * a).sum(-1)
        dh = activate_backward(h, g * w_row, activation, interleaved).to(dyp.dtype)
        do = (upcast(dyp) * w_row).to(dyp.dtype)
        return a.to(dyp.dtype), d_row, dh, do


def w8a8_mm(a: Tensor, w: QuantizedWeight, offsets: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """The definition of a w8a8 product, a [R, K] @ w[e].T (+ bias[e]) over each expert's rows
    -> [R, N] in a's dtype: a's rows quantized per 128 columns (fp8_activation_values), multiplied
    by w[e]'s dequantized float32 values in float32, the bias added, rounded once. One expert is
    dequantized at a time; the offsets are read on the host (a sync on GPUs)."""
    values = fp8_activation_values(a)
    out = a.new_empty(a.shape[0], w.shape[1])
    bounds = offsets.tolist()
    for e, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        if start < end:
            y = values[start:end] @ w[e].dequantize(torch.float32)[0].T
            out[start:end] = y if bias is None else y + upcast(bias[e])
    return out


def row_weights(weights: Tensor, row_of_slot: Tensor) -> Tensor:
    """The routing weight of each row, float32 [R]: w_row[row_of_slot[t, j]] = weights[t, j]."""
    w_row = upcast(weights).new_empty(row_of_slot.numel())
    w_row[row_of_slot.reshape(-1).long()] = upcast(weights).reshape(-1)
    return w_row


def expert_sums(rows: Tensor, offsets: Tensor) -> Tensor:
    """float32 [E, N]: the sum of each expert's rows (bias gradients)."""
    return torch.segment_reduce(upcast(rows), "sum", offsets=offsets.long(), axis=0, initial=0.0)
