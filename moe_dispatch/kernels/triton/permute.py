"""Data movement: gather rows into expert order, combine them back per token, and the
small index kernels around them. Every sum is in float32, in a fixed order, without atomics.

A row index outside its tensor (a slot whose expert id was out of range has row -1) is
masked: nothing is read or written for it.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .indices import load_index

TILE_ELEMENTS = 4096  # elements a program moves per step: wide enough for 16-byte accesses per thread


def _tile(width: int) -> tuple[int, int]:
    """(rows, columns) of a program's tile: up to 1024 columns, rows filling the rest."""
    columns = min(1024, triton.next_power_of_2(max(width, 1)))
    return TILE_ELEMENTS // columns, columns


@triton.jit
def gather_rows_kernel(
    src_ptr,  # [S, W]
    index_ptr,  # [R] int32   source row of each output row
    dst_ptr,  # [R, W] out
    num_rows,
    num_src_rows,
    width,
    stride_src,
    stride_dst,
    BLOCK_R: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    """Grid: (cdiv(R, BLOCK_R), cdiv(W, BLOCK_W)). dst[r] = src[index[r]]."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    row_ok = rows < num_rows
    col_ok = cols < width
    src_rows, src_ok = load_index(index_ptr, rows, row_ok, num_src_rows)
    # int64: row * stride passes 2^31 for large T*k*H
    values = tl.load(
        src_ptr + src_rows.to(tl.int64)[:, None] * stride_src + cols[None, :],
        mask=src_ok[:, None] & col_ok[None, :],
        other=0.0,
    )
    tl.store(dst_ptr + rows.to(tl.int64)[:, None] * stride_dst + cols[None, :], values,
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def combine_kernel(
    src_ptr,  # [R, W] (SLOT_MAJOR: [T*k, W])
    row_of_slot_ptr,  # [T*k] int32
    weights_ptr,  # [T*k] float (None: all ones)
    out_ptr,  # [T, W] out
    num_tokens,
    num_rows,
    width,
    stride_src,
    stride_out,
    TOP_K: tl.constexpr,
    SLOT_MAJOR: tl.constexpr,  # src is already in slot order; row_of_slot only marks valid slots
    BLOCK_T: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    """Grid: (cdiv(T, BLOCK_T), cdiv(W, BLOCK_W)). out[t] = sum_j w[t, j] * src[row_of_slot[t, j]]."""
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    token_ok = tokens < num_tokens
    col_ok = cols < width
    acc = tl.zeros([BLOCK_T, BLOCK_W], dtype=tl.float32)
    # unrolled: the k rows' loads are all in flight at once, not one round trip after another
    # (a runtime loop kept T=1024's unpermute at 37-65% of the copy bandwidth on an H200)
    for j in tl.static_range(TOP_K):
        slots = tokens * TOP_K + j
        rows, ok = load_index(row_of_slot_ptr, slots, token_ok, num_rows)
        if SLOT_MAJOR:
            src_rows = slots.to(tl.int64)
        else:
            src_rows = rows.to(tl.int64)
        values = tl.load(src_ptr + src_rows[:, None] * stride_src + cols[None, :],
                         mask=ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        if weights_ptr is not None:
            values *= tl.load(weights_ptr + slots, mask=ok, other=0.0).to(tl.float32)[:, None]
        acc += values
    tl.store(out_ptr + tokens.to(tl.int64)[:, None] * stride_out + cols[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=token_ok[:, None] & col_ok[None, :])


@triton.jit
def combine_backward_kernel(
    dy_ptr,  # [T, W]
    ys_ptr,  # [R, W]
    row_of_slot_ptr,  # [T*k] int32
    weights_ptr,  # [T*k] float
    dys_ptr,  # [R, W] out: w[t, j] * dy[t] at row_of_slot[t, j]
    dweights_ptr,  # [T*k] float32 out: dy[t] . ys[row_of_slot[t, j]]
    num_slots,
    top_k,
    num_rows,
    width,
    stride_dy,
    stride_ys,
    stride_dys,
    BLOCK_S: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    """Grid: (cdiv(T*k, BLOCK_S),). Each program walks the full width of its slots."""
    slots = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    slot_ok = slots < num_slots
    rows, ok = load_index(row_of_slot_ptr, slots, slot_ok, num_rows)
    tokens = (slots // top_k).to(tl.int64)
    rows = rows.to(tl.int64)
    weight = tl.load(weights_ptr + slots, mask=ok, other=0.0).to(tl.float32)
    dot = tl.zeros([BLOCK_S], dtype=tl.float32)
    for c0 in range(0, width, BLOCK_W):
        cols = c0 + tl.arange(0, BLOCK_W)
        mask = ok[:, None] & (cols < width)[None, :]
        dy = tl.load(dy_ptr + tokens[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        ys = tl.load(ys_ptr + rows[:, None] * stride_ys + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dot += tl.sum(dy * ys, axis=1)
        tl.store(dys_ptr + rows[:, None] * stride_dys + cols[None, :],
                 (dy * weight[:, None]).to(dys_ptr.dtype.element_ty), mask=mask)
    tl.store(dweights_ptr + slots, dot, mask=slot_ok)


@triton.jit
def invert_rows_kernel(
    row_of_slot_ptr,  # [T*k] int32
    weights_ptr,  # [T*k] float (None: no weights to invert)
    slot_of_row_ptr,  # [R] int32 out
    weight_of_row_ptr,  # [R] float32 out (with weights_ptr)
    num_slots,
    num_rows,
    BLOCK: tl.constexpr,
):
    """Grid: (cdiv(T*k, BLOCK),). slot_of_row[row_of_slot[s]] = s: the scatter epilogues' targets."""
    slots = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    slot_ok = slots < num_slots
    rows, ok = load_index(row_of_slot_ptr, slots, slot_ok, num_rows)
    tl.store(slot_of_row_ptr + rows, slots, mask=ok)
    if weights_ptr is not None:
        tl.store(weight_of_row_ptr + rows, tl.load(weights_ptr + slots, mask=ok).to(tl.float32), mask=ok)


def _row_major(t: torch.Tensor) -> torch.Tensor:
    """Rows may have any stride; columns must be contiguous."""
    return t if t.stride(-1) == 1 else t.contiguous()


def gather_rows(src: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """src: [S, W], index: [R] int32 -> [R, W], row r = src[index[r]] (zeros where index is out of range)."""
    src = _row_major(src)
    out = src.new_empty(index.shape[0], src.shape[1])
    if out.numel():
        rows, cols = _tile(out.shape[1])
        grid = (triton.cdiv(out.shape[0], rows), triton.cdiv(out.shape[1], cols))
        gather_rows_kernel[grid](src, index, out, out.shape[0], src.shape[0], src.shape[1], src.stride(0),
                                 out.stride(0), BLOCK_R=rows, BLOCK_W=cols)
    return out


def combine(src: torch.Tensor, row_of_slot: torch.Tensor, weights: Optional[torch.Tensor], slot_major: bool = False):
    """src: [R, W] -> [T, W] in src's dtype, out[t] = sum_j weights[t, j] * src[row_of_slot[t, j]] in float32.

    row_of_slot: [T, k] int32; weights: [T, k] float or None (all ones).
    slot_major: src is [T*k, W] already in slot order (a scatter epilogue's output).
    """
    src = _row_major(src)
    num_tokens, top_k = row_of_slot.shape
    out = src.new_empty(num_tokens, src.shape[1])
    if out.numel():
        rows, cols = _tile(src.shape[1])
        grid = (triton.cdiv(num_tokens, rows), triton.cdiv(src.shape[1], cols))
        combine_kernel[grid](
            src, row_of_slot, weights.contiguous() if weights is not None else None, out,
            num_tokens, src.shape[0], src.shape[1], src.stride(0), out.stride(0),
            TOP_K=top_k, SLOT_MAJOR=slot_major, BLOCK_T=rows, BLOCK_W=cols,
        )
    return out


def combine_backward(dy: torch.Tensor, ys: torch.Tensor, row_of_slot: torch.Tensor, weights: torch.Tensor):
    """The gradients of combine with weights: (d ys: [R, W] dy's dtype, d weights: [T, k] float32)."""
    dy, ys = _row_major(dy), _row_major(ys)
    dys = dy.new_empty(ys.shape)
    dweights = torch.zeros(row_of_slot.shape, dtype=torch.float32, device=ys.device)
    if row_of_slot.numel():
        rows, cols = _tile(ys.shape[1])
        grid = (triton.cdiv(row_of_slot.numel(), rows),)
        combine_backward_kernel[grid](
            dy, ys, row_of_slot, weights.contiguous(), dys, dweights, row_of_slot.numel(), row_of_slot.shape[1],
            ys.shape[0], ys.shape[1], dy.stride(0), ys.stride(0), dys.stride(0),
            BLOCK_S=rows, BLOCK_W=cols,
        )
    return dys, dweights


def invert_rows(row_of_slot: torch.Tensor, weights: Optional[torch.Tensor]):
    """(slot_of_row: [R] int32, weight_of_row: [R] float32 or None) from row_of_slot: [T, k] int32."""
    num_slots = row_of_slot.numel()
    device = row_of_slot.device
    slot_of_row = torch.empty(num_slots, dtype=torch.int32, device=device)
    weight_of_row = torch.empty(num_slots, dtype=torch.float32, device=device) if weights is not None else None
    if num_slots:
        block = 256
        invert_rows_kernel[(triton.cdiv(num_slots, block),)](
            row_of_slot, weights.contiguous() if weights is not None else None, slot_of_row, weight_of_row,
            num_slots, num_slots, BLOCK=block,
        )
    return slot_of_row, weight_of_row
