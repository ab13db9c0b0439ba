"""Expert parallelism on torch.distributed: each rank holds E/W of the experts.

With W ranks in the process group, rank r holds experts [r*E/W, (r+1)*E/W). Every rank routes
its own tokens, sends each (token, choice) row to the rank that holds the expert, runs the
grouped MLP of its local experts on what it received, and sends the results back to be
combined. The transport is torch.distributed's all_to_all_single: NCCL on GPUs, gloo on CPUs.

Forward of one layer, on each rank (T local tokens, k choices, L = E/W local experts):

    route, make_plan           rows [T*k] grouped by expert, hence by destination rank
    counts exchange            all_to_all_single of the [W, L] per-expert counts (int32)
    host sync (the only one)   the row counts per peer, which all_to_all_single needs
    dispatch exchange          all_to_all_single of the rows
    local experts              rows arrive grouped by source rank, then by expert: a plan
                               over their local expert ids regroups them for moe_mlp
    combine exchange           all_to_all_single back, the reverse of the dispatch
    unpermute                  weighted by the routing weights, on the token's own rank

Backward runs the two exchanges in reverse with the split sizes saved by the forward, so it
never syncs. The router and shared experts (and the expert_bias buffer) are replicated on
every rank: average their gradients over the group like any data-parallel parameter. The
expert weights differ per rank and stay out of that reduction.

Import from here: ``from moe_dispatch.integrations.distributed import ExpertParallelMoE``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from ..layers import MoE
from ..ops import make_plan, moe_mlp, permute, unpermute
from ..plan import DispatchPlan

Tensor = torch.Tensor
_EXPERT_WEIGHTS = ("w_gate_up", "w_down", "b_gate_up", "b_down")


def exchange_rows(rows: Tensor, send_sizes: list[int], recv_sizes: list[int], group=None) -> Tensor:
    """all_to_all_single with autograd: rows [sum(send_sizes), H] -> [sum(recv_sizes), H].

    Rows send_sizes[0] first go to rank 0, the next send_sizes[1] to rank 1, and so on; the
    result holds what each rank sent here, in rank order. The gradient flows back through
    the reverse exchange (the sizes swapped).
    """
    return _ExchangeRows.apply(rows, send_sizes, recv_sizes, group)


class _ExchangeRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows, send_sizes, recv_sizes, group):
        ctx.sizes, ctx.group = (send_sizes, recv_sizes), group
        return _all_to_all(rows, send_sizes, recv_sizes, group)

    @staticmethod
    def backward(ctx, grad):
        send_sizes, recv_sizes = ctx.sizes
        return _all_to_all(grad, recv_sizes, send_sizes, ctx.group), None, None, None


def _all_to_all(rows: Tensor, send_sizes: list[int], recv_sizes: list[int], group) -> Tensor:
    received = rows.new_empty(sum(recv_sizes), rows.shape[1])
    dist.all_to_all_single(
        received, rows.contiguous(), output_split_sizes=recv_sizes, input_split_sizes=send_sizes, group=group
    )
    return received


class ExpertParallelMoE(MoE):
    """MoE with its experts spread over the ranks of a process group.

    Takes MoE's arguments plus `process_group` (None: the default group). Rank r of the W
    ranks holds experts [r*E/W, (r+1)*E/W): w_gate_up, w_down (and b_gate_up, b_down) have
    E/W experts; num_experts stays the global E. The router, expert_bias and shared experts
    are full copies on every rank. Each rank passes its own tokens; the output holds those
    tokens' results, as MoE would compute them on the tokens of all ranks together.

    Every rank of the group must call forward (and backward) for every batch, even with no
    tokens, because the exchanges are collective.

    Initialisation: ranks seeded alike get the same router and shared experts (they must
    agree) and different experts, drawn from the global generator's next seed plus the rank.
    `from_moe` copies the weights of a full MoE instead.
    """

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        num_experts: int,
        top_k: int,
        *,
        process_group: Optional[dist.ProcessGroup] = None,
        device=None,
        dtype=None,
        **moe_options,
    ):
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("ExpertParallelMoE needs torch.distributed: call init_process_group first")
        world_size = dist.get_world_size(process_group)
        rank = dist.get_rank(process_group)
        if rank < 0:
            raise ValueError("process_group does not contain this rank")
        if isinstance(num_experts, int) and num_experts % world_size:
            raise ValueError(
                f"num_experts={num_experts} must be divisible by the process group's world size "
                f"{world_size}: rank r holds experts [r*E/W, (r+1)*E/W)"
            )
        # Build on the meta device first so the full [E, ...] expert weights are never allocated.
        super().__init__(hidden_size, intermediate_size, num_experts, top_k, device="meta", dtype=dtype,
                         **moe_options)
        self.process_group, self.world_size, self.rank = process_group, world_size, rank
        self.num_local_experts = num_experts // world_size
        self.first_expert = rank * self.num_local_experts
        for name in _EXPERT_WEIGHTS:
            full = getattr(self, name)
            if full is not None:
                setattr(self, name, nn.Parameter(full.new_empty((self.num_local_experts,) + full.shape[1:])))
        self.to_empty(device=torch.get_default_device() if device is None else device)
        # The same order as MoE's construction, so ranks seeded alike agree on these.
        for module in self.modules():
            if isinstance(module, nn.Linear):
                module.reset_parameters()
        self.reset_parameters()

    @classmethod
    def from_moe(cls, moe: MoE, process_group: Optional[dist.ProcessGroup] = None) -> "ExpertParallelMoE":
        """This rank's share of a full MoE: the same router, bias and shared experts, and its
        slice of the experts. Call it on every rank with the same `moe`."""
        n_shared = 0 if moe.shared_experts is None else moe.shared_experts.down.in_features // moe.intermediate_size
        layer = cls(
            moe.hidden_size, moe.intermediate_size, moe.num_experts, moe.top_k,
            process_group=process_group, activation=moe.activation, scoring=moe.scoring,
            renormalize=moe.renormalize, n_groups=moe.n_groups, topk_groups=moe.topk_groups,
            routed_scaling=moe.routed_scaling, n_shared_experts=n_shared, bias=moe.b_gate_up is not None,
            backend=moe.backend, device=moe.w_gate_up.device, dtype=moe.w_gate_up.dtype,
        )
        state = moe.state_dict()
        for name in _EXPERT_WEIGHTS:
            if name in state:
                state[name] = state[name][layer.local_experts]
        layer.load_state_dict(state)
        return layer

    @property
    def local_experts(self) -> slice:
        """The global ids of the experts this rank holds."""
        return slice(self.first_expert, self.first_expert + self.num_local_experts)

    def reset_parameters(self) -> None:
        """MoE's initialisation of the experts, drawn per rank (see the class docstring)."""
        if self.w_gate_up.is_meta:  # MoE.__init__ calls this before the experts are materialised
            return
        seed = int(torch.randint(2**62, ())) + self.rank
        generator = torch.Generator(self.w_gate_up.device).manual_seed(seed)
        bound_in = 1 / math.sqrt(self.hidden_size)
        bound_out = 1 / math.sqrt(self.intermediate_size)
        with torch.no_grad():
            self.w_gate_up.uniform_(-bound_in, bound_in, generator=generator)
            self.w_down.uniform_(-bound_out, bound_out, generator=generator)
            if self.b_gate_up is not None:
                self.b_gate_up.uniform_(-bound_in, bound_in, generator=generator)
                self.b_down.uniform_(-bound_out, bound_out, generator=generator)
            self.expert_bias.zero_()

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, world_size={self.world_size}, rank={self.rank}, "
            f"local_experts=[{self.first_expert}, {self.first_expert + self.num_local_experts})"
        )

    def routed_experts(self, flat: Tensor, weights: Tensor, ids: Tensor, plan: Optional[DispatchPlan] = None) -> Tensor:
        """MoE's routed_experts across the group: each row goes to the rank holding its expert and back."""
        if plan is None:
            plan = make_plan(ids, self.num_experts, backend=self.backend)
        group, world, local = self.process_group, self.world_size, self.num_local_experts
        send_counts = plan.counts.view(world, local)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=group)
        # The one host sync of the layer: all_to_all_single takes its split sizes as lists.
        # The combine exchange and both backward exchanges reuse them.
        send_sizes, recv_sizes = torch.stack((send_counts.sum(1), recv_counts.sum(1))).tolist()

        received = exchange_rows(permute(flat, plan, backend=self.backend), send_sizes, recv_sizes, group)
        # Received rows come grouped by source rank, then by expert; give each its local
        # expert id and let a plan over those ids regroup them by expert.
        local_ids = torch.repeat_interleave(
            torch.arange(local, device=flat.device).repeat(world), recv_counts.reshape(-1).long(),
            output_size=received.shape[0],
        ).unsqueeze(1)
        local_plan = make_plan(local_ids, local, backend=self.backend)
        unit_weights = torch.ones(local_ids.shape, device=flat.device, dtype=torch.float32)
        expert_out = moe_mlp(received, unit_weights, local_ids, self.experts, plan=local_plan, backend=self.backend)
        returned = exchange_rows(expert_out, recv_sizes, send_sizes, group)
        return unpermute(returned, plan, weights, backend=self.backend)


__all__ = ["ExpertParallelMoE", "exchange_rows"]
