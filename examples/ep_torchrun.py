"""Expert parallelism with torchrun: a DeepSeek-V3-shaped MoE layer, scaled down, on N processes.

    torchrun --nproc_per_node 2 examples/ep_torchrun.py     # N CPU processes, gloo
    torchrun --nproc_per_node 8 examples/ep_torchrun.py     # one GPU per process, NCCL

The layer keeps DeepSeek-V3's routing (256 experts, top-8, sigmoid scores with a correction
bias, 8 groups of which the best 4 compete, weights x2.5, one shared expert) with the hidden and
expert sizes shrunk from 7168 and 2048. Each rank holds 256/N experts and routes its own tokens.
The script first checks the layer against a single-process MoE with the same weights, then
trains it for a few steps with aux-loss-free load balancing.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from moe_dispatch import MoE
from moe_dispatch.backends import resolve_backend
from moe_dispatch.integrations.distributed import ExpertParallelMoE

SHAPE = dict(
    hidden_size=256, intermediate_size=64, num_experts=256, top_k=8, scoring="sigmoid",
    n_groups=8, topk_groups=4, routed_scaling=2.5, n_shared_experts=1,
)
TOKENS_PER_RANK = 256
STEPS = 5


def setup() -> torch.device:
    """Join the group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR... in the environment)."""
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return device


def print0(*args) -> None:
    if dist.get_rank() == 0:
        print(*args, flush=True)


def check_against_single_process(device: torch.device) -> None:
    """Same weights, same tokens: the expert-parallel layer must give MoE's outputs."""
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    full = MoE(**SHAPE, device=device)
    full.expert_bias.normal_(0, 0.05)
    layer = ExpertParallelMoE.from_moe(full)
    x = torch.randn(world * TOKENS_PER_RANK, SHAPE["hidden_size"], device=device)
    mine = x[rank * TOKENS_PER_RANK:(rank + 1) * TOKENS_PER_RANK]
    with torch.no_grad():
        error = (layer(mine) - full(x)[rank * TOKENS_PER_RANK:(rank + 1) * TOKENS_PER_RANK]).abs().max()
    dist.all_reduce(error, op=dist.ReduceOp.MAX)
    print0(f"max |expert-parallel - single-process MoE| over {world * TOKENS_PER_RANK} tokens: {error.item():.2e}")


def train(device: torch.device) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # every rank: the same router and shared expert, its own experts
    layer = ExpertParallelMoE(**SHAPE, device=device)
    held = [None] * world
    dist.all_gather_object(held, (layer.local_experts.start, layer.local_experts.stop, layer.w_gate_up.numel()))
    for r, (first, stop, numel) in enumerate(held):
        print0(f"rank {r}: experts [{first}, {stop}), w_gate_up {numel / 1e6:.2f} M values")

    replicated = [p for name, p in layer.named_parameters() if not name.startswith(("w_", "b_"))]
    optimizer = torch.optim.AdamW(layer.parameters(), lr=1e-2)
    target = torch.nn.Linear(SHAPE["hidden_size"], SHAPE["hidden_size"], device=device)  # a task to learn
    generator = torch.Generator(device).manual_seed(100 + rank)  # each rank its own tokens
    for step in range(STEPS):
        x = torch.randn(TOKENS_PER_RANK, SHAPE["hidden_size"], device=device, generator=generator)
        out, aux = layer(x, return_aux=True)
        loss = (out - target(x).detach()).square().mean()
        loss.backward()
        # Experts got their gradients through the exchanges; replicated weights average theirs.
        for p in replicated:
            dist.all_reduce(p.grad)
            p.grad /= world
        optimizer.step()
        optimizer.zero_grad()
        counts = aux.counts.clone()
        dist.all_reduce(counts)  # the global load, so every rank applies the same bias update
        layer.update_expert_bias(counts)
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        rows_per_rank = counts.view(world, -1).sum(1).tolist()
        print0(f"step {step}: loss {mean_loss.item() / world:.4f}, rows per rank {rows_per_rank}, "
               f"busiest expert {counts.max().item()} rows (mean {counts.float().mean().item():.0f})")


def main() -> None:
    device = setup()
    print0(f"{dist.get_world_size()} ranks, {dist.get_backend()}, device {device.type}, "
           f"local experts on the {resolve_backend(device, 'auto')} backend")
    check_against_single_process(device)
    train(device)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
