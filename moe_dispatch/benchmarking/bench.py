"""The benchmark runner behind `moe-dispatch bench` and benchmarks/.

For every preset it builds the experts once (in a quantized format: directly, expert by
expert, never as float weights), then for every op and token count one routed batch; it
times each backend and each peer on it (warm-up outside the timed region, medians), and
yields one record per backend with the peers' times, the work done and the roofline fraction.
The ops: moe_mlp (the routed experts), layer (the whole MoE layer: router, routing, routed
and shared experts) or one of grouped_mm, permute, unpermute.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Union

import torch

from .. import ops
from ..layers import MoE
from .cases import (
    Experts, Inputs, dequantized, distinct_experts, make_experts, make_inputs, make_layer, quantized_experts,
)
from .costs import (
    Work, dense_bytes, gate_up_width, grouped_mm_work, layer_work, moe_mlp_work, permute_work, unpermute_work,
)
from .memory import fits_in_memory, peak_resident_memory, reset_peak_memory, resident_memory
from .peers import (
    FLOAT_PEERS, MEASURED_ONLY, OP_PEERS, PeerUnavailable, check_torch_grouped_mm, moe_peer, peer_call,
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
    ops: tuple = ("moe_mlp",)  # each timed in a table of its own, on the same experts
    budget_s: float = 0.3  # timed seconds per measurement (at least 3 calls)
    seed: int = 0
    cuda_graph: bool = False  # time replays of a CUDA graph of each call (forward, CUDA only)
    weights: Optional[str] = None  # a quantized format for the backends' experts (moe_mlp, layer); the
    # peers run the same values dequantized to dtype, where they fit in memory
    precision: str = "weight-only"  # the quantized experts' (QuantizedWeight.precision): "w8a8" for fp8

    def peers_of(self, op: str) -> list:
        """The peers asked for that run alongside op."""
        return [p for p in self.peers if p in OP_PEERS[op]]

    def steps(self) -> int:
        """Measurements the run will make (for progress bars)."""
        timed = sum(len(self.backends) + len([p for p in self.peers_of(op) if p not in MEASURED_ONLY])
                    for op in self.ops)
        return len(self.presets) * len(self.tokens) * timed


@dataclass
class Batch:
    """One routed batch and what its op needs from it."""

    op: str
    experts: Experts
    inputs: Inputs
    touched: int
    layer: Optional[MoE] = None
    plan: Optional[object] = None
    xs: Optional[torch.Tensor] = None
    ys: Optional[torch.Tensor] = None


def build_experts(spec: BenchSpec, preset) -> tuple[Experts, Union[Experts, str]]:
    """(the experts the backends run, the same as float weights for the peers or why they
    cannot have them). Quantized experts are made in their format directly; their float copy
    only when a peer asks for it and it fits in memory."""
    if not spec.weights:
        experts = make_experts(preset, spec.dtype, spec.device, spec.seed, requires_grad=spec.backward)
        return experts, experts
    experts = quantized_experts(preset, spec.weights, spec.dtype, spec.device, spec.seed, spec.precision)
    if not any(p in FLOAT_PEERS for op in spec.ops for p in spec.peers_of(op)):
        return experts, "no peer asked for them"
    short = fits_in_memory(dense_bytes(preset, spec.dtype), spec.device)
    if short:
        return experts, f"needs the experts dequantized to {str(spec.dtype).removeprefix('torch.')}: {short}"
    return experts, dequantized(experts)


def _on_backend(layer: MoE, backend: str) -> MoE:
    """The layer with the same weights, run on backend."""
    layer = copy.copy(layer)
    layer.backend = backend
    return layer


def prepare(spec: BenchSpec, experts: Experts, num_tokens: int, op: str = "moe_mlp",
            layer: Optional[MoE] = None) -> Batch:
    """The batch of num_tokens for op; layer: the MoE around the experts, for op "layer"."""
    inputs = make_inputs(experts.preset, num_tokens, spec.dtype, spec.device, spec.routing, spec.seed)
    if op == "layer":  # the layer's own router chooses the experts (routed by the reference,
        # not by the layer's backend, which may be none of those benchmarked)
        with torch.no_grad():
            ids = _on_backend(layer, "torch").routing(inputs.x)[2]
        return Batch(op, experts, inputs, distinct_experts(ids), layer=layer)
    batch = Batch(op, experts, inputs, distinct_experts(inputs.ids))
    if op != "moe_mlp":
        plan = ops.make_plan(inputs.ids, experts.preset.num_experts, backend="torch")
        batch.plan = plan
        batch.xs = ops.permute(inputs.x, plan, backend="torch")
        batch.ys = torch.randn_like(batch.xs)
    return batch


def work_of(spec: BenchSpec, batch: Batch) -> Work:
    preset, t = batch.experts.preset, batch.inputs.num_tokens
    rows = t * preset.top_k
    stored = batch.experts.expert_bytes() if spec.weights else None
    if batch.op == "moe_mlp":
        return moe_mlp_work(preset, t, batch.touched, spec.dtype, spec.backward, stored)
    if batch.op == "layer":
        return layer_work(preset, t, batch.touched, spec.dtype, spec.backward, stored)
    if batch.op == "grouped_mm":
        return grouped_mm_work(rows, preset.hidden_size, gate_up_width(preset), batch.touched, spec.dtype)
    if batch.op == "permute":
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
    if batch.op == "layer":
        layer = _on_backend(batch.layer, backend)
        return _no_grad(lambda: layer(x))
    if batch.op == "moe_mlp":
        def forward(x, weights, ids):
            return ops.moe_mlp(x, weights, ids, experts, backend=backend)

        if spec.backward:
            return training_step(forward, batch.inputs, batch.experts.trained())
        return _no_grad(lambda: forward(x, weights, ids))
    plan = batch.plan
    if batch.op == "grouped_mm":
        w = experts.w_gate_up.transpose(1, 2)
        return _no_grad(lambda: ops.grouped_mm(batch.xs, w, plan.offsets, backend=backend))
    if batch.op == "permute":
        return _no_grad(lambda: ops.permute(x, plan, backend=backend))
    return _no_grad(lambda: ops.unpermute(batch.ys, plan, weights, backend=backend))


def build_peers(spec: BenchSpec, op: str, experts: Experts, float_experts: Union[Experts, str]) -> dict:
    """name -> Peer (moe_mlp) or True (op-level peers that need no state) or the reason it
    cannot run; float_experts: the experts as float weights, or why there are none."""
    built = {}
    for name in spec.peers_of(op):
        if name in MEASURED_ONLY:
            continue
        if name in FLOAT_PEERS and isinstance(float_experts, str):
            built[name] = float_experts
            continue
        try:
            if op == "moe_mlp":
                built[name] = moe_peer(name, float_experts if name in FLOAT_PEERS else experts,
                                       trainable=spec.backward)
            else:
                if name == "torch-grouped-mm":
                    check_torch_grouped_mm(spec.dtype, spec.device)
                built[name] = True
        except PeerUnavailable as exc:
            built[name] = str(exc)
    return built


def op_peer_call(spec: BenchSpec, batch: Batch, name: str, peer) -> Callable[[], object]:
    if batch.op == "moe_mlp":
        return peer_call(peer, batch.inputs, spec.backward)
    plan = batch.plan
    if batch.op == "grouped_mm":
        gmm, w = torch_grouped_mm_fn(), batch.experts.weights.w_gate_up.transpose(1, 2)
        ends = plan.offsets[1:].clone()  # torch's offs: the end of each group, in its own buffer
        return _no_grad(lambda: gmm(batch.xs, w, offs=ends))
    if batch.op == "permute":
        return _no_grad(lambda: torch_gather_permute(batch.inputs.x, plan.token_of_row))
    return _no_grad(lambda: torch_gather_unpermute(batch.ys, plan.row_of_slot, batch.inputs.weights))


def _rate(amount: float, ms: float, unit: float) -> float:
    return amount / (ms / 1e3) / unit if ms > 0 else float("nan")


def make_record(spec: BenchSpec, batch: Batch, work: Work, roofline: Roofline, backend: str, times: list,
                peer_ms: dict, context: dict) -> dict:
    """One result; context: the run's fields for every record (skipped peers, memory before the experts)."""
    preset: Preset = batch.experts.preset
    ms = median(times)
    bound_ms, bound_kind = roofline.bound(work, spec.dtype)
    return {
        "op": batch.op, "preset": preset.name, "scale": preset.scale, "num_experts": preset.num_experts,
        "top_k": preset.top_k, "hidden_size": preset.hidden_size, "intermediate_size": preset.intermediate_size,
        "backend": backend, "device": roofline.device, "dtype": str(spec.dtype).removeprefix("torch."),
        # the format, and the precision when not weight-only: "fp8-w8a8"
        "weights": spec.weights if spec.precision == "weight-only" else f"{spec.weights}-{spec.precision}",
        "tokens": batch.inputs.num_tokens, "routing": spec.routing, "backward": spec.backward,
        "cuda_graph": spec.cuda_graph,
        "ms": ms, "repeats": len(times), "tokens_per_s": _rate(batch.inputs.num_tokens, ms, 1.0),
        "tflops": _rate(work.flops, ms, 1e12), "gbps": _rate(work.bytes, ms, 1e9),
        "flops": work.flops, "bytes": work.bytes, "experts_touched": batch.touched,
        "bound_ms": bound_ms, "bound": bound_kind, "roofline": bound_ms / ms if ms > 0 else float("nan"),
        "peers": dict(peer_ms),
        "speedup": {name: (p / ms if p is not None and ms > 0 else None) for name, p in peer_ms.items()},
        # the memory the experts hold, and the process's peak since before they were made
        "stored_bytes": batch.experts.expert_bytes() * preset.num_experts, "peak_memory_bytes": peak_resident_memory(),
        **context,
    }


def run_bench(spec: BenchSpec, roofline: Roofline, advance: Callable[[str], None] = lambda label: None,
              warn: Callable[[str], None] = lambda message: None) -> Iterator[dict]:
    """Yield one record per (preset, op, tokens, backend). The backends and peers of a batch are
    timed in turns (measure_many); interrupting (KeyboardInterrupt) still yields the batch's
    records from the samples taken so far."""
    for preset in spec.presets:
        reset_peak_memory()
        memory_before = resident_memory()
        experts, float_experts = build_experts(spec, preset)
        layer = make_layer(experts, spec.seed) if "layer" in spec.ops else None
        memory = {"memory_before_bytes": memory_before, "peak_memory_made_bytes": peak_resident_memory()}
        for op in spec.ops:
            yield from _run_op(spec, op, experts, float_experts, layer, roofline, advance, warn, memory)
        del experts, float_experts, layer
        if spec.device.type == "cuda":
            torch.cuda.empty_cache()


def _run_op(spec: BenchSpec, op: str, experts: Experts, float_experts: Union[Experts, str], layer: Optional[MoE],
            roofline: Roofline, advance: Callable[[str], None], warn: Callable[[str], None],
            memory: dict) -> Iterator[dict]:
    """run_bench's records of one op; memory: the records' fields on the process's memory."""
    preset = experts.preset
    peers = build_peers(spec, op, experts, float_experts)
    skipped = {name: peer for name, peer in peers.items() if isinstance(peer, str)}
    for name, why in skipped.items():
        warn(f"{preset.label}: peer {name} skipped: {why}")
    for num_tokens in spec.tokens:
        batch = prepare(spec, experts, num_tokens, op, layer)
        work = work_of(spec, batch)
        calls = {backend: backend_call(spec, batch, backend) for backend in spec.backends}
        for name, peer in peers.items():
            if name not in skipped:
                calls[name] = op_peer_call(spec, batch, name, peer)
        times, failed = {}, {}
        label = f"{preset.label} {op} T={num_tokens}"
        try:
            if spec.cuda_graph:
                calls = capture_cuda_graphs(calls, spec.device, failed=failed)
            measure_many(calls, spec.device, budget_s=spec.budget_s, times=times, failed=failed,
                         on_start=lambda name: advance(f"{label} {name}"))
            for name, why in failed.items():
                warn(f"{label}: {name} failed and is left out: {why}")
        finally:  # on Ctrl-C too: what was measured so far
            peer_ms = {name: (roofline.memory_ms(work) if name in MEASURED_ONLY
                              else median(times[name]) if times.get(name) else None)
                       for name in spec.peers_of(op)}
            for backend in spec.backends:
                if times.get(backend):
                    yield make_record(spec, batch, work, roofline, backend, times[backend], peer_ms,
                                      {"skipped": skipped, **memory})
