"""The decode forward: moe_mlp for up to MAX_TOKENS tokens in two kernels, without a plan.

Every token fits the rows of one tile, so each chosen expert's tile takes all the tokens as
rows and keeps those of the tokens that chose it: the up kernel computes each expert once (its
first slot, the owner) with the activation; the down kernel walks the owners' K-blocks in one
loop and adds each token's weighted result in float32, in a fixed order (docs/gpu.md, "Decode:
two kernels, no plan"). A slot with an id outside [0, E) owns nothing and adds nothing, and the
up kernel reports whether there was one.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from ...activations import Activation
from .activations import activate
from .grouped_gemm import activation_args, mainloop
from .quantized import weight_operand, weight_tile
from .tiles import TileConfig, dot_precision, dot_upcast

# The most tokens the decode kernels take: one tile of rows, the least tl.dot accepts.
MAX_TOKENS = 16


class Routes(NamedTuple):
    """What the up kernel tells the down kernel, per slot s (filled where owner[s] is 1)."""

    owner: torch.Tensor  # [T*k] int32: 1 where s is the first slot with its expert, a valid id
    weights: torch.Tensor  # [T*k, MAX_TOKENS] float32: token t's routing weights on it, summed


@triton.jit
def decode_up_kernel(
    x_ptr,  # [T, K]
    ids_ptr,  # [T, k] int, contiguous
    weights_ptr,  # [T, k] float, contiguous
    w_ptr,  # [E, K, NW] any strides (w_gate_up transposed); GATED: NW = 2N, gate column i at
    #         i * gate_step, its up column at that + up_shift; a quantized one's codes (W_FORMAT)
    w_scales_ptr, w_zeros_ptr,  # a quantized W's scales and zero points (quantized.WeightOperand)
    bias_ptr,  # [E, NW] (None: no bias)
    act_ptr,  # [T*k * MAX_TOKENS, N] out: row s * MAX_TOKENS + t: act(h) of token t, owner s's expert
    owner_ptr, route_weights_ptr,  # out: Routes
    ok_ptr,  # [1] bool out: every id in [0, E)
    num_tokens, top_k, K, N, num_experts, gate_step, up_shift,
    stride_xm, stride_we, stride_wk, stride_wn, stride_wse, stride_wsr, stride_be, stride_am,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, S_PAD: tl.constexpr,
    K_PAD: tl.constexpr, ACT: tl.constexpr, P0: tl.constexpr, P1: tl.constexpr, GATED: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, EVEN_K: tl.constexpr,
    W_FORMAT: tl.constexpr, SCALE_ROWS: tl.constexpr, SCALE_COLS: tl.constexpr, Q_T: tl.constexpr,
):
    """Grid: (T*k, cdiv(N, BLOCK_N))."""
    slot = tl.program_id(0)
    pid_n = tl.program_id(1)
    num_slots = num_tokens * top_k
    slots = tl.arange(0, S_PAD)
    ids = tl.load(ids_ptr + slots, mask=slots < num_slots, other=-1)
    if (slot == 0) & (pid_n == 0):
        bad = tl.sum(((slots < num_slots) & ((ids < 0) | (ids >= num_experts))).to(tl.int32), axis=0)
        tl.store(ok_ptr, bad == 0)
    expert = tl.load(ids_ptr + slot)
    first = tl.min(tl.where(ids == expert, slots, S_PAD), axis=0)
    owner = (first == slot) & (expert >= 0) & (expert < num_experts)
    if pid_n == 0:
        tl.store(owner_ptr + slot, owner.to(tl.int32))
    if not owner:
        return
    tokens = tl.arange(0, BLOCK_T)
    js = tl.arange(0, K_PAD)
    choice_ok = (tokens < num_tokens)[:, None] & (js < top_k)[None, :]
    choices = tokens[:, None] * top_k + js[None, :]
    hit = (tl.load(ids_ptr + choices, mask=choice_ok, other=-1) == expert) & choice_ok
    if pid_n == 0:
        weight = tl.sum(tl.load(weights_ptr + choices, mask=hit, other=0.0).to(tl.float32), axis=1)
        tl.store(route_weights_ptr + slot * BLOCK_T + tokens, weight)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    expert = expert.to(tl.int64)
    acc, acc2 = mainloop(
        x_ptr, tokens.to(tl.int64) * stride_xm, tokens < num_tokens, w_ptr + expert * stride_we, cols * gate_step,
        col_ok, up_shift, w_scales_ptr, w_zeros_ptr, expert * stride_wse, pid_n * BLOCK_N, N, stride_wk, stride_wn,
        stride_wsr, 0, K, None, 0, BLOCK_T, BLOCK_N, BLOCK_K, GATED, PRECISION, UPCAST, EVEN_K, W_FORMAT, SCALE_ROWS,
        SCALE_COLS, Q_T,
    )
    if bias_ptr is not None:
        b_ptrs = bias_ptr + expert * stride_be + cols * gate_step
        acc += tl.load(b_ptrs, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if GATED:
            acc2 += tl.load(b_ptrs + up_shift, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    y = activate(acc, acc2, ACT, P0, P1)
    # every row of the owner's tile, so that the down kernel reads it whole, without masks: a
    # token that did not choose the expert has weight 0 on it, whatever its row holds
    rows = slot.to(tl.int64) * BLOCK_T + tokens
    tl.store(act_ptr + rows[:, None] * stride_am + cols[None, :], y.to(act_ptr.dtype.element_ty), mask=col_ok[None, :])


@triton.jit
def decode_down_kernel(
    act_ptr,  # [T*k * MAX_TOKENS, K] the up kernel's tiles (K = I)
    ids_ptr,  # [T, k] int, contiguous
    owner_ptr, route_weights_ptr,  # Routes, from the up kernel
    w_ptr,  # [E, K, N] any strides (w_down transposed: N = H); a quantized one's codes (W_FORMAT)
    w_scales_ptr, w_zeros_ptr,  # a quantized W's scales and zero points (quantized.WeightOperand)
    bias_ptr,  # [E, N] (None: no bias)
    out_ptr,  # [T, N] out
    num_slots, num_tokens, K, N, num_experts,
    stride_am, stride_we, stride_wk, stride_wn, stride_wse, stride_wsr, stride_be, stride_om,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, S_PAD: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, EVEN_K: tl.constexpr,
    W_FORMAT: tl.constexpr, SCALE_ROWS: tl.constexpr, SCALE_COLS: tl.constexpr, Q_T: tl.constexpr,
):
    """Grid: (cdiv(N, BLOCK_N),). out[t] = sum over the owner slots s, in order, of
    route_weights[s, t] * (act[s * MAX_TOKENS + t] @ w_down[ids[s]].T + b_down[ids[s]])."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    tokens = tl.arange(0, BLOCK_T)
    ks = tl.arange(0, BLOCK_K)
    k_blocks = tl.cdiv(K, BLOCK_K)
    # The owners' slots and experts, held in registers: each step picks its owner's out of them
    # by rank. Loaded inside the loop instead, they would feed the addresses of the step's tiles,
    # and Triton's pipeliner then keeps one tile in flight, not num_stages - 1. Owners lie in
    # [0, T*k) and the expert is masked below: routes that are not the up kernel's never lead
    # outside act or w.
    slots = tl.arange(0, S_PAD)
    owns = tl.load(owner_ptr + slots, mask=slots < num_slots, other=0) != 0
    rank = tl.cumsum(owns.to(tl.int32), axis=0) - 1
    expert_of = tl.load(ids_ptr + slots, mask=owns, other=-1)
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    out = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    # one loop over (owner, K-block): the loads run ahead across experts
    for step in range(0, tl.sum(owns.to(tl.int32), axis=0) * k_blocks):
        owner = step // k_blocks
        k0 = (step - owner * k_blocks) * BLOCK_K
        mine = owns & (rank == owner)
        slot = tl.sum(tl.where(mine, slots, 0), axis=0)
        expert = tl.sum(tl.where(mine, expert_of, 0), axis=0).to(tl.int64)
        expert_ok = (expert >= 0) & (expert < num_experts)
        if EVEN_K:
            k_ok = tl.full((BLOCK_K,), True, tl.int1)
        else:
            k_ok = (k0 + ks) < K
        rows = slot.to(tl.int64) * BLOCK_T + tokens
        a = tl.load(act_ptr + rows[:, None] * stride_am + (k0 + ks)[None, :], mask=k_ok[None, :], other=0.0)
        # tl.where joins a scalar condition to a block mask, here and below: the interpreter's &
        # gives int32 there, and it rejects a scalar mask for a block
        w = weight_tile(w_ptr + expert * stride_we, w_scales_ptr, w_zeros_ptr, expert * stride_wse, k0 + ks,
                        tl.where(expert_ok, k_ok, False), cols, tl.where(expert_ok, col_ok, False), k0, K, 0, N,
                        stride_wk, stride_wn, stride_wsr, act_ptr.dtype.element_ty, BLOCK_K, BLOCK_N, EVEN_K,
                        W_FORMAT, SCALE_ROWS, SCALE_COLS, Q_T)
        if UPCAST:
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
        # the expert's last K-block: add its bias, weigh it into out, start the next expert
        last = k0 + BLOCK_K >= K
        if bias_ptr is not None:
            bias = tl.load(bias_ptr + expert * stride_be + cols, mask=tl.where(last & expert_ok, col_ok, False),
                           other=0.0)
            acc += bias.to(tl.float32)[None, :]
        weight = tl.load(route_weights_ptr + slot * BLOCK_T + tokens, mask=tl.where(last, tokens < BLOCK_T, False),
                         other=0.0)
        out = tl.where(last, out + acc * weight[:, None], out)
        acc = tl.where(last, 0.0, acc)
    tl.store(out_ptr + tokens.to(tl.int64)[:, None] * stride_om + cols[None, :], out.to(out_ptr.dtype.element_ty),
             mask=(tokens < num_tokens)[:, None] & col_ok[None, :])


# ---- launchers -------------------------------------------------------------------------------


def decode_up(
    x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, w, bias: Optional[torch.Tensor],
    activation: Activation, gate_columns: tuple[int, int], config: TileConfig,
) -> tuple[torch.Tensor, Routes, torch.Tensor]:
    """(act: [T*k * MAX_TOKENS, N] x's dtype, routes, ok: [1] bool). x: [T, K] with
    T <= MAX_TOKENS; ids, weights: [T, k]; w: [E, K, NW] any strides, gate and up columns where
    gate_columns says (see grouped_gemm), or a quantized q.mT; bias: [E, NW]. Only the owners'
    tiles of act are written."""
    x, ids, weights = x if x.stride(-1) == 1 else x.contiguous(), ids.contiguous(), weights.contiguous()
    num_tokens, top_k = ids.shape
    operand = weight_operand(w)
    num_experts, k_dim, w_cols = operand.shape
    n_cols = w_cols // 2 if activation.gated else w_cols
    device = x.device
    act = torch.empty(ids.numel() * MAX_TOKENS, n_cols, dtype=x.dtype, device=device)
    routes = Routes(torch.empty(ids.numel(), dtype=torch.int32, device=device),
                    torch.empty(ids.numel(), MAX_TOKENS, dtype=torch.float32, device=device))
    ok = torch.empty(1, dtype=torch.bool, device=device)
    decode_up_kernel[(ids.numel(), triton.cdiv(n_cols, config.block_n))](
        x, ids, weights, operand.data, operand.scales, operand.zeros, bias, act, *routes, ok,
        num_tokens, top_k, k_dim, n_cols, num_experts, *gate_columns,
        x.stride(0), *operand.strides, bias.stride(0) if bias is not None else 0, act.stride(0),
        BLOCK_T=MAX_TOKENS, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        # the slots of a full tile of tokens, whatever T: one compile serves every decode batch size
        S_PAD=triton.next_power_of_2(MAX_TOKENS * top_k), K_PAD=triton.next_power_of_2(top_k),
        PRECISION=dot_precision(x.dtype, device), UPCAST=dot_upcast(x.dtype, device),
        EVEN_K=k_dim % config.block_k == 0, num_warps=config.num_warps, num_stages=config.num_stages,
        **activation_args(activation), **operand.meta,
    )
    return act, routes, ok


def decode_down(
    act: torch.Tensor, ids: torch.Tensor, routes: Routes, w, bias: Optional[torch.Tensor],
    config: TileConfig,
) -> torch.Tensor:
    """out: [T, N] act's dtype, the weighted sum over each token's experts. act, routes:
    decode_up's; ids: [T, k]; w: [E, K, N] any strides, or a quantized q.mT; bias: [E, N]."""
    operand = weight_operand(w)
    num_experts, k_dim, n_cols = operand.shape
    out = torch.empty(ids.shape[0], n_cols, dtype=act.dtype, device=act.device)
    decode_down_kernel[(triton.cdiv(n_cols, config.block_n),)](
        act, ids.contiguous(), *routes, operand.data, operand.scales, operand.zeros, bias, out,
        ids.numel(), ids.shape[0], k_dim, n_cols, num_experts,
        act.stride(0), *operand.strides, bias.stride(0) if bias is not None else 0, out.stride(0),
        BLOCK_T=MAX_TOKENS, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        S_PAD=triton.next_power_of_2(MAX_TOKENS * ids.shape[1]),
        PRECISION=dot_precision(act.dtype, act.device), UPCAST=dot_upcast(act.dtype, act.device),
        EVEN_K=k_dim % config.block_k == 0, num_warps=config.num_warps, num_stages=config.num_stages,
        **operand.meta,
    )
    return out
