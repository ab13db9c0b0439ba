"""Grouped GEMM over expert-sorted rows, with the MoE fusions in its prologue and epilogue.

out[r] = epilogue(A[row(r)] @ W[e(r)] + bias[e(r)]) for the rows r of each expert e.

- Prologue: A's rows may be gathered through an index (token_of_row), so the permuted
  copy of x is never written (a fused permute).
- Epilogue: an activation (gated: gate column i of W is column i * gate_step, its up column
  i * gate_step + up_shift, and the program holds both accumulators), the pre-activation h
  stored for the backward (gate columns, then up columns, whatever W's order: contiguous
  stores), a per-row scale (the routing weight), and a scatter of each row to its (token,
  choice) slot, which a fixed-order sum over k then combines: no atomics. A fusion whose
  pointer is None is compiled out.
- Tiles find their expert on the device: the grid is sized from static bounds
  (cdiv(R, BLOCK_M) + min(E, R) M-tiles, the most any split of R rows over E experts
  needs), and each program reads the offsets to learn which expert and rows it owns, or exits.
- Programs run GROUP_M M-tiles at a time across all N-tiles, so those rows of A stay in L2
  while the weight columns stream past once: A is read from memory about once, not once
  per N-tile.
- w8a8 (an fp8 W with its activations quantized, A given as fp8_rows.Fp8Rows): A's e4m3 codes
  and W's multiply as they are, each K-step's partial product scaled by A's row scales and W's
  block scales (w8a8_mainloop).
- Split-K (the decode variant): with few rows there are too few tiles to fill the GPU,
  so K is split over SPLIT_K programs that write float32 partials, and a second kernel
  sums them in a fixed order and applies the same epilogue.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from ...activations import IDENTITY, Activation
from .activations import activate, activate_grad
from .fp8_rows import GROUP, Fp8Rows
from .indices import gathered, load_index
from .quantized import FLOAT, FP8, FP8_NATIVE, fp8_operand, weight_operand, weight_tile
from .tiles import TileConfig, dot_precision, dot_upcast, expert_block

# M-tiles that sweep the N-tiles together: 8 tiles of 128 rows x 7168 bf16 are 15 MB of L2.
GROUP_M = 8


@triton.jit
def tile_coords(pid, num_m_tiles, num_n_tiles, GROUP_M: tl.constexpr):
    """(M-tile, N-tile) of program pid: GROUP_M consecutive M-tiles take every N-tile in turn
    before the next group starts (the last group may be shorter)."""
    per_group = GROUP_M * num_n_tiles
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(num_m_tiles - first_m, GROUP_M)
    local = pid % per_group
    return first_m + local % group_m, local // group_m


@triton.jit
def locate_tile(offsets_ptr, tile, num_rows, num_experts, BLOCK_M: tl.constexpr, E_PAD: tl.constexpr):
    """(expert, first row, end row) of M-tile `tile`; expert >= num_experts past the last tile.

    Expert e owns cdiv(count_e, BLOCK_M) consecutive tiles; empty experts own none.
    The offsets are clamped to [0, R] and made non-decreasing, so even inconsistent
    offsets never lead a tile outside the rows.
    """
    experts = tl.arange(0, E_PAD)
    emask = experts < num_experts
    lo = tl.load(offsets_ptr + experts, mask=emask, other=0).to(tl.int32)
    hi = tl.load(offsets_ptr + experts + 1, mask=emask, other=0).to(tl.int32)
    lo = tl.minimum(tl.maximum(lo, 0), num_rows)
    hi = tl.minimum(tl.maximum(hi, lo), num_rows)
    tiles = (hi - lo + BLOCK_M - 1) // BLOCK_M
    ends = tl.cumsum(tiles, axis=0)
    expert = tl.sum((ends <= tile).to(tl.int32), axis=0)
    mine = experts == expert
    first_tile = tl.sum(tl.where(mine, ends - tiles, 0), axis=0)
    start = tl.sum(tl.where(mine, lo, 0), axis=0) + (tile - first_tile) * BLOCK_M
    end = tl.sum(tl.where(mine, hi, 0), axis=0)
    return expert, start, end


@triton.jit
def expert_tile(offsets_ptr, num_m_tiles, num_rows, num_experts, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                E_PAD: tl.constexpr, GROUP_M: tl.constexpr):
    """(expert, N-tile, rows, row_ok, cols, col_ok) of this program's tile of a grid of num_m_tiles
    M-tiles by cdiv(N, BLOCK_N) N-tiles; expert >= num_experts past the last tile (nothing to do)."""
    pid_m, pid_n = tile_coords(tl.program_id(0), num_m_tiles, tl.cdiv(N, BLOCK_N), GROUP_M)
    expert, start, end = locate_tile(offsets_ptr, pid_m, num_rows, num_experts, BLOCK_M, E_PAD)
    rows = start + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return expert, pid_n, rows, rows < end, cols, cols < N


@triton.jit
def k_in_range(ks, k_hi, EVEN_K: tl.constexpr):
    """Which K indices of a step lie below k_hi; all when EVEN_K, so that loads need no K mask
    (which would keep them from vectorizing along a contiguous K)."""
    if EVEN_K:
        k_ok = tl.full(ks.shape, True, tl.int1)
    else:
        k_ok = ks < k_hi
    return k_ok


@triton.jit
def mainloop(
    a_ptr, a_off, a_ok,  # A rows: int64 offsets [BM], validity [BM]; columns contiguous
    w_ptr, cols, col_ok, second_shift,  # W of one expert; columns [BN]; TWO also reads cols + second_shift
    w_scales_ptr, w_zeros_ptr, scale_off, n0, n_end,  # a quantized W (quantized.weight_tile)
    stride_wk, stride_wn, stride_wsr, k_lo, k_hi,
    w_desc, w_row,  # W as [E * NW, K] rows through the TMA (None: pointers); this tile's first row
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    TWO: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, EVEN_K: tl.constexpr,
    W_FORMAT: tl.constexpr, SCALE_ROWS: tl.constexpr, SCALE_COLS: tl.constexpr, Q_T: tl.constexpr,
):
    """float32 acc [BM, BN] = A[:, k_lo:k_hi] @ W[k_lo:k_hi, cols] (and acc2 for cols + shift).

    UPCAST multiplies in float32: the interpreter's tl.dot cannot multiply bf16.
    EVEN_K: every K-block is full, so loads need no K mask (which would keep them from
    vectorizing along a contiguous K).
    w_desc: weight tiles come through the TMA, which fills rows and columns past the tensor with
    zeros; rows past this expert's columns belong to the next one, and the epilogue masks them.
    W_FORMAT: a quantized W's tiles are dequantized in registers (quantized.weight_tile).
    """
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_off[:, None] + (k_lo + ks)[None, :]
    # int64: k * stride and n * stride can pass 2^31 for large experts
    w_ptrs = w_ptr + (k_lo + ks).to(tl.int64)[:, None] * stride_wk + cols.to(tl.int64)[None, :] * stride_wn
    if TWO:
        # (cols + shift) as a tensor: a scalar argument equal to 1 is a constexpr, without .to()
        w2_cols = (cols + second_shift).to(tl.int64)
        w2_ptrs = w_ptr + (k_lo + ks).to(tl.int64)[:, None] * stride_wk + w2_cols[None, :] * stride_wn
    else:
        w2_ptrs = w_ptrs
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k_ok = k_in_range(k0 + ks, k_hi, EVEN_K)
        a = tl.load(a_ptrs, mask=a_ok[:, None] & k_ok[None, :], other=0.0)
        if w_desc is not None:
            w = tl.trans(w_desc.load([w_row, k0]))
        elif W_FORMAT != FLOAT:
            w = weight_tile(w_ptr, w_scales_ptr, w_zeros_ptr, scale_off, k0 + ks, k_ok, cols, col_ok, k0, k_hi, n0,
                            n_end, stride_wk, stride_wn, stride_wsr, a_ptr.dtype.element_ty, BLOCK_K, BLOCK_N,
                            EVEN_K, W_FORMAT, SCALE_ROWS, SCALE_COLS, Q_T)
        else:
            w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
        if TWO:
            if w_desc is not None:
                w2 = tl.trans(w_desc.load([w_row + second_shift, k0]))
            elif W_FORMAT != FLOAT:
                w2 = weight_tile(w_ptr, w_scales_ptr, w_zeros_ptr, scale_off, k0 + ks, k_ok, cols + second_shift,
                                 col_ok, k0, k_hi, n0, n_end, stride_wk, stride_wn, stride_wsr,
                                 a_ptr.dtype.element_ty, BLOCK_K, BLOCK_N, EVEN_K, W_FORMAT, SCALE_ROWS, SCALE_COLS,
                                 Q_T)
            else:
                w2 = tl.load(w2_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            if UPCAST:
                w2 = w2.to(tl.float32)
            acc2 = tl.dot(a, w2, acc2, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * stride_wk
        w2_ptrs += BLOCK_K * stride_wk
    return acc, acc2


@triton.jit
def w8a8_step(
    a, a_scale,  # this K-step's A operand [BM, BK] (fp8_operand) and A's scales of its block [BM]
    w_ptr, w_scales_ptr, scale_off, cols, col_ok, ks, k_ok, k_block,  # one expert's codes q [N, K] (read as
    stride_wn, stride_wsr, W_FORMAT: tl.constexpr, SCALE_ROWS: tl.constexpr, UPCAST: tl.constexpr,  # q.mT)
):
    """float32 [BM, BN]: a @ W[ks, cols], times a_scale and the weight's scale of each column's
    block in the K-block k_block (the K-step lies in one: BLOCK_K divides 128)."""
    code = tl.load(w_ptr + cols.to(tl.int64)[:, None] * stride_wn + ks[None, :], mask=col_ok[:, None] & k_ok[None, :],
                   other=0)
    w = tl.trans(fp8_operand(code, W_FORMAT, UPCAST))
    scale_ptrs = w_scales_ptr + scale_off + (cols // SCALE_ROWS).to(tl.int64) * stride_wsr + k_block
    w_scale = tl.load(scale_ptrs, mask=col_ok, other=0.0)
    return tl.dot(a, w, input_precision="ieee") * a_scale[:, None] * w_scale[None, :]


@triton.jit
def w8a8_mainloop(
    a_ptr, a_off, a_ok,  # A's e4m3 codes (uint8): int64 row offsets [BM], validity [BM]; columns contiguous
    a_scales_ptr, a_scale_off,  # A's scales [rows, cdiv(K, 128)] float32: int64 row offsets [BM]
    w_ptr, cols, col_ok, second_shift,  # one expert's fp8 codes q [N, K] read as q.mT; TWO: cols + second_shift too
    w_scales_ptr, scale_off, stride_wn, stride_wsr, k_lo, k_hi,  # its scales at scale_off; q's row stride
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, TWO: tl.constexpr,
    UPCAST: tl.constexpr, EVEN_K: tl.constexpr, W_FORMAT: tl.constexpr, SCALE_ROWS: tl.constexpr,
    SCALE_COLS: tl.constexpr,
):
    """mainloop's (acc, acc2) for a w8a8 product: the codes of A and W multiplied by tl.dot in
    float8 (W_FORMAT FP8_NATIVE: sm_89 and newer), else in float16 (float32 under the
    interpreter, UPCAST), exact either way; each K-step's part scaled, summed in float32."""
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_off[:, None] + (k_lo + ks)[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k_ok = k_in_range(k0 + ks, k_hi, EVEN_K)
        a = fp8_operand(tl.load(a_ptrs, mask=a_ok[:, None] & k_ok[None, :], other=0), W_FORMAT, UPCAST)
        # the activations' groups are the weight's K-blocks (SCALE_COLS 0: K <= 128, one block)
        if SCALE_COLS == 0:
            k_block = 0
        else:
            k_block = k0 // SCALE_COLS
        a_scale = tl.load(a_scales_ptr + a_scale_off + k_block, mask=a_ok, other=0.0)
        acc += w8a8_step(a, a_scale, w_ptr, w_scales_ptr, scale_off, cols, col_ok, k0 + ks, k_ok, k_block, stride_wn,
                         stride_wsr, W_FORMAT, SCALE_ROWS, UPCAST)
        if TWO:
            acc2 += w8a8_step(a, a_scale, w_ptr, w_scales_ptr, scale_off, cols + second_shift, col_ok, k0 + ks, k_ok,
                              k_block, stride_wn, stride_wsr, W_FORMAT, SCALE_ROWS, UPCAST)
        a_ptrs += BLOCK_K
    return acc, acc2


@triton.jit
def epilogue(
    acc, acc2, rows, row_ok, cols, col_ok, n_cols,
    out_ptr, stride_om, h_ptr, stride_hm, slot_of_row_ptr, weight_of_row_ptr, num_out_rows,
    ACT: tl.constexpr, P0: tl.constexpr, P1: tl.constexpr, GATED: tl.constexpr,
):
    """Store h (pre-activation: gate columns, then up columns) when h_ptr is given, then
    act(acc[, acc2]) [* row weight] to out[row, or slot_of_row[row] when given]."""
    mask = row_ok[:, None] & col_ok[None, :]
    if h_ptr is not None:
        h_ptrs = h_ptr + rows.to(tl.int64)[:, None] * stride_hm + cols[None, :]
        tl.store(h_ptrs, acc.to(h_ptr.dtype.element_ty), mask=mask)
        if GATED:
            tl.store(h_ptrs + n_cols, acc2.to(h_ptr.dtype.element_ty), mask=mask)
    y = activate(acc, acc2, ACT, P0, P1)
    if weight_of_row_ptr is not None:
        y = y * tl.load(weight_of_row_ptr + rows, mask=row_ok, other=0.0)[:, None]
    dest, dest_ok = gathered(slot_of_row_ptr, rows, row_ok, num_out_rows)
    tl.store(out_ptr + dest.to(tl.int64)[:, None] * stride_om + cols[None, :], y.to(out_ptr.dtype.element_ty),
             mask=dest_ok[:, None] & col_ok[None, :])


@triton.jit
def grouped_gemm_kernel(
    # pointers (None: that fusion is compiled out)
    a_ptr,  # [S, K]            rows gathered through a_rows_ptr when given, else [R, K]
    a_rows_ptr,  # [R] int32    source row of each expert-sorted row
    a_scales_ptr,  # [S or R, cdiv(K, 128)] float32: A holds e4m3 codes (uint8), W is w8a8 fp8 (None: float A)
    w_ptr,  # [E, K, NW]        any strides; NW = 2N when GATED else N; a quantized W's codes (W_FORMAT)
    w_scales_ptr, w_zeros_ptr,  # a quantized W's scales and zero points (quantized.WeightOperand)
    w_desc,  # a TMA descriptor of W as [E * NW, K] (K contiguous), blocks [BLOCK_N, BLOCK_K]
    bias_ptr,  # [E, NW]
    offsets_ptr,  # [E+1] int   expert e owns rows offsets[e]:offsets[e+1]
    out_ptr,  # [R, N], or [T*k, N] scattered through slot_of_row_ptr
    h_ptr,  # [R, NW]           pre-activation: gate columns, then up columns
    slot_of_row_ptr,  # [R] int32
    weight_of_row_ptr,  # [R] float32
    ws_ptr,  # [SPLIT_K, R, NW] float32 partials (SPLIT_K > 1)
    # sizes
    num_rows, num_a_rows, num_out_rows, K, N, num_experts, num_m_tiles,
    gate_step, up_shift,  # GATED: W's gate column i is i * gate_step, its up column that + up_shift
    # strides
    stride_am, stride_asm, stride_we, stride_wk, stride_wn, stride_wse, stride_wsr, stride_be, stride_om, stride_hm,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, E_PAD: tl.constexpr,
    GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr, ACT: tl.constexpr, P0: tl.constexpr, P1: tl.constexpr,
    GATED: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, EVEN_K: tl.constexpr,
    W_FORMAT: tl.constexpr, SCALE_ROWS: tl.constexpr, SCALE_COLS: tl.constexpr, Q_T: tl.constexpr,
):
    """Grid: (num_m_tiles * cdiv(N, BLOCK_N), SPLIT_K), num_m_tiles = m_tile_bound(R, E, BLOCK_M)."""
    expert, pid_n, rows, row_ok, cols, col_ok = expert_tile(offsets_ptr, num_m_tiles, num_rows, num_experts, N,
                                                            BLOCK_M, BLOCK_N, E_PAD, GROUP_M)
    if expert >= num_experts:
        return
    pid_k = tl.program_id(1)

    # ---- prologue: which rows of A (the fused permute)
    src, a_ok = gathered(a_rows_ptr, rows, row_ok, num_a_rows)
    k_per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(K, k_lo + k_per_split)
    if a_scales_ptr is not None:
        acc, acc2 = w8a8_mainloop(
            a_ptr, src.to(tl.int64) * stride_am, a_ok, a_scales_ptr, src.to(tl.int64) * stride_asm,
            w_ptr + expert.to(tl.int64) * stride_we, cols * gate_step, col_ok, up_shift, w_scales_ptr,
            expert.to(tl.int64) * stride_wse, stride_wn, stride_wsr, k_lo, k_hi,
            BLOCK_M, BLOCK_N, BLOCK_K, GATED, UPCAST, EVEN_K, W_FORMAT, SCALE_ROWS, SCALE_COLS,
        )
    else:
        acc, acc2 = mainloop(
            a_ptr, src.to(tl.int64) * stride_am, a_ok, w_ptr + expert.to(tl.int64) * stride_we, cols * gate_step,
            col_ok, up_shift, w_scales_ptr, w_zeros_ptr, expert.to(tl.int64) * stride_wse, pid_n * BLOCK_N, N,
            stride_wk, stride_wn, stride_wsr, k_lo, k_hi, w_desc, expert * (2 * N if GATED else N) + pid_n * BLOCK_N,
            BLOCK_M, BLOCK_N, BLOCK_K, GATED, PRECISION, UPCAST, EVEN_K, W_FORMAT, SCALE_ROWS, SCALE_COLS, Q_T,
        )
    if bias_ptr is not None:
        if pid_k == 0:
            b_ptrs = bias_ptr + expert.to(tl.int64) * stride_be + cols * gate_step
            acc += tl.load(b_ptrs, mask=col_ok, other=0.0).to(tl.float32)[None, :]
            if GATED:
                acc2 += tl.load(b_ptrs + up_shift, mask=col_ok, other=0.0).to(tl.float32)[None, :]

    # ---- epilogue, or float32 partials for the split-K reduction
    if SPLIT_K == 1:
        epilogue(acc, acc2, rows, row_ok, cols, col_ok, N, out_ptr, stride_om, h_ptr, stride_hm,
                 slot_of_row_ptr, weight_of_row_ptr, num_out_rows, ACT, P0, P1, GATED)
    else:
        width = 2 * N if GATED else N
        ws_ptrs = ws_ptr + (pid_k * num_rows + rows).to(tl.int64)[:, None] * width + cols[None, :]
        mask = row_ok[:, None] & col_ok[None, :]
        tl.store(ws_ptrs, acc, mask=mask)
        if GATED:
            tl.store(ws_ptrs + N, acc2, mask=mask)


@triton.jit
def splitk_reduce_kernel(
    ws_ptr,  # [SPLIT_K, R, NW] float32: gate columns [0, N), up columns [N, 2N)
    offsets_ptr,  # [E+1] int
    out_ptr, h_ptr, slot_of_row_ptr, weight_of_row_ptr,  # as grouped_gemm_kernel
    num_rows, num_out_rows, N, num_experts, stride_om, stride_hm,
    SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ACT: tl.constexpr, P0: tl.constexpr, P1: tl.constexpr, GATED: tl.constexpr,
):
    """Grid: (cdiv(R, BLOCK_M), cdiv(N, BLOCK_N)). Sums the partials in split order."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    # only rows some tile wrote: those from offsets[0] to offsets[E]
    lo = tl.minimum(tl.maximum(tl.load(offsets_ptr).to(tl.int32), 0), num_rows)
    hi = tl.minimum(tl.maximum(tl.load(offsets_ptr + num_experts).to(tl.int32), lo), num_rows)
    row_ok = (rows >= lo) & (rows < hi)
    col_ok = cols < N
    mask = row_ok[:, None] & col_ok[None, :]
    width = 2 * N if GATED else N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for s in range(SPLIT_K):
        ws_ptrs = ws_ptr + (s * num_rows + rows).to(tl.int64)[:, None] * width + cols[None, :]
        acc += tl.load(ws_ptrs, mask=mask, other=0.0)
        if GATED:
            acc2 += tl.load(ws_ptrs + N, mask=mask, other=0.0)
    epilogue(acc, acc2, rows, row_ok, cols, col_ok, N, out_ptr, stride_om, h_ptr, stride_hm,
             slot_of_row_ptr, weight_of_row_ptr, num_out_rows, ACT, P0, P1, GATED)


@triton.jit
def grouped_gemm_act_backward_kernel(
    dy_ptr,  # [T, K]           rows gathered through token_of_row (K = H)
    token_of_row_ptr,  # [R] int32
    w_ptr,  # [E, K, N]         w_down [E, H, I] read as K=H, N=I; a quantized one's codes (W_FORMAT)
    w_scales_ptr, w_zeros_ptr,  # a quantized w_down's scales and zero points (quantized.WeightOperand)
    bias_ptr,  # [E, K]         b_down (None: no bias): its term of d(routing weight)
    offsets_ptr,  # [E+1] int
    h_ptr,  # [R, NW]           the forward's pre-activation, NW = 2N when GATED: gate columns, then up
    weight_of_row_ptr,  # [R] float32
    dh_ptr,  # [R, NW] out      d loss / d h, in w_gate_up's column order (gate_step, up_shift)
    act_ptr,  # [R, N] out      act(h), the input of the down projection
    drow_ptr,  # [cdiv(N, BLOCK_N), R] float32 out: per-tile parts of d loss / d routing weight
    num_rows, num_tokens, K, N, num_experts, num_m_tiles, gate_step, up_shift,
    stride_dym, stride_we, stride_wk, stride_wn, stride_wse, stride_wsr, stride_be, stride_hm, stride_dhm,
    stride_actm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, E_PAD: tl.constexpr,
    GROUP_M: tl.constexpr, ACT: tl.constexpr, P0: tl.constexpr, P1: tl.constexpr, GATED: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, EVEN_K: tl.constexpr,
    W_FORMAT: tl.constexpr, SCALE_ROWS: tl.constexpr, SCALE_COLS: tl.constexpr, Q_T: tl.constexpr,
):
    """Grid: (num_m_tiles * cdiv(N, BLOCK_N),), num_m_tiles = m_tile_bound(R, E, BLOCK_M).

    g = dy[token] @ w_down[e] (the gradient of act(h)), then in the epilogue:
    d_row = g . act(h) (+ dy[token] . b_down[e]), dh = act'(h) * g * routing weight.
    """
    expert, pid_n, rows, row_ok, cols, col_ok = expert_tile(offsets_ptr, num_m_tiles, num_rows, num_experts, N,
                                                            BLOCK_M, BLOCK_N, E_PAD, GROUP_M)
    if expert >= num_experts:
        return
    src, src_ok = load_index(token_of_row_ptr, rows, row_ok, num_tokens)
    dy_off = src.to(tl.int64) * stride_dym
    g, _ = mainloop(dy_ptr, dy_off, src_ok, w_ptr + expert.to(tl.int64) * stride_we, cols, col_ok, N,
                    w_scales_ptr, w_zeros_ptr, expert.to(tl.int64) * stride_wse, pid_n * BLOCK_N, N,
                    stride_wk, stride_wn, stride_wsr, 0, K, None, 0, BLOCK_M, BLOCK_N, BLOCK_K, False, PRECISION,
                    UPCAST, EVEN_K, W_FORMAT, SCALE_ROWS, SCALE_COLS, Q_T)

    # ---- the activation and its gradient, from the saved h (stores early: fewer live registers)
    mask = row_ok[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)
    h_ptrs = h_ptr + rows64[:, None] * stride_hm + cols[None, :]
    dh_ptrs = dh_ptr + rows64[:, None] * stride_dhm + (cols * gate_step)[None, :]
    gate = tl.load(h_ptrs, mask=mask, other=0.0).to(tl.float32)
    if GATED:
        up = tl.load(h_ptrs + N, mask=mask, other=0.0).to(tl.float32)
    else:
        up = gate
    act, d_gate, d_up = activate_grad(gate, up, ACT, P0, P1)
    weighted = g * tl.load(weight_of_row_ptr + rows, mask=row_ok, other=0.0)[:, None]
    tl.store(dh_ptrs, (weighted * d_gate).to(dh_ptr.dtype.element_ty), mask=mask)
    if GATED:
        tl.store(dh_ptrs + up_shift, (weighted * d_up).to(dh_ptr.dtype.element_ty), mask=mask)
    tl.store(act_ptr + rows64[:, None] * stride_actm + cols[None, :], act.to(act_ptr.dtype.element_ty), mask=mask)

    # ---- this tile's part of d(routing weight); the bias term once per row, in the first N-tile
    d_row = tl.sum(tl.where(mask, g * act, 0.0), axis=1)
    if bias_ptr is not None:
        if pid_n == 0:
            b_ptr = bias_ptr + expert.to(tl.int64) * stride_be
            for k0 in range(0, K, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                k_ok = ks < K
                d = tl.load(dy_ptr + dy_off[:, None] + ks[None, :], mask=src_ok[:, None] & k_ok[None, :], other=0.0)
                b = tl.load(b_ptr + ks, mask=k_ok, other=0.0)
                d_row += tl.sum(d.to(tl.float32) * b.to(tl.float32)[None, :], axis=1)
    tl.store(drow_ptr + pid_n * num_rows + rows, d_row, mask=row_ok)


@triton.jit
def row_parts_to_slots_kernel(
    parts_ptr,  # [P, R] float32
    row_of_slot_ptr,  # [T*k] int32
    out_ptr,  # [T*k] float32 out: sum_p parts[p, row_of_slot[s]]
    num_parts, num_rows, num_slots,
    BLOCK: tl.constexpr,
):
    """Grid: (cdiv(T*k, BLOCK),). Sums the parts in order: deterministic."""
    slots = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    slot_ok = slots < num_slots
    rows, ok = load_index(row_of_slot_ptr, slots, slot_ok, num_rows)
    total = tl.zeros([BLOCK], dtype=tl.float32)
    for p in range(0, num_parts):
        total += tl.load(parts_ptr + p * num_rows + rows, mask=ok, other=0.0)
    tl.store(out_ptr + slots, total, mask=slot_ok)


# ---- launchers -------------------------------------------------------------------------------


def _row_major(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def tma_can_read(w, gate_step: int = 1) -> bool:
    """Whether w: [E, K, NW] can be read through the TMA as [E * NW, K] rows: a float tensor, K
    contiguous, each expert's columns one after another (gate columns not interleaved with up
    ones), rows 16-byte aligned."""
    return (isinstance(w, torch.Tensor) and gate_step == 1 and w.transpose(1, 2).is_contiguous()
            and (w.shape[1] * w.element_size()) % 16 == 0
            and w.data_ptr() % 16 == 0)


def weight_descriptor(w, config: TileConfig, gate_step: int = 1) -> Optional[TensorDescriptor]:
    """A TMA descriptor of w as [E * NW, K] rows, blocks [BLOCK_N, BLOCK_K], when config asks
    for TMA and tma_can_read(w), else None (the kernel then loads W through pointers)."""
    if not (config.tma and tma_can_read(w, gate_step)):
        return None
    num_experts, k_dim, w_cols = w.shape
    rows = w.transpose(1, 2).view(num_experts * w_cols, k_dim)
    return TensorDescriptor(rows, shape=list(rows.shape), strides=[k_dim, 1],
                            block_shape=[config.block_n, config.block_k])


def m_tile_bound(num_rows: int, num_experts: int, block_m: int) -> int:
    """The most M-tiles R rows over E experts can need: each of the at most min(E, R)
    experts with rows adds at most one partial tile to cdiv(R, BLOCK_M)."""
    return triton.cdiv(num_rows, block_m) + min(num_experts, num_rows)


def activation_args(activation: Optional[Activation]) -> dict:
    """The kernels' ACT, P0, P1 and GATED for an activation (None: no activation)."""
    if activation is None:
        return dict(ACT=IDENTITY, P0=0.0, P1=0.0, GATED=False)
    p0, p1 = activation.params
    return dict(ACT=activation.code, P0=p0, P1=p1, GATED=activation.gated)


def grouped_gemm(
    a,
    w,
    offsets: torch.Tensor,
    config: TileConfig,
    *,
    bias: Optional[torch.Tensor] = None,
    a_rows: Optional[torch.Tensor] = None,
    activation: Optional[Activation] = None,
    gate_columns: tuple[int, int] = (1, 0),
    store_h: bool = False,
    slot_of_row: Optional[torch.Tensor] = None,
    weight_of_row: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(out, h) for the rows of each expert times its weight, with the fused prologue/epilogue.

    a: [R, K], or [S, K] gathered through a_rows: [R] int32; or either as an Fp8Rows (the
       activations quantized for a w8a8 fp8 weight w, read as q.mT; config.block_k divides 128)
    w: [E, K, NW] any strides; NW = 2N for a gated activation, whose gate column i is
       i * gate_columns[0] and up column that + gate_columns[1] (ExpertWeights.gate_up_columns);
       or a quantized weight read as one: q.mT, or q (quantized.weight_operand)
    offsets: [E+1] int32/int64; bias: [E, NW]; activation: applied in the epilogue (None: none)
    slot_of_row: [R] int32: out is [R, N] in slot order (row r stored at slot_of_row[r])
    weight_of_row: [R] float32: each row's result scaled by it
    out: [R, N] the activations' dtype, preallocated (rows may have any stride)
    Returns out: [R, N] the activations' dtype; h: [R, NW] the same, gate columns then up columns
    (store_h), or None.
    """
    operand = weight_operand(w)
    dtype = a.dtype  # the activations' (an Fp8Rows keeps it)
    a, a_scales = (a.codes, _w8a8_scales(a, operand, config)) if isinstance(a, Fp8Rows) else (_row_major(a), None)
    num_rows = a_rows.shape[0] if a_rows is not None else a.shape[0]
    num_experts, k_dim, w_cols = operand.shape
    act = activation_args(activation)
    n_cols = w_cols // 2 if act["GATED"] else w_cols
    out = torch.empty(num_rows, n_cols, dtype=dtype, device=a.device) if out is None else out
    h = torch.empty(num_rows, w_cols, dtype=dtype, device=a.device) if store_h else None
    if num_rows == 0 or n_cols == 0:
        return out, h
    bm, bn, split = config.block_m, config.block_n, config.split_k
    ws = torch.empty(split, num_rows, w_cols, dtype=torch.float32, device=a.device) if split > 1 else None
    gate_step, up_shift = gate_columns
    m_tiles = m_tile_bound(num_rows, num_experts, bm)
    # the epilogue's pointers: to the split-K reduction when K is split
    epilogue_h, epilogue_slots, epilogue_weights = (None, None, None) if split > 1 else (h, slot_of_row, weight_of_row)
    grouped_gemm_kernel[(m_tiles * triton.cdiv(n_cols, bn), split)](
        a, a_rows, a_scales, operand.data, operand.scales, operand.zeros, weight_descriptor(w, config, gate_step), bias,
        offsets, out, epilogue_h, epilogue_slots, epilogue_weights, ws,
        num_rows, a.shape[0], num_rows, k_dim, n_cols, num_experts, m_tiles, gate_step, up_shift,
        a.stride(0), a_scales.stride(0) if a_scales is not None else 0, *operand.strides,
        bias.stride(0) if bias is not None else 0, out.stride(0), h.stride(0) if h is not None else 0,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=config.block_k, E_PAD=expert_block(num_experts), GROUP_M=GROUP_M,
        SPLIT_K=split, PRECISION=dot_precision(dtype, a.device),
        # the interpreter multiplies float8 codes (w8a8) in float32 too, whatever the activations' dtype
        UPCAST=dot_upcast(dtype, a.device) or (a_scales is not None and a.device.type != "cuda"),
        EVEN_K=k_dim % config.block_k == 0, num_warps=config.num_warps, num_stages=config.num_stages, **act,
        **operand.meta,
    )
    if split > 1:
        splitk_reduce_kernel[(triton.cdiv(num_rows, bm), triton.cdiv(n_cols, bn))](
            ws, offsets, out, h, slot_of_row, weight_of_row,
            num_rows, num_rows, n_cols, num_experts, out.stride(0), h.stride(0) if h is not None else 0,
            SPLIT_K=split, BLOCK_M=bm, BLOCK_N=bn, num_warps=4, **act,
        )
    return out, h


def _w8a8_scales(a: Fp8Rows, operand, config: TileConfig) -> torch.Tensor:
    """a's scales, once the weight operand is one a w8a8 product reads: fp8 codes as q.mT with
    128-column blocks, in K-steps that divide 128; else a ValueError naming what is not."""
    meta = operand.meta
    # SCALE_COLS 0: one block spans K (K <= 128)
    if meta["W_FORMAT"] not in (FP8.value, FP8_NATIVE.value) or not meta["Q_T"] or meta["SCALE_COLS"] not in (0, GROUP):
        raise ValueError(f"quantized activations (w8a8) multiply an fp8 weight in blocks of {GROUP} columns read "
                         f"as q.mT; got weight meta {meta}")
    if GROUP % config.block_k:
        raise ValueError(f"a w8a8 product takes K-steps that divide {GROUP}; got block_k={config.block_k}")
    return a.scales


def grouped_gemm_act_backward(
    dy: torch.Tensor,
    token_of_row: torch.Tensor,
    w_down,
    b_down: Optional[torch.Tensor],
    offsets: torch.Tensor,
    h: torch.Tensor,
    weight_of_row: torch.Tensor,
    row_of_slot: torch.Tensor,
    activation: Activation,
    gate_columns: tuple[int, int],
    config: TileConfig,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward through the down projection and the activation.

    dy: [T, H]; token_of_row: [R] int32; w_down: [E, H, I] any strides, or quantized; b_down: [E, H] or None;
    h: [R, 2I or I] saved pre-activation, gate columns then up columns (grouped_gemm's);
    weight_of_row: [R] float32; row_of_slot: [T, k] int32.
    Returns dh: [R, 2I or I] dy's dtype, in w_gate_up's column order (gate_columns: see
    grouped_gemm), act: [R, I] dy's dtype (act(h)),
    dweights: [T, k] float32 (g . act(h) + dy[t] . b_down[e]).
    """
    dy, h = _row_major(dy), _row_major(h)
    num_rows = token_of_row.shape[0]
    operand = weight_operand(w_down)
    num_experts, k_dim, n_cols = operand.shape
    dh = dy.new_empty(h.shape)
    act = dy.new_empty(num_rows, n_cols)
    dweights = torch.zeros(row_of_slot.shape, dtype=torch.float32, device=dy.device)
    if num_rows == 0:
        return dh, act, dweights
    bm, bn = config.block_m, config.block_n
    n_tiles = triton.cdiv(n_cols, bn)
    m_tiles = m_tile_bound(num_rows, num_experts, bm)
    parts = torch.empty(n_tiles, num_rows, dtype=torch.float32, device=dy.device)
    grouped_gemm_act_backward_kernel[(m_tiles * n_tiles,)](
        dy, token_of_row, operand.data, operand.scales, operand.zeros, b_down, offsets, h, weight_of_row, dh, act,
        parts, num_rows, dy.shape[0], k_dim, n_cols, num_experts, m_tiles, *gate_columns,
        dy.stride(0), *operand.strides, b_down.stride(0) if b_down is not None else 0, h.stride(0), dh.stride(0),
        act.stride(0),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=config.block_k, E_PAD=expert_block(num_experts), GROUP_M=GROUP_M,
        PRECISION=dot_precision(dy.dtype, dy.device), UPCAST=dot_upcast(dy.dtype, dy.device),
        EVEN_K=k_dim % config.block_k == 0, num_warps=config.num_warps, num_stages=config.num_stages,
        **activation_args(activation), **operand.meta,
    )
    block = 256
    row_parts_to_slots_kernel[(triton.cdiv(row_of_slot.numel(), block),)](
        parts, row_of_slot, dweights, n_tiles, num_rows, row_of_slot.numel(), BLOCK=block
    )
    return dh, act, dweights
