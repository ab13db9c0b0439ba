"""Argument checks shared by every public op: each error names the argument and its value.

Value checks that need the data (expert ids in range, offsets consistent) run for CPU
tensors only: on a GPU they would cost a host sync. There the backends guard themselves
(see docs/architecture.md), and MOE_DISPATCH_CHECKS=1 turns the eager checks on.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from .plan import DispatchPlan, expert_of_row

Tensor = torch.Tensor
_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _describe(t: Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def value_checks_enabled(t: Tensor) -> bool:
    if torch.compiler.is_compiling():
        return False
    return t.device.type == "cpu" or os.environ.get("MOE_DISPATCH_CHECKS", "0") == "1"


def tensor(name: str, t, ndim: Optional[int] = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got {_describe(t)}")


def floating(name: str, t: Tensor, ndim: Optional[int] = None) -> None:
    tensor(name, t, ndim)
    if t.dtype not in _FLOATS:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {t.dtype}")


def integer(name: str, t: Tensor, ndim: Optional[int] = None) -> None:
    tensor(name, t, ndim)
    if t.dtype not in (torch.int32, torch.int64, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"{name} must be an integer tensor (int64, int32, int16, int8 or uint8), got {t.dtype}")


def positive_int(name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def same_device(name: str, t: Tensor, ref_name: str, ref: Tensor) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")


def same_dtype(name: str, t: Tensor, ref_name: str, ref: Tensor) -> None:
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has dtype {ref.dtype}")


def shape(name: str, t: Tensor, expected: tuple) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)}, got {_describe(t)}")


def choice(name: str, value, options) -> None:
    if value not in options:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, options))}; got {value!r}")


def expert_ids(ids: Tensor, num_experts: int) -> None:
    integer("ids", ids, ndim=2)
    positive_int("num_experts", num_experts)


def expert_id_values(ids: Tensor, num_experts: int) -> None:
    """Every id in [0, num_experts) (a scan of the data: CPU, or MOE_DISPATCH_CHECKS=1)."""
    if ids.numel() and value_checks_enabled(ids):
        low, high = (int(v) for v in torch.aminmax(ids))
        if low < 0 or high >= num_experts:
            bad = low if low < 0 else high
            raise ValueError(f"ids must lie in [0, {num_experts}): found expert id {bad}")


def routing_groups(num_experts: int, top_k: int, n_groups: Optional[int], topk_groups: Optional[int]) -> None:
    """DeepSeek-V3's group-limited routing: n_groups divides E and keeps at least top_k experts."""
    if (n_groups is None) != (topk_groups is None):
        raise ValueError(f"n_groups and topk_groups go together; got n_groups={n_groups}, topk_groups={topk_groups}")
    if n_groups is None:
        return
    positive_int("n_groups", n_groups)
    positive_int("topk_groups", topk_groups)
    if num_experts % n_groups:
        raise ValueError(f"n_groups={n_groups} must divide the number of experts E={num_experts}")
    if topk_groups > n_groups:
        raise ValueError(f"topk_groups={topk_groups} exceeds n_groups={n_groups}")
    if top_k > topk_groups * (num_experts // n_groups):
        raise ValueError(
            f"top_k={top_k} exceeds the {topk_groups * (num_experts // n_groups)} experts "
            f"in topk_groups={topk_groups} groups"
        )


def plan(p: DispatchPlan, x_name: str, x: Tensor) -> None:
    if not isinstance(p, DispatchPlan):
        raise TypeError(f"plan must be a DispatchPlan (from make_plan), got {type(p).__name__}")
    same_device(x_name, x, "plan", p.counts)


def _in_range(name: str, values: Tensor, end: int) -> None:
    low, high = (int(v) for v in torch.aminmax(values))
    if low < 0 or high >= end:
        raise ValueError(f"{name} must lie in [0, {end}); got values from {low} to {high}")


def plan_values(p: DispatchPlan, ids: Optional[Tensor] = None) -> None:
    """p is a plan make_plan could have made (of ids, when given): a scan of the data, for CPU
    tensors or MOE_DISPATCH_CHECKS=1. A stale or hand-made plan would otherwise give a wrong
    answer without an error."""
    if not value_checks_enabled(p.row_of_slot):
        return
    num_rows, num_tokens, device = p.num_rows, p.num_tokens, p.row_of_slot.device
    if p.row_of_slot.dim() != 2 or p.row_of_slot.numel() != num_rows or p.offsets.shape != (p.num_experts + 1,):
        raise ValueError(f"plan's fields disagree: counts {tuple(p.counts.shape)}, offsets {tuple(p.offsets.shape)}, "
                         f"token_of_row {tuple(p.token_of_row.shape)}, row_of_slot {tuple(p.row_of_slot.shape)}")
    bounds = p.offsets.long()
    if int(bounds[0]) != 0 or not torch.equal(bounds.diff(), p.counts.long()) or int(bounds[-1]) != num_rows:
        raise ValueError(f"plan.offsets must rise from 0 to {num_rows} by plan.counts; "
                         f"got offsets {bounds.tolist()} and counts {p.counts.tolist()}")
    if not num_rows:
        return
    rows, tokens = p.row_of_slot.reshape(-1).long(), p.token_of_row.long()
    _in_range("plan.row_of_slot", rows, num_rows)
    _in_range("plan.token_of_row", tokens, num_tokens)
    if bool((torch.bincount(rows, minlength=num_rows) != 1).any()):
        raise ValueError("plan.row_of_slot must send every slot to a row of its own; some row takes two slots")
    slot_tokens = torch.arange(num_tokens, device=device).repeat_interleave(p.top_k)
    if not torch.equal(tokens[rows], slot_tokens):
        raise ValueError("plan.token_of_row must invert plan.row_of_slot: token_of_row[row_of_slot[t, j]] == t")
    if ids is None:
        return
    owner = expert_of_row(bounds, num_rows)
    mismatch = (owner[rows] != ids.reshape(-1).long()).nonzero()
    if mismatch.numel():
        t, j = divmod(int(mismatch[0]), p.top_k)
        raise ValueError(f"plan is not the plan of ids: ids[{t}, {j}] = {int(ids[t, j])} but the plan sends "
                         f"that slot to expert {int(owner[rows[t * p.top_k + j]])} (a plan of other ids?)")


def offsets(offs: Tensor, num_rows: int, num_experts: int, device: torch.device) -> None:
    integer("offsets", offs, ndim=1)
    shape("offsets", offs, (num_experts + 1,))
    if offs.device != device:
        raise ValueError(f"offsets is on {offs.device} but the rows are on {device}")
    if value_checks_enabled(offs):
        first, last = int(offs[0]), int(offs[-1])
        if first != 0 or last != num_rows or bool((offs[1:] < offs[:-1]).any()):
            raise ValueError(
                f"offsets must rise from 0 to the number of rows ({num_rows}); got {offs.tolist()}"
            )


def expert_weights(experts) -> None:
    """The shapes of an ExpertWeights agree: w_gate_up [E, W, H] with W = 2I gated or I,
    w_down [E, H, I], b_gate_up [E, W] and b_down [E, H], everything on one device."""
    choice("interleaved", experts.interleaved, (False, True))
    for name in ("w_gate_up", "w_down"):
        w = getattr(experts, name)
        if isinstance(w, torch.Tensor):
            floating(name, w, ndim=3)
        elif len(getattr(w, "shape", ())) != 3 or not hasattr(w, "dense"):
            raise TypeError(f"{name} must be a 3-D float tensor or a stored weight format; got {type(w).__name__}")
    w_gate_up, w_down, gated = experts.w_gate_up, experts.w_down, experts.activation.gated
    num_experts, width, hidden = w_gate_up.shape
    if gated and width % 2:
        raise ValueError(f"w_gate_up must have an even dim 1 (gate and up rows) for {experts.activation.name}, "
                         f"got {width}")
    shape("w_down", w_down, (num_experts, hidden, width // 2 if gated else width))
    same_device("w_down", w_down, "w_gate_up", w_gate_up)
    for name, t, size in (("b_gate_up", experts.b_gate_up, width), ("b_down", experts.b_down, hidden)):
        if t is not None:
            floating(name, t, ndim=2)
            shape(name, t, (num_experts, size))
            same_device(name, t, "w_gate_up", w_gate_up)


def experts_take(x: Tensor, experts) -> None:
    """x [T, H] is what the experts take: H their hidden size, and their weights of x's dtype
    and device (or a format that multiplies such activations)."""
    if x.shape[1] != experts.hidden_size:
        raise ValueError(f"w_gate_up must be [E, W, H={x.shape[1]}] to match x [T, H]; got w_gate_up of shape "
                         f"{tuple(experts.w_gate_up.shape)}")
    weight("w_gate_up", experts.w_gate_up, x)
    weight("w_down", experts.w_down, x)
    if experts.b_gate_up is not None:
        same_device("b_gate_up", experts.b_gate_up, "x", x)


def weight(name: str, w, x: Tensor) -> None:
    """w can multiply the activations x: a 3-D float tensor of x's dtype and device, or a
    stored format (moe_dispatch.formats) whose own check says it can."""
    if not isinstance(w, torch.Tensor):
        w.check(name, x)
        return
    floating(name, w, ndim=3)
    same_dtype(name, w, "x", x)
    same_device(name, w, "x", x)
