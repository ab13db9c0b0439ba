"""pytest-benchmark suite: `pytest benchmarks/ --benchmark-only` (`-m quick` for a quick subset).

The cases come from moe_dispatch.benchmarking, shared with `moe-dispatch bench`: the same
presets, setup factories, peers and roofline. Each result's extra_info records shape, dtype,
backend, device and the roofline fraction.
"""

from __future__ import annotations

import pytest
import torch

from bench_setup import DEVICE, DTYPE
from moe_dispatch.benchmarking.roofline import get_roofline
from moe_dispatch.benchmarking.timing import synchronize


@pytest.fixture(scope="session")
def device() -> torch.device:
    return DEVICE


@pytest.fixture(scope="session")
def roofline():
    return get_roofline(DEVICE, fresh_bandwidth=True)


@pytest.fixture
def run_benchmark(benchmark, roofline):
    """run(fn, work, info): time fn with pytest-benchmark, warm-up rounds first (JIT compiles,
    autotuning), the device synchronized inside each timed call; record info, the work and the
    roofline fraction in the result's extra_info."""

    def run(fn, work, info: dict, rounds: int = 10) -> None:
        def timed():
            fn()
            synchronize(DEVICE)

        bound_ms, bound = roofline.bound(work, DTYPE)
        benchmark.extra_info.update(info, dtype=str(DTYPE).removeprefix("torch."), device=roofline.device,
                                    flops=work.flops, bytes=work.bytes, bound_ms=bound_ms, bound=bound)
        benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=2)
        if benchmark.stats is not None:  # None under --benchmark-disable
            benchmark.extra_info["roofline"] = bound_ms / (benchmark.stats.stats.median * 1e3)

    return run
