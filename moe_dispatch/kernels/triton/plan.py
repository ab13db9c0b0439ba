"""make_plan on the device: a histogram, a scan and a stable scatter, no atomics, no host sync.

The T*k slots are cut into C chunks. Each chunk counts its slots per expert (histogram),
one program turns the counts into each chunk's first row per expert (scan), and each chunk
then writes its rows in slot order (scatter), so every expert's rows come out in ascending
token order, exactly the plan of the reference backend. For a few slots (decode), one
program does all three in a single launch.

An expert id outside [0, E) is counted nowhere and written nowhere: its slot gets row -1,
and offsets[E] (the rows placed) falls short of T*k. The kernels also write whether every
slot was placed, which the launcher turns into a device-side assert (see docs/gpu.md).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .tiles import expert_block

MAX_CHUNKS = 512  # the scan loops over chunks; bounded so it stays short at any T
# Up to this many one-hot steps, one program plans in one launch instead of three: slots up
# to 4 * 8192 / E_PAD (decode: 128 at E = 256, 512 at E = 64).
ONE_LAUNCH_STEPS = 4
ONE_HOT_ELEMENTS = 8192  # SUB * E_PAD: the one-hot tile each step builds


@triton.jit
def count_chunk(ids_ptr, begin, chunk, num_slots, SUB: tl.constexpr, E_PAD: tl.constexpr):
    """[E_PAD] int32: the slots of [begin, begin + chunk) per expert."""
    experts = tl.arange(0, E_PAD)
    counts = tl.zeros([E_PAD], dtype=tl.int32)
    for start in range(begin, begin + chunk, SUB):
        slots = start + tl.arange(0, SUB)
        ids = tl.load(ids_ptr + slots, mask=slots < num_slots, other=-1)
        # an id outside [0, E) never matches an expert column that is stored
        onehot = ((ids[:, None] == experts[None, :]) & (ids[:, None] >= 0)).to(tl.int32)
        counts += tl.sum(onehot, axis=0)
    return counts


@triton.jit
def scatter_chunk(ids_ptr, running, begin, chunk, token_of_row_ptr, row_of_slot_ptr, num_slots, num_experts, top_k,
                  SUB: tl.constexpr, E_PAD: tl.constexpr):
    """Write the rows of the slots of [begin, begin + chunk) in slot order; running: [E_PAD]
    the next row of each expert."""
    experts = tl.arange(0, E_PAD)
    for start in range(begin, begin + chunk, SUB):
        slots = start + tl.arange(0, SUB)
        in_range = slots < num_slots
        ids = tl.load(ids_ptr + slots, mask=in_range, other=-1)
        valid = in_range & (ids >= 0) & (ids < num_experts)
        onehot = ((ids[:, None] == experts[None, :]) & valid[:, None]).to(tl.int32)
        # rank among the earlier slots of this step with the same expert
        earlier = tl.cumsum(onehot, axis=0) - onehot
        rows = tl.sum(onehot * (running[None, :] + earlier), axis=1)
        tl.store(token_of_row_ptr + rows, (slots // top_k).to(tl.int32), mask=valid)
        tl.store(row_of_slot_ptr + slots, tl.where(valid, rows, -1), mask=in_range)
        running += tl.sum(onehot, axis=0)


@triton.jit
def finish_placement(token_of_row_ptr, all_placed_ptr, placed, num_slots, BLOCK: tl.constexpr):
    """all_placed = (placed == R), and token_of_row[placed:R] = 0: valid slots fill rows
    [0, placed); the rest (bad ids) are never scattered to, and would otherwise hold whatever
    the allocator left there."""
    tl.store(all_placed_ptr, placed == num_slots)
    for start in range(placed, num_slots, BLOCK):
        rows = start + tl.arange(0, BLOCK)
        tl.store(token_of_row_ptr + rows, tl.zeros([BLOCK], dtype=tl.int32), mask=rows < num_slots)


@triton.jit
def plan_count_kernel(
    ids_ptr,  # [R] int     expert of each slot
    chunk_counts_ptr,  # [C, E] int32 out: slots per expert in each chunk
    num_slots,
    num_experts,
    chunk,  # slots per chunk, a multiple of SUB
    SUB: tl.constexpr,
    E_PAD: tl.constexpr,
):
    """Grid: (C,)."""
    c = tl.program_id(0)
    experts = tl.arange(0, E_PAD)
    counts = count_chunk(ids_ptr, c * chunk, chunk, num_slots, SUB, E_PAD)
    tl.store(chunk_counts_ptr + c * num_experts + experts, counts, mask=experts < num_experts)


@triton.jit
def plan_scan_kernel(
    chunk_counts_ptr,  # [C, E] int32
    chunk_base_ptr,  # [C, E] int32 out: first row of expert e's slots of chunk c
    counts_ptr,  # [E] int32 out
    offsets_ptr,  # [E+1] int32 out
    token_of_row_ptr,  # [R] int32 out: zeros in the rows no slot is placed in
    all_placed_ptr,  # [1] bool out: every slot's id was in [0, E)
    num_chunks,
    num_experts,
    num_slots,
    CB: tl.constexpr,  # chunks per step
    E_PAD: tl.constexpr,
):
    """Grid: (1,). Two passes over the [C, E] counts, CB chunks at a time."""
    experts = tl.arange(0, E_PAD)
    emask = experts < num_experts
    # ---- totals per expert, and where each expert starts
    totals = tl.zeros([E_PAD], dtype=tl.int32)
    for c0 in range(0, num_chunks, CB):
        chunks = c0 + tl.arange(0, CB)
        index = chunks[:, None] * num_experts + experts[None, :]
        tile = tl.load(chunk_counts_ptr + index, mask=(chunks[:, None] < num_chunks) & emask[None, :], other=0)
        totals += tl.sum(tile, axis=0)
    starts = tl.cumsum(totals, axis=0) - totals
    tl.store(counts_ptr + experts, totals, mask=emask)
    tl.store(offsets_ptr + experts, starts, mask=emask)
    tl.store(offsets_ptr + num_experts, tl.sum(totals, axis=0))
    finish_placement(token_of_row_ptr, all_placed_ptr, tl.sum(totals, axis=0), num_slots, CB * E_PAD)
    # ---- each chunk starts after the earlier chunks' rows of the same expert
    running = starts
    for c0 in range(0, num_chunks, CB):
        chunks = c0 + tl.arange(0, CB)
        index = chunks[:, None] * num_experts + experts[None, :]
        mask = (chunks[:, None] < num_chunks) & emask[None, :]
        tile = tl.load(chunk_counts_ptr + index, mask=mask, other=0)
        tl.store(chunk_base_ptr + index, running[None, :] + tl.cumsum(tile, axis=0) - tile, mask=mask)
        running += tl.sum(tile, axis=0)


@triton.jit
def plan_scatter_kernel(
    ids_ptr,  # [R] int
    chunk_base_ptr,  # [C, E] int32
    token_of_row_ptr,  # [R] int32 out
    row_of_slot_ptr,  # [R] int32 out (-1 for an id outside [0, E))
    num_slots,
    num_experts,
    top_k,
    chunk,
    SUB: tl.constexpr,
    E_PAD: tl.constexpr,
):
    """Grid: (C,). Walks its chunk in slot order, so rows of one expert keep token order."""
    c = tl.program_id(0)
    experts = tl.arange(0, E_PAD)
    running = tl.load(chunk_base_ptr + c * num_experts + experts, mask=experts < num_experts, other=0)
    scatter_chunk(ids_ptr, running, c * chunk, chunk, token_of_row_ptr, row_of_slot_ptr, num_slots, num_experts,
                  top_k, SUB, E_PAD)


@triton.jit
def plan_one_launch_kernel(
    ids_ptr,  # [R] int
    counts_ptr,  # [E] int32 out
    offsets_ptr,  # [E+1] int32 out
    token_of_row_ptr,  # [R] int32 out
    row_of_slot_ptr,  # [R] int32 out (-1 for an id outside [0, E))
    all_placed_ptr,  # [1] bool out
    num_slots,
    num_experts,
    top_k,
    chunk,  # >= R, a multiple of SUB
    SUB: tl.constexpr,
    E_PAD: tl.constexpr,
):
    """Grid: (1,). Count, scan and scatter in one launch, all slots as one chunk (decode)."""
    experts = tl.arange(0, E_PAD)
    emask = experts < num_experts
    # lanes past E count ids >= E, which are placed nowhere
    counts = tl.where(emask, count_chunk(ids_ptr, 0, chunk, num_slots, SUB, E_PAD), 0)
    starts = tl.cumsum(counts, axis=0) - counts
    tl.store(counts_ptr + experts, counts, mask=emask)
    tl.store(offsets_ptr + experts, starts, mask=emask)
    tl.store(offsets_ptr + num_experts, tl.sum(counts, axis=0))
    finish_placement(token_of_row_ptr, all_placed_ptr, tl.sum(counts, axis=0), num_slots, SUB)
    scatter_chunk(ids_ptr, starts, 0, chunk, token_of_row_ptr, row_of_slot_ptr, num_slots, num_experts, top_k,
                  SUB, E_PAD)


def make_plan(ids: torch.Tensor, num_experts: int):
    """Build the dispatch plan on ids' device.

    ids: [T, k] int (int32 or int64)
    Returns counts: [E] int32, offsets: [E+1] int32, token_of_row: [T*k] int32,
    row_of_slot: [T, k] int32 (-1 where the id was outside [0, E)), and all_placed: [1] bool,
    whether every id was in [0, E).
    """
    num_tokens, top_k = ids.shape
    num_slots = num_tokens * top_k
    device = ids.device
    int32 = dict(dtype=torch.int32, device=device)
    # The kernels write all of these in full; rows left unplaced by bad ids get token 0.
    token_of_row = torch.empty(num_slots, **int32)
    row_of_slot = torch.empty(num_tokens, top_k, **int32)
    all_placed = torch.empty(1, dtype=torch.bool, device=device)
    if num_slots == 0:
        return (torch.zeros(num_experts, **int32), torch.zeros(num_experts + 1, **int32), token_of_row, row_of_slot,
                all_placed.fill_(True))
    counts = torch.empty(num_experts, **int32)
    offsets = torch.empty(num_experts + 1, **int32)
    flat = ids.reshape(-1)
    if flat.dtype not in (torch.int32, torch.int64):
        flat = flat.to(torch.int32)
    flat = flat.contiguous()

    e_pad = expert_block(num_experts)
    sub = max(1, min(128, ONE_HOT_ELEMENTS // e_pad))
    steps = triton.cdiv(num_slots, sub)
    if steps <= ONE_LAUNCH_STEPS:
        plan_one_launch_kernel[(1,)](flat, counts, offsets, token_of_row, row_of_slot, all_placed, num_slots,
                                     num_experts, top_k, steps * sub, SUB=sub, E_PAD=e_pad)
        return counts, offsets, token_of_row, row_of_slot, all_placed
    chunk = sub * triton.cdiv(steps, MAX_CHUNKS)
    num_chunks = triton.cdiv(num_slots, chunk)
    chunk_counts = torch.empty(num_chunks, num_experts, **int32)
    chunk_base = torch.empty(num_chunks, num_experts, **int32)
    cb = max(1, min(64, ONE_HOT_ELEMENTS // e_pad))

    plan_count_kernel[(num_chunks,)](flat, chunk_counts, num_slots, num_experts, chunk, SUB=sub, E_PAD=e_pad)
    plan_scan_kernel[(1,)](chunk_counts, chunk_base, counts, offsets, token_of_row, all_placed, num_chunks,
                           num_experts, num_slots, CB=cb, E_PAD=e_pad)
    plan_scatter_kernel[(num_chunks,)](
        flat, chunk_base, token_of_row, row_of_slot, num_slots, num_experts, top_k, chunk, SUB=sub, E_PAD=e_pad
    )
    return counts, offsets, token_of_row, row_of_slot, all_placed
