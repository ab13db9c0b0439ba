"""Where the time of one MoE layer goes: each stage timed alone through the public ops.

Stages: route (router GEMM and top-k), plan, permute, GEMM1 + activation, GEMM2, combine,
and the shared experts when the preset has them. The fused moe_mlp of the same backend is
timed too, to show what fusion saves over the sum of the stages.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .. import ops
from ..routing import route as route_logits
from ..activations import activate
from .cases import distinct_experts, make_experts, make_inputs
from .costs import Work, element_size, gate_up_width, grouped_mm_work, permute_work, unpermute_work
from .presets import Preset
from .roofline import Roofline
from .timing import measure, median

Tensor = torch.Tensor


@dataclass
class Stage:
    name: str
    forward: Callable[[], object]
    inputs: tuple  # tensors the backward differentiates with respect to (empty: no backward)
    work: Work


@dataclass
class StageResult:
    name: str
    forward_ms: float
    backward_ms: Optional[float]
    work: Work

    def as_dict(self) -> dict:
        return {"stage": self.name, "forward_ms": self.forward_ms, "backward_ms": self.backward_ms,
                "flops": self.work.flops, "bytes": self.work.bytes}


def _leaf(t: Tensor, grad: bool) -> Tensor:
    return t.detach().requires_grad_(grad)


def build_stages(preset: Preset, num_tokens: int, dtype: torch.dtype, device, backend: str, routing: str,
                 backward: bool, seed: int = 0) -> tuple:
    """(stages, experts, batch, plan): the stages of one forward on a routed batch, each a
    closure over its own inputs, and what the fused moe_mlp needs to run on the same batch."""
    device = torch.device(device)
    experts = make_experts(preset, dtype, device, seed, requires_grad=backward)
    batch = make_inputs(preset, num_tokens, dtype, device, routing, seed)
    e, k, h = preset.num_experts, preset.top_k, preset.hidden_size
    rows, width, size = num_tokens * k, gate_up_width(preset), element_size(dtype)
    touched = distinct_experts(batch.ids)
    w_gate_up, w_down, b_gate_up, b_down = experts.weights.tensors()

    x = _leaf(batch.x, backward)
    router = _leaf(torch.randn(e, h, device=device) / math.sqrt(h), backward)
    bias = torch.zeros(e, device=device) if preset.scoring == "sigmoid" else None

    def route():
        logits = F.linear(x.float(), router)
        return route_logits(logits, k, scoring=preset.scoring, renormalize=preset.renormalize, bias=bias,
                            n_groups=preset.n_groups, topk_groups=preset.topk_groups, scale=preset.routed_scaling,
                            backend=backend)[0]

    route_work = Work(2.0 * num_tokens * e * h, num_tokens * h * size + e * h * 4 + rows * 12)
    plan = ops.make_plan(batch.ids, e, backend=backend)
    plan_work = Work(0.0, rows * 8 + (2 * e + 1) * 4 + 2 * rows * 4, "copy")

    xs = _leaf(ops.permute(batch.x, plan, backend=backend), backward)
    row_expert = plan.expert_of_row()

    def gemm1_act():
        hidden = ops.grouped_mm(xs, w_gate_up.transpose(1, 2), plan.offsets, backend=backend)
        if b_gate_up is not None:
            hidden = hidden + b_gate_up[row_expert]
        return activate(hidden, preset.activation).to(dtype)

    with torch.no_grad():
        a = _leaf(gemm1_act(), backward)

    def gemm2():
        out = ops.grouped_mm(a, w_down.transpose(1, 2), plan.offsets, backend=backend)
        return out + b_down[row_expert] if b_down is not None else out

    with torch.no_grad():
        o = _leaf(gemm2(), backward)
    weights = _leaf(batch.weights, backward)

    def with_bias(*tensors):
        return tuple(t for t in tensors if t is not None)

    stages = [
        Stage("route", route, (x, router), route_work),
        Stage("plan", lambda: ops.make_plan(batch.ids, e, backend=backend), (), plan_work),
        Stage("permute", lambda: ops.permute(x, plan, backend=backend), (x,), permute_work(rows, h, dtype)),
        Stage("gemm1+act", gemm1_act, with_bias(xs, w_gate_up, b_gate_up),
              grouped_mm_work(rows, h, width, touched, dtype) + Work(0.0, rows * (width + width // 2) * size)),
        Stage("gemm2", gemm2, with_bias(a, w_down, b_down),
              grouped_mm_work(rows, preset.intermediate_size, h, touched, dtype)),
        Stage("combine", lambda: ops.unpermute(o, plan, weights, backend=backend), (o, weights),
              unpermute_work(num_tokens, rows, h, dtype)),
    ]
    if preset.n_shared_experts:
        from ..layers import SharedExperts

        shared_width = preset.n_shared_experts * preset.intermediate_size
        shared = SharedExperts(h, shared_width, device=device, dtype=dtype).requires_grad_(backward)
        shared_work = Work(6.0 * num_tokens * h * shared_width,
                           (3 * h * shared_width + 2 * num_tokens * h) * size)
        stages.append(Stage("shared experts", lambda: shared(x), (x, *shared.parameters()), shared_work))
    return stages, experts, batch, plan


def _backward_call(stage: Stage) -> Optional[Callable[[], object]]:
    if not stage.inputs:
        return None
    out = stage.forward()
    grad = torch.randn_like(out)
    return lambda: torch.autograd.grad(out, stage.inputs, grad, retain_graph=True, allow_unused=True)


def time_stages(stages: list, device, backward: bool, budget_s: float = 0.3) -> list:
    results = []
    for stage in stages:
        with torch.no_grad():
            forward_ms = median(measure(stage.forward, device, budget_s=budget_s))
        backward_ms = None
        if backward:
            call = _backward_call(stage)
            backward_ms = median(measure(call, device, budget_s=budget_s)) if call else None
        results.append(StageResult(stage.name, forward_ms, backward_ms, stage.work))
    return results


def fused_ms(experts, batch, plan, backend: str, device, backward: bool, budget_s: float = 0.3) -> float:
    """The same routed experts through the fused ops.moe_mlp, for comparison with the stages."""
    def forward():
        return ops.moe_mlp(batch.x, batch.weights, batch.ids, experts.weights, plan=plan, backend=backend)

    if not backward:
        with torch.no_grad():
            return median(measure(forward, device, budget_s=budget_s))
    grad = torch.randn_like(batch.x)
    trained = experts.trained()
    return median(measure(lambda: torch.autograd.grad(forward(), trained, grad), device, budget_s=budget_s))


def trace(stages: list, path: str, device, backward: bool, repeats: int = 3) -> None:
    """Save a torch.profiler Chrome trace of a few passes, each stage labelled."""
    from torch.profiler import ProfilerActivity, profile, record_function

    device = torch.device(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    backward_calls = {s.name: _backward_call(s) for s in stages} if backward else {}
    for stage in stages:  # warm-up outside the trace
        with torch.no_grad():
            stage.forward()
    with profile(activities=activities) as prof:
        for _ in range(repeats):
            for stage in stages:
                with record_function(f"moe_dispatch.{stage.name}"), torch.no_grad():
                    stage.forward()
            for name, call in backward_calls.items():
                if call is not None:
                    with record_function(f"moe_dispatch.{name}.backward"):
                        call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    prof.export_chrome_trace(path)


def stage_rows(results: list, roofline: Roofline, dtype: torch.dtype) -> list:
    """Per stage: name, ms, share, GB/s, TFLOP/s, roofline fraction (and the backward's ms, share)."""
    total_fwd = sum(r.forward_ms for r in results)
    total_bwd = sum(r.backward_ms or 0.0 for r in results)
    rows = []
    for r in results:
        bound_ms, kind = roofline.bound(r.work, dtype)
        rows.append({
            "stage": r.name, "forward_ms": r.forward_ms, "share": r.forward_ms / total_fwd if total_fwd else 0.0,
            "gbps": r.work.bytes / r.forward_ms / 1e6, "tflops": r.work.flops / r.forward_ms / 1e9,
            "roofline": bound_ms / r.forward_ms, "bound": kind, "backward_ms": r.backward_ms,
            "backward_share": (r.backward_ms / total_bwd) if r.backward_ms and total_bwd else None,
            "flops": r.work.flops, "bytes": r.work.bytes,
        })
    return rows
