"""The decode steps' thread count (backends/step_threads.py): all threads while the steps run
as fast as they can, the calling thread alone while they wait on a core another process holds."""

import pytest
import torch

import moe_dispatch as md
from conftest import assert_close, needs_numba

KIND, FAST = "kind", 1e-3
SLOW = 10 * FAST
ALL, ALONE = 2, 1


def _steps(policy, seconds: list[float], off_cpu: float = 0.5) -> list[int]:
    """Where each step ran (ALL threads or ALONE), each taking its seconds on all threads, the
    calling thread off the CPU for off_cpu of them."""
    where = []
    for took in seconds:
        alone = policy.alone(KIND)
        if not alone:
            policy.record(KIND, took, lambda: off_cpu)
        where.append(ALONE if alone else ALL)
    return where


@needs_numba
def test_slow_steps_in_a_row_send_the_next_ones_alone_until_a_fast_try():
    from moe_dispatch.backends.step_threads import StepThreads

    policy = StepThreads()
    alone = policy.ALONE
    # one slow step among fast ones changes nothing; two in a row do
    assert _steps(policy, [FAST, SLOW, FAST, SLOW, SLOW]) == [ALL] * 5
    assert _steps(policy, [SLOW] * alone) == [ALONE] * alone
    # the try on all threads is slow: twice as long alone, then the next try is fast
    assert _steps(policy, [SLOW]) == [ALL]
    assert _steps(policy, [FAST] * (2 * alone)) == [ALONE] * (2 * alone)
    assert _steps(policy, [FAST, FAST]) == [ALL, ALL]
    # from there a stretch alone is ALONE long again
    assert _steps(policy, [SLOW, SLOW] + [FAST] * (alone + 1)) == [ALL] * 2 + [ALONE] * alone + [ALL]


@needs_numba
def test_slow_steps_on_the_cpu_all_along_stay_on_all_threads():
    """Steps slow for want of the cache (weights from memory after a step that found them in
    it), the calling thread on the CPU throughout, are no sign of a core taken; a share off it
    just under OFF_CPU is not either, one at OFF_CPU is."""
    from moe_dispatch.backends.step_threads import StepThreads

    policy = StepThreads()
    assert _steps(policy, [FAST] + [SLOW] * 8, off_cpu=0.0) == [ALL] * 9
    assert _steps(policy, [SLOW] * 4, off_cpu=0.99 * policy.OFF_CPU) == [ALL] * 4
    assert _steps(policy, [SLOW] * 3, off_cpu=policy.OFF_CPU) == [ALL] * 2 + [ALONE]


@needs_numba
def test_a_step_measures_its_calling_threads_time_off_the_cpu(monkeypatch):
    """run() passes record the share of a step's time its calling thread was off the CPU: a
    step that sleeps is all off it, one that spins on it."""
    import time

    from moe_dispatch.backends.step_threads import StepThreads

    policy, shares = StepThreads(), []
    monkeypatch.setattr(policy, "record", lambda kind, seconds, off_cpu: shares.append(off_cpu()))

    def spin():
        end = time.perf_counter() + 0.02
        while time.perf_counter() < end:
            pass
        return 0

    def sleep():
        time.sleep(0.02)
        return 0

    policy.run(KIND, sleep, 0)
    policy.run(KIND, spin, 0)
    assert shares[0] > 0.5 and shares[1] < 0.5


@needs_numba
def test_each_kind_of_step_keeps_its_own_count():
    from moe_dispatch.backends.step_threads import StepThreads

    policy = StepThreads()
    _steps(policy, [FAST, SLOW, SLOW])
    assert policy.alone(KIND) and not policy.alone("another kind")


@needs_numba
@pytest.mark.parametrize("fmt", [None, "int4"], ids=["bf16", "int4"])
def test_a_step_alone_computes_the_same_and_gives_the_threads_back(fmt, gen, monkeypatch):
    """Steps sent to the calling thread alone (both decode entries: from ids, and on a given
    plan) give the output of steps on all threads, and Numba's count is torch's again after."""
    import numba

    from moe_dispatch.backends import numba_backend as nb

    layer = md.MoE(64, 32, 8, 2, backend="numba").to(torch.bfloat16)
    if fmt:
        layer.quantize_(fmt, group_size=32)
    x = torch.randn(3, 64, generator=gen).to(torch.bfloat16)
    with torch.no_grad():
        weights, ids = md.route(layer.router_logits(x), 2)
        plan = md.make_plan(ids, 8)
        expected = [md.moe_mlp(x, weights, ids, layer.experts), md.moe_mlp(x, weights, ids, layer.experts, plan=plan)]
        seen = []

        def alone(kind):
            seen.append(kind)
            return True

        monkeypatch.setattr(nb.STEP_THREADS, "alone", alone)
        actual = [md.moe_mlp(x, weights, ids, layer.experts), md.moe_mlp(x, weights, ids, layer.experts, plan=plan)]
    assert len(seen) == 2
    for out, ref in zip(actual, expected):
        assert_close(out, ref)
    assert numba.get_num_threads() == min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)
