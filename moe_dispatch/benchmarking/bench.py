"""The benchmark runner behind `moe-dispatch bench` and benchmarks/.

For every preset and token count it builds one routed batch, times each backend and each
peer on it (warm-up outside the timed region, medians), and yields one record per backend
with the peers' times, the work done and the roofline fraction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch

from .. import ops
from .cases import Experts, Inputs, distinct_experts, make_experts, make_inputs, quantized_experts
from .costs import Work, gate_up_width, grouped_mm_work, moe_mlp_work, permute_work, unpermute_work
from .peers import (
    MEASURED_ONLY, OP_PEERS, PeerUnavailable, check_torch_grouped_mm, moe_peer, peer_call,
    torch_gather_permute, torch_gather_unpermute, torch_grouped_mm_fn, training_step,
)
from .presets import Preset
from .roofline import Roofline
from .timing import capture_cuda_graphs, measure_many, median

OPS = tuple(OP_PEERS)


@dataclass
class BenchSpec:
    presets: list
    tokens: list
    dtype: torch.dtype
    backends: list
    peers: list
    device: torch.device
    routing: str = "uniform"
    backward: bool = False
    op: str = "moe_mlp"
    budget_s: float = 0.3  # timed seconds per measurement (at least 3 calls)
    seed: int = 0
    cuda_graph: bool = False  # time replays of a CUDA graph of each call (forward, CUDA only)
    weights: Optional[str] = None  # a quantized format for the backends' experts (moe_mlp); the peers
    # run the same values dequantized to dtype

    def steps(self) -> int:
        """Measurements the run will make (for progress bars)."""
        timed_peers = [p for p in self.peers if p not in MEASURED_ONLY]
        return len(self.presets) * len(self.tokens) * (len(self.backends) + len(timed_peers))


@dataclass
class Batch:
    """One routed batch and what each op needs from it."""

    experts: Experts
    inputs: Inputs
    touched: int
    plan: Optional[object] = None
    xs: Optional[torch.Tensor] = None
    ys: Optional[torch.Tensor] = None


def prepare(spec: BenchSpec, experts: Experts, num_tokens: int) -> Batch:
    inputs = make_inputs(experts.preset, num_tokens, spec.dtype, spec.device, spec.routing, spec.seed)
    batch = Batch(experts, inputs, distinct_experts(inputs.ids))
    if spec.op != "moe_mlp":
        plan = ops.make_plan(inputs.ids, experts.preset.num_experts, backend="torch")
        batch.plan = plan
        batch.xs = ops.permute(inputs.x, plan, backend="torch")
        batch.ys = torch.randn_like(batch.xs)
    return batch


def work_of(spec: BenchSpec, batch: Batch) -> Work:
    preset, t = batch.experts.preset, batch.inputs.num_tokens
    rows = t * preset.top_k
    if spec.op == "moe_mlp":
        stored = batch.experts.expert_bytes() if spec.weights else None
        return moe_mlp_work(preset, t, batch.touched, spec.dtype, spec.backward, stored)
    if spec.op == "grouped_mm":
        return grouped_mm_work(rows, preset.hidden_size, gate_up_width(preset), batch.touched, spec.dtype)
    if spec.op == "permute":
        return permute_work(rows, preset.hidden_size, spec.dtype)
    return unpermute_work(t, rows, preset.hidden_size, spec.dtype)


def _no_grad(fn: Callable[[], object]) -> Callable[[], object]:
    def run():
        with torch.no_grad():
            return fn()

    return run


def backend_call(spec: BenchSpec, batch: Batch, backend: str) -> Callable[[], object]:
    """A no-argument callable running the op once on `backend`, through the public API."""
    x, weights, ids = batch.inputs.x, batch.inputs.weights, batch.inputs.ids
    experts = batch.experts.weights
    if spec.op == "moe_mlp":
        def forward(x, weights, ids):
            return ops.moe_mlp(x, weights, ids, experts, backend=backend)

        if spec.backward:
            return training_step(forward, batch.inputs, batch.experts.trained())
        return _no_grad(lambda: forward(x, weights, ids))
    plan = batch.plan
    if spec.op == "grouped_mm":
        w = experts.w_gate_up.transpose(1, 2)
        return _no_grad(lambda: ops.grouped_mm(batch.xs, w, plan.offsets, backend=backend))
    if spec.op == "permute":
        return _no_grad(lambda: ops.permute(x, plan, backend=backend))
    return _no_grad(lambda: ops.unpermute(batch.ys, plan, weights, backend=backend))


def build_peers(spec: BenchSpec, experts: Experts) -> dict:
    """name -> Peer (moe_mlp) or True (op-level peers that need no state) or the reason it cannot run."""
    built = {}
    for name in spec.peers:
        if name in MEASURED_ONLY:
            continue
        try:
            if spec.op == "moe_mlp":
                built[name] = moe_peer(name, experts, trainable=spec.backward)
            else:
                if name == "torch-grouped-mm":
                    check_torch_grouped_mm(spec.dtype, spec.device)
                built[name] = True
        except PeerUnavailable as exc:
            built[name] = str(exc)
    return built


def op_peer_call(spec: BenchSpec, batch: Batch, name: str, peer) -> Callable[[], object]:
    if spec.op == "moe_mlp":
        return peer_call(peer, batch.inputs, spec.backward)
    plan = batch.plan
    if spec.op == "grouped_mm":
        gmm, w = torch_grouped_mm_fn(), batch.experts.weights.w_gate_up.transpose(1, 2)
        ends = plan.offsets[1:].clone()  # torch's offs: the end of each group, in its own buffer
        return _no_grad(lambda: gmm(batch.xs, w, offs=ends))
    if spec.op == "permute":
        return _no_grad(lambda: torch_gather_permute(batch.inputs.x, plan.token_of_row))
    return _no_grad(lambda: torch_gather_unpermute(batch.ys, plan.row_of_slot, batch.inputs.weights))


def _rate(amount: float, ms: float, unit: float) -> float:
    return amount / (ms / 1e3) / unit if ms > 0 else float("nan")


def make_record(spec: BenchSpec, batch: Batch, work: Work, roofline: Roofline, backend: str, times: list,
                peer_ms: dict) -> dict:
    preset: Preset = batch.experts.preset
    ms = median(times)
    bound_ms, bound_kind = roofline.bound(work, spec.dtype)
    return {
        "op": spec.op, "preset": preset.name, "scale": preset.scale, "num_experts": preset.num_experts,
        "top_k": preset.top_k, "hidden_size": preset.hidden_size, "intermediate_size": preset.intermediate_size,
        "backend": backend, "device": roofline.device, "dtype": str(spec.dtype).removeprefix("torch."),
        "weights": spec.weights,
        "tokens": batch.inputs.num_tokens, "routing": spec.routing, "backward": spec.backward,
        "cuda_graph": spec.cuda_graph,
        "ms": ms, "repeats": len(times), "tokens_per_s": _rate(batch.inputs.num_tokens, ms, 1.0),
        "tflops": _rate(work.flops, ms, 1e12), "gbps": _rate(work.bytes, ms, 1e9),
        "flops": work.flops, "bytes": work.bytes, "experts_touched": batch.touched,
        "bound_ms": bound_ms, "bound": bound_kind, "roofline": bound_ms / ms if ms > 0 else float("nan"),
        "peers": dict(peer_ms),
        "speedup": {name: (p / ms if p is not None and ms > 0 else None) for name, p in peer_ms.items()},
    }


def run_bench(spec: BenchSpec, roofline: Roofline, advance: Callable[[str], None] = lambda label: None,
              warn: Callable[[str], None] = lambda message: None) -> Iterator[dict]:
    """Yield one record per (preset, tokens, backend). The backends and peers of a batch are
    timed in turns (measure_many); interrupting (KeyboardInterrupt) still yields the batch's
    records from the samples taken so far."""
    for preset in spec.presets:
        experts = make_experts(preset, spec.dtype, spec.device, spec.seed, requires_grad=spec.backward)
        peer_experts = experts
        if spec.weights:
            experts, peer_experts = quantized_experts(experts, spec.weights)
        peers = build_peers(spec, peer_experts)
        for name, peer in peers.items():
            if isinstance(peer, str):
                warn(f"{preset.label}: peer {name} skipped: {peer}")
        for num_tokens in spec.tokens:
            batch = prepare(spec, experts, num_tokens)
            work = work_of(spec, batch)
            calls = {backend: backend_call(spec, batch, backend) for backend in spec.backends}
            for name in spec.peers:
                if name not in MEASURED_ONLY and not isinstance(peers[name], str):
                    calls[name] = op_peer_call(spec, batch, name, peers[name])
            times, failed = {}, {}
            try:
                if spec.cuda_graph:
                    calls = capture_cuda_graphs(calls, spec.device, failed=failed)
                measure_many(calls, spec.device, budget_s=spec.budget_s, times=times, failed=failed,
                             on_start=lambda name: advance(f"{preset.label} T={num_tokens} {name}"))
                for name, why in failed.items():
                    warn(f"{preset.label} T={num_tokens}: {name} failed and is left out: {why}")
            finally:  # on Ctrl-C too: what was measured so far
                peer_ms = {name: (roofline.memory_ms(work) if name in MEASURED_ONLY
                                  else median(times[name]) if times.get(name) else None)
                           for name in spec.peers}
                for backend in spec.backends:
                    if times.get(backend):
                        yield make_record(spec, batch, work, roofline, backend, times[backend], peer_ms)
        del experts, peers
        if spec.device.type == "cuda":
            torch.cuda.empty_cache()
