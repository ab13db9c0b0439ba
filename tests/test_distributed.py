"""ExpertParallelMoE on gloo: W CPU processes must compute what one MoE computes on all their tokens.

Spawning processes is slow on a small machine, so each world size starts one group that runs
every check and reports them one by one; each check becomes its own test below. A check runs
all its collectives before it compares anything, so a failed comparison on one rank never
leaves the others waiting in an exchange; a hang still ends at the process group's timeout.
"""

from __future__ import annotations

import json
import os
import socket
import time
import traceback
import warnings
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import assert_close
from moe_dispatch import MoE
from moe_dispatch.integrations.distributed import ExpertParallelMoE

WORLD_SIZES = (2, 4)
COLLECTIVE_TIMEOUT_S = 30
GROUP_DEADLINE_S = 100
HIDDEN, INTER = 16, 8


# ---- the checks, run on every rank ---------------------------------------------------------


def _compare_with_single_process(moe: MoE, tokens_per_rank: list[int], dtype: torch.dtype) -> torch.Tensor:
    """Run `moe` on all ranks' tokens in this process and its expert-parallel share on this
    rank's tokens; assert outputs and every gradient agree. Returns the global expert counts."""
    rank = dist.get_rank()
    ep = ExpertParallelMoE.from_moe(moe)
    gen = torch.Generator().manual_seed(1234)  # the same batch on every rank
    x = torch.randn(sum(tokens_per_rank), HIDDEN, generator=gen, dtype=dtype)
    dy = torch.randn(x.shape, generator=gen, dtype=dtype)
    mine = slice(sum(tokens_per_rank[:rank]), sum(tokens_per_rank[: rank + 1]))

    x_full = x.clone().requires_grad_()
    expected, expected_aux = moe(x_full, return_aux=True)
    expected.backward(dy)

    x_local = x[mine].clone().requires_grad_()
    out, aux = ep(x_local, return_aux=True)
    out.backward(dy[mine])
    with torch.no_grad():
        out_no_grad = ep(x[mine])
    # The router, expert_bias and shared experts are replicated: their gradients add up
    # over the ranks, as a data-parallel all-reduce would sum them.
    replicated = {n: p.grad.clone() for n, p in ep.named_parameters() if not n.startswith(("w_", "b_"))}
    for grad in replicated.values():
        dist.all_reduce(grad)
    counts = aux.counts.clone()
    dist.all_reduce(counts)

    # Routing weights, their products with the rows and the combine are float32 whatever the
    # layer's dtype (docs/architecture.md), and the expert-parallel path applies the weights
    # at another point of the same computation (unit weights where the experts run, the
    # routing weights on the token's rank) and sums the replicated gradients per rank first.
    # Results agree to float32 rounding; float64 data keeps every other step exact.
    tolerance = torch.float32
    assert_close(out, expected[mine], tolerance)
    assert_close(out_no_grad, expected[mine], tolerance)
    assert_close(x_local.grad, x_full.grad[mine], tolerance)
    assert torch.equal(counts, expected_aux.counts)
    reference = dict(moe.named_parameters())
    for name, grad in replicated.items():
        assert_close(grad, reference[name].grad, tolerance)
    for name in ("w_gate_up", "w_down", "b_gate_up", "b_down"):
        if getattr(ep, name) is not None:
            assert_close(getattr(ep, name).grad, getattr(moe, name).grad[ep.local_experts], tolerance)
    return counts


def _layer(seed: int, **options) -> MoE:
    torch.manual_seed(seed)
    return MoE(HIDDEN, INTER, options.pop("num_experts", 8), options.pop("top_k", 3), backend="torch", **options)


def check_deepseek_routing(world):
    # Sigmoid scores, a correction bias, expert groups, a routed scale and a shared expert:
    # everything the local routing must reproduce. Ranks hold different numbers of tokens.
    moe = _layer(1, scoring="sigmoid", n_groups=4, topk_groups=2, routed_scaling=2.5,
                 n_shared_experts=1, dtype=torch.float64)
    moe.expert_bias.copy_(torch.randn(8, generator=torch.Generator().manual_seed(2)) * 0.1)
    _compare_with_single_process(moe, [5, 1, 9, 3][:world], torch.float64)


def check_softmax_biases_float32(world):
    # Softmax without renormalisation, expert biases, a non-gated activation, float32, and
    # L = 12 / world local experts.
    moe = _layer(3, num_experts=12, top_k=2, renormalize=False, activation="gelu", bias=True)
    _compare_with_single_process(moe, [6, 11, 4, 7][:world], torch.float32)


def check_rank_receives_no_tokens(world):
    # The last rank's experts are never chosen: it receives zero rows and runs its experts on
    # nothing; their gradients must be MoE's zeros.
    moe = _layer(4, scoring="sigmoid", dtype=torch.float64)
    last = slice(8 - 8 // world, 8)
    moe.expert_bias[last] = -100.0
    counts = _compare_with_single_process(moe, [7, 4, 6, 5][:world], torch.float64)
    assert counts[last].sum() == 0 and counts.sum() > 0


def check_all_tokens_to_one_rank(world):
    # Every choice lands on rank 0's experts: all other ranks receive nothing and rank 0
    # receives every row.
    local = 8 // world
    moe = _layer(5, top_k=2, scoring="sigmoid", dtype=torch.float64)
    moe.expert_bias[:local] = 100.0
    counts = _compare_with_single_process(moe, [6, 3, 8, 2][:world], torch.float64)
    assert counts[local:].sum() == 0 and counts[:local].sum() == 2 * sum([6, 3, 8, 2][:world])


def check_rank_without_own_tokens(world):
    # Rank 0 has no tokens of its own (T = 0): it sends nothing but still serves its experts.
    moe = _layer(6, dtype=torch.float64)
    _compare_with_single_process(moe, [0, 9, 5, 4][:world], torch.float64)


def check_indivisible_experts_raise(world):
    with pytest.raises(ValueError, match=f"num_experts={2 * world + 1} must be divisible .* {world}"):
        ExpertParallelMoE(HIDDEN, INTER, 2 * world + 1, 2, backend="torch")


def check_ranks_seeded_alike_share_the_router_only(world):
    # The router and shared experts must agree across ranks; the experts must differ.
    torch.manual_seed(7)
    ep = ExpertParallelMoE(HIDDEN, INTER, 8, 2, n_shared_experts=1, backend="torch")
    params = torch.cat([ep.router.weight.flatten(), ep.shared_experts.down.weight.flatten()])
    experts = ep.w_gate_up.detach().clone()
    gathered = [torch.empty_like(params) for _ in range(world)]
    gathered_experts = [torch.empty_like(experts) for _ in range(world)]
    dist.all_gather(gathered, params)
    dist.all_gather(gathered_experts, experts)
    assert all(torch.equal(g, params) for g in gathered)
    assert not torch.equal(gathered_experts[0], gathered_experts[1])
    assert ep.w_gate_up.shape == (8 // world, 2 * INTER, HIDDEN) and ep.num_experts == 8


CHECKS = {name[len("check_"):]: fn for name, fn in dict(globals()).items() if name.startswith("check_")}


# ---- the process group ---------------------------------------------------------------------


def _worker(rank: int, world: int, port: int, result_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S),
    )
    failures = {}
    for name, check in CHECKS.items():
        try:
            check(world)
        except Exception:
            failures[name] = traceback.format_exc()
    dist.destroy_process_group()
    with open(os.path.join(result_dir, f"rank{rank}.json"), "w") as f:
        json.dump(failures, f)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", params=WORLD_SIZES, ids=lambda w: f"world{w}")
def group_failures(request, tmp_path_factory) -> dict[str, str]:
    """Spawn one gloo group of this world size, run every check; check name -> failures."""
    world = request.param
    result_dir = str(tmp_path_factory.mktemp(f"world{world}"))
    context = mp.start_processes(
        _worker, args=(world, _free_port(), result_dir), nprocs=world, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + GROUP_DEADLINE_S
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {world}-rank group did not finish in {GROUP_DEADLINE_S} s")
    failures: dict[str, str] = {}
    for rank in range(world):
        with open(os.path.join(result_dir, f"rank{rank}.json")) as f:
            for name, trace in json.load(f).items():
                failures[name] = failures.get(name, "") + f"\n--- rank {rank} ---\n{trace}"
    return failures


@pytest.mark.parametrize("check", CHECKS)
def test_expert_parallel(group_failures, check):
    assert check not in group_failures, group_failures[check]


def test_needs_an_initialized_process_group():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="init_process_group"):
        ExpertParallelMoE(HIDDEN, INTER, 8, 2)


def _syncs_in(module_file: str, caught: list) -> list[str]:
    return [f"{w.filename}:{w.lineno}" for w in caught
            if "synchroniz" in str(w.message) and w.filename.endswith(module_file)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_one_host_sync_per_layer_on_cuda():
    # NCCL with one rank (one GPU): the layer asks the host for the split sizes once per
    # forward and never in backward. Syncs inside the local experts belong to the backend.
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        moe = MoE(HIDDEN, INTER, 8, 3, scoring="sigmoid", n_groups=4, topk_groups=2, n_shared_experts=1,
                  device="cuda")
        layer = ExpertParallelMoE.from_moe(moe)
        x = torch.randn(64, HIDDEN, device="cuda", requires_grad=True)
        layer(x).sum().backward()  # warm-up: JIT compilation and the NCCL communicator
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                out = layer(x)
                forward_syncs = _syncs_in("integrations/distributed.py", caught)
                caught.clear()
                out.backward(torch.ones_like(out))
                backward_syncs = _syncs_in("integrations/distributed.py", caught)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        assert len(forward_syncs) == 1, forward_syncs
        assert backward_syncs == []
        assert_close(out, moe(x))
    finally:
        dist.destroy_process_group()
