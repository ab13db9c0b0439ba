"""Each op and the fused experts (moe_mlp), per preset x tokens x (backend or peer)."""

from __future__ import annotations

import pytest

from bench_setup import BACKENDS, DTYPE, shape_params
from moe_dispatch.benchmarking.bench import (
    OPS, BenchSpec, backend_call, build_peers, op_peer_call, prepare, work_of,
)
from moe_dispatch.benchmarking.cases import make_experts
from moe_dispatch.benchmarking.peers import MEASURED_ONLY, OP_PEERS

# the whole layer has a file of its own (test_bench_layer.py)
IMPLEMENTATIONS = [(op, name) for op in OPS if op != "layer"
                   for name in BACKENDS + [p for p in OP_PEERS[op] if p not in MEASURED_ONLY]]
_experts_cache: dict = {}


def experts_for(preset, device):
    """One set of weights per preset, reused across cases (the big presets take a while)."""
    if preset not in _experts_cache:
        _experts_cache.clear()
        _experts_cache[preset] = make_experts(preset, DTYPE, device)
    return _experts_cache[preset]


@pytest.mark.parametrize("op, implementation", IMPLEMENTATIONS, ids=[f"{o}-{i}" for o, i in IMPLEMENTATIONS])
@pytest.mark.parametrize("preset, tokens", shape_params())
def test_op(run_benchmark, device, op, implementation, preset, tokens):
    peers = [] if implementation in BACKENDS else [implementation]
    spec = BenchSpec([preset], [tokens], DTYPE, [], peers, device, ops=(op,))
    experts = experts_for(preset, device)
    batch = prepare(spec, experts, tokens, op)
    if implementation in BACKENDS:
        call = backend_call(spec, batch, implementation)
    else:
        peer = build_peers(spec, op, experts, experts)[implementation]
        if isinstance(peer, str):
            pytest.skip(peer)
        call = op_peer_call(spec, batch, implementation, peer)
    run_benchmark(call, work_of(spec, batch),
                  dict(preset=preset.label, op=op, implementation=implementation, tokens=tokens))
