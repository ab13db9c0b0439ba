"""Per-expert weight and bias gradients: GEMMs whose reduction runs over each expert's rows.

dW[e] = A[rows of e].T @ B[rows of e] is a grouped GEMM with a variable K (the expert's row
count, read from the offsets on the device). Either operand's rows may be gathered through
token_of_row, and A's rows scaled by the routing weight, so neither dy * weight nor x in
expert order is ever materialized.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .indices import gathered
from .tiles import TileConfig, dot_precision, dot_upcast


@triton.jit
def grouped_wgrad_kernel(
    a_ptr,  # [Sa, M]   rows gathered through a_rows_ptr when given, else [R, M]
    a_rows_ptr,  # [R] int32 (None: no gather)
    a_scale_ptr,  # [R] float32 (None: no scale)
    b_ptr,  # [Sb, N]   rows gathered through b_rows_ptr when given, else [R, N]
    b_rows_ptr,  # [R] int32 (None: no gather)
    offsets_ptr,  # [E+1] int
    out_ptr,  # [E, M, N] out
    num_rows, num_a_rows, num_b_rows, M, N,
    stride_am, stride_bm, stride_oe, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Grid: (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N), E). An expert without rows gets zeros."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.program_id(2)
    lo = tl.minimum(tl.maximum(tl.load(offsets_ptr + expert).to(tl.int32), 0), num_rows)
    hi = tl.minimum(tl.maximum(tl.load(offsets_ptr + expert + 1).to(tl.int32), lo), num_rows)
    ms = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = ms < M
    n_ok = ns < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(lo, hi, BLOCK_K):
        rs = r0 + tl.arange(0, BLOCK_K)
        r_ok = rs < hi
        a_src, a_ok = gathered(a_rows_ptr, rs, r_ok, num_a_rows)
        b_src, b_ok = gathered(b_rows_ptr, rs, r_ok, num_b_rows)
        # A read transposed: [BLOCK_M, BLOCK_K]
        a = tl.load(a_ptr + a_src.to(tl.int64)[None, :] * stride_am + ms[:, None],
                    mask=m_ok[:, None] & a_ok[None, :], other=0.0)
        if a_scale_ptr is not None:
            scale = tl.load(a_scale_ptr + rs, mask=r_ok, other=0.0)
            a = (a.to(tl.float32) * scale[None, :]).to(a_ptr.dtype.element_ty)
        b = tl.load(b_ptr + b_src.to(tl.int64)[:, None] * stride_bm + ns[None, :],
                    mask=b_ok[:, None] & n_ok[None, :], other=0.0)
        if UPCAST:  # the interpreter cannot multiply bf16 in tl.dot
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    out_ptrs = out_ptr + expert.to(tl.int64) * stride_oe + ms.to(tl.int64)[:, None] * stride_om + ns[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def expert_sums_kernel(
    src_ptr,  # [S, N] rows gathered through rows_ptr when given, else [R, N]
    rows_ptr,  # [R] int32 (None: no gather)
    scale_ptr,  # [R] float32 (None: no scale)
    offsets_ptr,  # [E+1] int
    out_ptr,  # [E, N] float32 out
    num_rows, num_src_rows, N, stride_src,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Grid: (cdiv(N, BLOCK_N), E). out[e] = sum of expert e's rows (scaled), in row order."""
    pid_n = tl.program_id(0)
    expert = tl.program_id(1)
    lo = tl.minimum(tl.maximum(tl.load(offsets_ptr + expert).to(tl.int32), 0), num_rows)
    hi = tl.minimum(tl.maximum(tl.load(offsets_ptr + expert + 1).to(tl.int32), lo), num_rows)
    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = ns < N
    acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    for r0 in range(lo, hi, BLOCK_R):
        rs = r0 + tl.arange(0, BLOCK_R)
        src, ok = gathered(rows_ptr, rs, rs < hi, num_src_rows)
        v = tl.load(src_ptr + src.to(tl.int64)[:, None] * stride_src + ns[None, :],
                    mask=ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
        if scale_ptr is not None:
            v *= tl.load(scale_ptr + rs, mask=ok, other=0.0)[:, None]
        acc += v
    tl.store(out_ptr + expert * N + ns, tl.sum(acc, axis=0), mask=n_ok)


def _row_major(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def pipeline_stages(config: TileConfig, gathered: bool) -> int:
    """num_stages for grouped_wgrad_kernel. Gathered rows are loaded in the K loop and feed the
    addresses of its tiles: Triton's pipeliner spends a stage on those indices, so one more
    keeps two tiles in flight (with config.num_stages alone, loads and math take turns). It then
    buffers fewer tiles than stages: the shared memory stays within what config.num_stages
    needs without a gather."""
    return config.num_stages + gathered


def grouped_wgrad(
    a: torch.Tensor,
    b: torch.Tensor,
    offsets: torch.Tensor,
    num_experts: int,
    config: TileConfig,
    *,
    a_rows: Optional[torch.Tensor] = None,
    a_scale: Optional[torch.Tensor] = None,
    b_rows: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """out[e] = (a_scale * A)[rows of e].T @ B[rows of e] in float32, stored in a's dtype.

    a: [R, M] or [Sa, M] gathered through a_rows: [R] int32; a_scale: [R] float32 per row;
    b: [R, N] or [Sb, N] gathered through b_rows: [R] int32; offsets: [E+1] int.
    Returns [E, M, N], zeros for an expert without rows.
    """
    a, b = _row_major(a), _row_major(b)
    num_rows = (a_rows if a_rows is not None else a).shape[0]
    m_dim, n_dim = a.shape[1], b.shape[1]
    out = a.new_empty(num_experts, m_dim, n_dim)
    if out.numel() == 0:
        return out
    grid = (triton.cdiv(m_dim, config.block_m), triton.cdiv(n_dim, config.block_n), num_experts)
    grouped_wgrad_kernel[grid](
        a, a_rows, a_scale, b, b_rows, offsets, out,
        num_rows, a.shape[0], b.shape[0], m_dim, n_dim, a.stride(0), b.stride(0), out.stride(0), out.stride(1),
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, PRECISION=dot_precision(a.dtype, a.device), UPCAST=dot_upcast(a.dtype, a.device),
        num_warps=config.num_warps, num_stages=pipeline_stages(config, a_rows is not None or b_rows is not None),
    )
    return out


def expert_sums(
    src: torch.Tensor,
    offsets: torch.Tensor,
    num_experts: int,
    *,
    rows: Optional[torch.Tensor] = None,
    scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """[E, N] float32: the sum over each expert's rows of src (gathered through rows, times scale).

    src: [R, N] or [S, N] with rows: [R] int32; scale: [R] float32; offsets: [E+1] int.
    """
    src = _row_major(src)
    num_rows = (rows if rows is not None else src).shape[0]
    out = torch.zeros(num_experts, src.shape[1], dtype=torch.float32, device=src.device)
    if out.numel() == 0 or num_rows == 0:
        return out
    block_n = min(256, triton.next_power_of_2(src.shape[1]))
    expert_sums_kernel[(triton.cdiv(src.shape[1], block_n), num_experts)](
        src, rows, scale, offsets, out, num_rows, src.shape[0], src.shape[1], src.stride(0),
        BLOCK_R=16, BLOCK_N=block_n,
    )
    return out
