"""The Triton backend: sync-free GPU kernels with the MoE fusions (see docs/gpu.md).

Nothing here reads a tensor's values on the host: grids come from shapes, tiles find
their expert on the device, so the whole layer (plan, forward, backward) runs without a
host sync and can be captured in a CUDA graph. With TRITON_INTERPRET=1 (set before this
module is imported) the same kernels run on CPU tensors, which is how CI tests them.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton

from .. import formats
from .. import validation as check
from ..experts import ExpertWeights
from ..formats.quantized import QuantizedWeight, w8a8
from ..kernels.triton import decode
from ..kernels.triton import grouped_gemm as gemm
from ..kernels.triton import permute as move
from ..kernels.triton import plan as plan_kernels
from ..kernels.triton import wgrad
from ..kernels.triton.fp8_rows import Fp8Rows, quantize_rows
from ..kernels.triton.quantized import FORMAT_CODES, format_tag, kernel_reads
from ..plan import DispatchPlan
from .base import Backend, ExpertGrads
from .triton_tuning import (
    TUNER, act_backward_candidates, decode_candidates, dtype_tag, gemm_candidates, shape_bucket, w8a8_tiles,
    wgrad_candidates,
)

Tensor = torch.Tensor
_BAD_IDS = (
    "moe_dispatch: an expert id outside [0, num_experts) reached the triton backend; "
    "its slots were skipped. Run with MOE_DISPATCH_CHECKS=1 to raise a ValueError naming the id."
)


def _kernels_interpreted() -> bool:
    return isinstance(plan_kernels.plan_count_kernel, triton.runtime.interpreter.InterpretedFunction)


def kernel_weight(w: formats.Weight):
    """w [E, N, K] as the kernels take it: a quantized weight as it is (its codes are read and
    dequantized in registers), any other as its float values."""
    return w if isinstance(w, QuantizedWeight) and kernel_reads(w) else formats.dense(w)


def kernel_weights(experts: ExpertWeights) -> tuple:
    """(w_gate_up, w_down, b_gate_up, b_down) with the weights as kernel_weight gives them."""
    return kernel_weight(experts.w_gate_up), kernel_weight(experts.w_down), experts.b_gate_up, experts.b_down


class TritonBackend(Backend):
    name = "triton"
    native_formats = tuple(FORMAT_CODES)

    def unavailable_reason(self, device: torch.device) -> Optional[str]:
        if device.type == "cuda":
            return None
        if device.type != "cpu":
            return f"triton runs on CUDA devices (or CPU under TRITON_INTERPRET=1), not {device.type}"
        if os.environ.get("TRITON_INTERPRET") != "1":
            return "CPU tensors need the Triton interpreter: set TRITON_INTERPRET=1 before importing moe_dispatch"
        if not _kernels_interpreted():
            return "TRITON_INTERPRET=1 was set after the triton kernels were loaded; set it before importing"
        return None

    def warm_up_tokens(self, x, experts, top_k, max_tokens):
        """Each power of two (a tuning bucket) and the odd count after it: Triton compiles a
        kernel again for an integer argument (the rows, the tiles) divisible by 16 or not."""
        powers = super().warm_up_tokens(x, experts, top_k, max_tokens)
        return sorted({*powers, *(t + 1 for t in powers if t < max_tokens)})

    # ---- primitives ------------------------------------------------------------------
    def make_plan(self, ids: Tensor, num_experts: int) -> DispatchPlan:
        counts, offsets, token_of_row, row_of_slot, all_placed = plan_kernels.make_plan(ids, num_experts)
        if ids.is_cuda:
            torch._assert_async(all_placed, _BAD_IDS)  # a slot not placed had a bad id; fails at the next sync
        return DispatchPlan(counts, offsets, token_of_row, row_of_slot)

    def permute(self, x: Tensor, token_of_row: Tensor) -> Tensor:
        return move.gather_rows(x, token_of_row)

    def unpermute(self, ys: Tensor, row_of_slot: Tensor, weights: Optional[Tensor]) -> Tensor:
        return move.combine(ys, row_of_slot, weights)

    def grouped_mm(self, a: Tensor, w: Tensor, offsets: Tensor, bias: Optional[Tensor] = None) -> Tensor:
        return _gemm("mm", a, w, offsets, bias=bias)[0]

    def grouped_mm_wgrad(self, a: Tensor, b: Tensor, offsets: Tensor, num_experts: int) -> Tensor:
        return _wgrad(a, b, offsets, num_experts)

    def grouped_mm_quantized(self, a: Tensor, w: QuantizedWeight, offsets: Tensor, transposed: bool) -> Tensor:
        """The grouped GEMM on w's codes: by w[e].T (q.mT, transposed) or by w[e]; no host sync.
        A w8a8 weight's forward product takes a quantized (fp8_rows)."""
        if transposed and w8a8(w):
            return _gemm("mm", quantize_rows(a), w.mT, offsets)[0]
        w = kernel_weight(w)
        return _gemm("mm", a, w.mT if transposed else w, offsets)[0]

    # ---- fused composites ------------------------------------------------------------
    def unpermute_backward(self, dy, ys, token_of_row, row_of_slot, weights):
        if weights is None:
            return move.gather_rows(dy, token_of_row), None
        return move.combine_backward(dy, ys, row_of_slot, weights)

    def moe_mlp(self, x, weights, plan, experts, save_for_backward):
        """GEMM1 gathers x's rows and applies the activation; GEMM2 scales by the routing
        weight and scatters to slot order; a fixed-order float32 sum over k combines. A w8a8
        weight's input is quantized first (fp8_rows): x's T rows, which GEMM1 gathers as it
        would x's."""
        w_gate_up, w_down, b_gate_up, b_down = kernel_weights(experts)
        slot_of_row, weight_of_row = move.invert_rows(plan.row_of_slot, weights)
        act, h = _gemm(
            "up", _input(x, w_gate_up), w_gate_up.mT, plan.offsets, bias=b_gate_up, a_rows=plan.token_of_row,
            activation=experts.activation, gate_columns=experts.gate_up_columns, store_h=save_for_backward,
        )
        slots, _ = _gemm(
            "down", _input(act, w_down), w_down.mT, plan.offsets, bias=b_down, slot_of_row=slot_of_row,
            weight_of_row=weight_of_row,
        )
        out = move.combine(slots, plan.row_of_slot, None, slot_major=True)
        return out, (h if save_for_backward else x.new_empty(0, w_gate_up.shape[1]))

    def moe_mlp_from_ids(self, x, weights, ids, experts):
        """The decode forward, up to decode.MAX_TOKENS tokens: two kernels, no plan. Weight-only:
        w8a8 experts take the planned path (a decode step is bound by the weights' bytes, which
        w8a8 does not change)."""
        w_gate_up, w_down, b_gate_up, b_down = kernel_weights(experts)
        num_experts, activation = experts.num_experts, experts.activation
        if not 0 < x.shape[0] <= decode.MAX_TOKENS or 0 in w_down.shape or experts.quantizes_activations:
            return None
        check.expert_id_values(ids, num_experts)  # CPU, or MOE_DISPATCH_CHECKS=1: a ValueError naming the id
        w1, w2 = w_gate_up.mT, w_down.mT
        key = _key(f"dec_up:{_fusion_flags(experts, b_gate_up)}{_format_flag(w1)}", x, num_experts, x.shape[0],
                   w1.shape[1], w1.shape[2])
        act, routes, ok = TUNER.run(
            key,
            lambda: decode_candidates(w_down.shape[2], min(ids.numel(), num_experts), activation.gated, x.dtype,
                                      x.device),
            lambda config: decode.decode_up(x, ids, weights, w1, b_gate_up, activation, experts.gate_up_columns,
                                            config),
            x.device,
        )
        if ids.is_cuda:
            torch._assert_async(ok, _BAD_IDS)  # a bad id's slot was skipped; fails at the next sync
        key = _key(f"dec_down:{'b' if b_down is not None else ''}{_format_flag(w2)}", x, num_experts, x.shape[0],
                   *w2.shape[1:])
        return TUNER.run(
            key,
            lambda: decode_candidates(w2.shape[2], 1, False, x.dtype, x.device),
            lambda config: decode.decode_down(act, ids, routes, w2, b_down, config),
            x.device,
        )

    def moe_mlp_backward(self, dy, x, weights, plan, experts, h):
        w_gate_up, w_down, b_gate_up, b_down = kernel_weights(experts)
        offsets, token_of_row, row_of_slot = plan.offsets, plan.token_of_row, plan.row_of_slot
        num_experts = experts.num_experts
        slot_of_row, weight_of_row = move.invert_rows(row_of_slot, weights)
        key = _key(f"act_bwd:{_fusion_flags(experts)}{_format_flag(w_down)}", dy, num_experts, plan.num_rows,
                   w_down.shape[1], w_down.shape[2])
        dh, act, dweights = TUNER.run(
            key,
            lambda: act_backward_candidates(plan.num_rows, num_experts, dy.dtype, dy.device),
            lambda config: gemm.grouped_gemm_act_backward(
                dy, token_of_row, w_down, b_down, offsets, h, weight_of_row, row_of_slot, experts.activation,
                experts.gate_up_columns, config,
            ),
            dy.device,
        )
        # d w_down[e] = (weight * dy[token]).T @ act(h), over e's rows; none for a frozen (quantized) weight
        dw_down = (_wgrad(dy, act, offsets, num_experts, a_rows=token_of_row, a_scale=weight_of_row)
                   if formats.trainable(experts.w_down) else None)
        db_down = (
            wgrad.expert_sums(dy, offsets, num_experts, rows=token_of_row, scale=weight_of_row)
            if b_down is not None else None
        )
        dw_gate_up = (_wgrad(dh, x, offsets, num_experts, b_rows=token_of_row)
                      if formats.trainable(experts.w_gate_up) else None)
        db_gate_up = wgrad.expert_sums(dh, offsets, num_experts) if b_gate_up is not None else None
        dx_slots, _ = _gemm("dx", dh, w_gate_up, offsets, slot_of_row=slot_of_row)
        dx = move.combine(dx_slots, row_of_slot, None, slot_major=True)
        return ExpertGrads(dx, dweights, dw_gate_up, dw_down, db_gate_up, db_down)


# ---- tuned launches ----------------------------------------------------------------------


# The fusions that make a GEMM's tuning key (with "g" gated and "i" interleaved gate and up columns first).
_FUSION_CODES = {"store_h": "h", "slot_of_row": "s", "bias": "b", "a_rows": "a"}


def _fusion_flags(experts: ExpertWeights, bias: Optional[Tensor] = None) -> str:
    """The part of a tuning key that names an activation's fusion: its epilogue and operands differ."""
    activation = experts.activation
    return ("g" if activation.gated else "") + ("i" if experts.interleaved and activation.gated else "") + (
        "b" if bias is not None else "")


def _input(a: Tensor, w):
    """A GEMM's input a for the weight w: quantized (fp8_rows) when w is w8a8, else a itself."""
    return quantize_rows(a) if w8a8(w) else a


def _format_flag(w) -> str:
    """The part of a tuning key that names a quantized weight's format (quantized.format_tag)."""
    tag = format_tag(w)
    return f"@{tag}" if tag else ""


def _key(kind: str, t: Tensor, num_experts: int, num_rows: int, k_dim: int, n_cols: int) -> str:
    return f"{kind}|{dtype_tag(t.dtype, t.device)}|E{num_experts}|R{shape_bucket(num_rows)}|K{k_dim}|N{n_cols}"


def _gemm(kind: str, a, w, offsets: Tensor, **fusions):
    """gemm.grouped_gemm, tuned; w: [E, K, N] float, or a quantized weight read as one (q.mT or q);
    a: a tensor, or an Fp8Rows for a w8a8 weight's product."""
    num_rows = fusions["a_rows"].shape[0] if fusions.get("a_rows") is not None else a.shape[0]
    num_experts, k_dim, n_cols = w.shape
    activation = fusions.get("activation")
    gated = activation is not None and activation.gated
    used = {name for name, value in fusions.items() if value is not None and value is not False}
    step = fusions.get("gate_columns", (1, 0))[0]
    flags = ("g" if gated else "") + ("i" if step == 2 else "") + "".join(
        code for name, code in _FUSION_CODES.items() if name in used) + _format_flag(w)
    w8a8_input = isinstance(a, Fp8Rows)
    key = _key(f"{kind}:{flags}{'@w8a8' if w8a8_input else ''}", a, num_experts, num_rows, k_dim, n_cols)
    n_out = n_cols // 2 if gated else n_cols

    def candidates():  # TMA candidates only for weights the TMA can read (else they repeat another)
        # w8a8 multiplies 8-bit codes on the tensor cores whatever the activations' dtype: the
        # 16-bit tiles fit its operands with room to spare
        if w8a8_input:
            found = w8a8_tiles(gemm_candidates(num_rows, num_experts, k_dim, n_out, gated, torch.float16, a.device),
                               gated)
        else:
            found = gemm_candidates(num_rows, num_experts, k_dim, n_out, gated, a.dtype, a.device)
        return found if gemm.tma_can_read(w, step) else [c for c in found if not c.tma]

    return TUNER.run(key, candidates, lambda config: gemm.grouped_gemm(a, w, offsets, config, **fusions), a.device)


def _wgrad(a: Tensor, b: Tensor, offsets: Tensor, num_experts: int, **fusions) -> Tensor:
    rows = fusions.get("a_rows")
    num_rows = rows.shape[0] if rows is not None else a.shape[0]
    key = _key("wgrad", a, num_experts, num_rows, a.shape[1], b.shape[1])
    return TUNER.run(
        key,
        lambda: wgrad_candidates(a.dtype, a.device),
        lambda config: wgrad.grouped_wgrad(a, b, offsets, num_experts, config, **fusions),
        a.device,
    )
