"""Ahead-of-time autotuning of the triton backend: every op an MoE layer runs, once per shape,
outside any timed region, with autotuning on, so that the backend persists its choices where
it reads them later (moe_dispatch.backends.triton_tuning.cache_path). `tune` tunes one shape,
`tune_preset` (the `moe-dispatch tune` command) a preset's shape at each token bucket.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .. import ops
from ..experts import ExpertWeights
from .cases import make_experts, make_inputs
from .costs import expert_bytes
from .presets import Preset
from .timing import synchronize

DEFAULT_BUCKETS = (1, 16, 64, 256, 1024, 4096, 8192)


@dataclass
class TuneResult:
    preset: str
    tokens: int
    seconds: float
    status: str  # "tuned" or why it was skipped


def run_every_op(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, experts: ExpertWeights, backward: bool,
                 backend: str) -> None:
    """Each op a layer of these experts runs on this batch, once: the fused experts with their
    plan (and backward if asked), then without one (the decode kernels, up to 16 tokens), then
    the unfused plan, permute, grouped GEMM and unpermute."""
    num_experts = experts.num_experts
    plan = ops.make_plan(ids, num_experts, backend=backend)
    with torch.set_grad_enabled(backward):
        leaf = x.detach().requires_grad_(backward)
        out = ops.moe_mlp(leaf, weights, ids, experts, plan=plan, backend=backend)
        if backward:
            out.backward(torch.randn_like(out))
    with torch.no_grad():
        ops.moe_mlp(x, weights, ids, experts, backend=backend)
        xs = ops.permute(x, plan, backend=backend)
        ys = ops.grouped_mm(xs, experts.tensors()[0].transpose(1, 2), plan.offsets, backend=backend)
        ops.unpermute(ys, plan, weights, backend=backend)
    synchronize(x.device)


def tune(
    num_tokens: int,
    hidden_size: int,
    intermediate_size: int,
    num_experts: int,
    top_k: int,
    *,
    dtype: torch.dtype = torch.bfloat16,
    activation: str = "swiglu",
    bias: bool = False,
    backward: bool = True,
    device: str = "cuda",
) -> Path:
    """Autotune, ahead of time, every kernel an MoE layer of this shape runs; returns the cache file."""
    from ..backends.triton_tuning import cache_path, tuning_asked_for  # triton imports: only when tuning

    preset = Preset("tune", num_experts, top_k, hidden_size, intermediate_size, activation=activation, bias=bias)
    device = torch.device(device)
    with tuning_asked_for():
        experts = make_experts(preset, dtype, device, requires_grad=backward)
        batch = make_inputs(preset, num_tokens, dtype, device)
        run_every_op(batch.x, batch.weights, batch.ids, experts.weights, backward, "triton")
    return cache_path(device)


def tune_preset(preset, tokens: list, dtype: torch.dtype, device, backward: bool,
                step: Callable[[str], None], done: Callable[[TuneResult], None], backend: str = "triton") -> None:
    """run_every_op of `backend` once per token bucket, on the preset's shape."""
    device = torch.device(device)
    try:
        experts = make_experts(preset, dtype, device, requires_grad=backward)
    except torch.cuda.OutOfMemoryError:
        need = preset.num_experts * expert_bytes(preset, dtype) / 2**30
        for t in tokens:
            done(TuneResult(preset.label, t, 0.0, f"skipped: the weights need {need:.1f} GiB"))
        return
    for t in tokens:
        step(f"{preset.label} T={t}")
        start = time.perf_counter()
        batch = make_inputs(preset, t, dtype, device)
        try:
            run_every_op(batch.x, batch.weights, batch.ids, experts.weights, backward, backend)
            status = "tuned"
        except torch.cuda.OutOfMemoryError:
            status = "skipped: out of GPU memory"
        done(TuneResult(preset.label, t, time.perf_counter() - start, status))
    del experts
    if device.type == "cuda":
        torch.cuda.empty_cache()
