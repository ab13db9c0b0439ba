"""Ahead-of-time autotuning of the triton backend: one call of each op per preset and token
bucket, outside any timed region, so the backend's autotuner runs and persists its choice
where the backend reads it later (moe_dispatch.kernels.triton.configs.cache_path)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from .. import ops
from .cases import make_experts, make_inputs
from .costs import expert_bytes
from .timing import synchronize

DEFAULT_BUCKETS = (1, 16, 64, 256, 1024, 4096, 8192)


@dataclass
class TuneResult:
    preset: str
    tokens: int
    seconds: float
    status: str  # "tuned" or why it was skipped


def tune_preset(preset, tokens: list, dtype: torch.dtype, device, backward: bool,
                step: Callable[[str], None], done: Callable[[TuneResult], None], backend: str = "triton") -> None:
    """Run every op of `backend` once per token bucket: the fused experts (and their backward
    if asked), then the unfused plan, permute, grouped GEMM and unpermute."""
    device = torch.device(device)
    try:
        experts = make_experts(preset, dtype, device, requires_grad=backward)
    except torch.cuda.OutOfMemoryError:
        need = preset.num_experts * expert_bytes(preset, dtype) / 2**30
        for t in tokens:
            done(TuneResult(preset.label, t, 0.0, f"skipped: the weights need {need:.1f} GiB"))
        return
    w_gate_up, w_down, b_gate_up, b_down = experts.tensors()
    for t in tokens:
        step(f"{preset.label} T={t}")
        start = time.perf_counter()
        batch = make_inputs(preset, t, dtype, device)
        try:
            with torch.set_grad_enabled(backward):
                x = batch.x.detach().requires_grad_(backward)
                out = ops.moe_mlp(x, batch.weights, batch.ids, w_gate_up, w_down, activation=preset.activation,
                                  b_gate_up=b_gate_up, b_down=b_down, backend=backend)
                if backward:
                    out.backward(torch.randn_like(out))
            with torch.no_grad():
                plan = ops.make_plan(batch.ids, preset.num_experts, backend=backend)
                xs = ops.permute(batch.x, plan, backend=backend)
                ys = ops.grouped_mm(xs, w_gate_up.transpose(1, 2), plan.offsets, backend=backend)
                ops.unpermute(ys, plan, batch.weights, backend=backend)
            synchronize(device)
            status = "tuned"
        except torch.cuda.OutOfMemoryError:
            status = "skipped: out of GPU memory"
        done(TuneResult(preset.label, t, time.perf_counter() - start, status))
    del experts
    if device.type == "cuda":
        torch.cuda.empty_cache()
