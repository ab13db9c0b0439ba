"""Argument checks shared by every public op: each error names the argument and its value.

Value checks that need the data (expert ids in range, offsets consistent) run for CPU
tensors only: on a GPU they would cost a host sync. There the backends guard themselves
(see docs/architecture.md), and MOE_DISPATCH_CHECKS=1 turns the eager checks on.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from .activations import ACTIVATIONS, is_gated
from .plan import DispatchPlan

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
        raise TypeError(f"{name} must be an integer tensor (int32 or int64), got {t.dtype}")


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


def plan(p: DispatchPlan, x_name: str, x: Tensor) -> None:
    if not isinstance(p, DispatchPlan):
        raise TypeError(f"plan must be a DispatchPlan (from make_plan), got {type(p).__name__}")
    same_device(x_name, x, "plan", p.counts)


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


def expert_weights(
    x: Tensor,
    w_gate_up: Tensor,
    w_down: Tensor,
    b_gate_up: Optional[Tensor],
    b_down: Optional[Tensor],
    activation: str,
) -> None:
    choice("activation", activation, ACTIVATIONS)
    floating("w_gate_up", w_gate_up, ndim=3)
    floating("w_down", w_down, ndim=3)
    hidden = x.shape[1]
    num_experts, width, _ = w_gate_up.shape
    inter = width // 2 if is_gated(activation) else width
    if is_gated(activation) and width % 2:
        raise ValueError(f"w_gate_up must have an even dim 1 (gate rows, then up rows) for {activation}, got {width}")
    shape("w_gate_up", w_gate_up, (num_experts, width, hidden))
    shape("w_down", w_down, (num_experts, hidden, inter))
    for name, t in (("w_gate_up", w_gate_up), ("w_down", w_down)):
        same_dtype(name, t, "x", x)
        same_device(name, t, "x", x)
    for name, t, size in (("b_gate_up", b_gate_up, width), ("b_down", b_down, hidden)):
        if t is not None:
            floating(name, t, ndim=2)
            shape(name, t, (num_experts, size))
            same_device(name, t, "x", x)
