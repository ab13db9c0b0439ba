"""The grouped matmul for experts with few rows: each task reads its block of one expert's
weights once and applies it to all of that expert's rows, so a small batch costs what
reading the active experts' weights costs. Experts with many rows, and weights whose K
is not contiguous, go to BLAS instead (see moe_dispatch/backends/numba_backend.py).

Weights are read as w[e] = [N, K] with K contiguous (nn.Linear layout, and what
transformers 5 stores): dot products over K. Sums are float32 (float64 for float64
inputs); 16-bit inputs are widened in registers.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from .scalars import acc_zero, acc_zeros, bf16_pair, narrow, widen

# reassoc/contract let LLVM vectorize the dot products (a sum's order changes, as in any
# BLAS); no nnan/ninf, so NaN and inf still propagate.
FASTMATH = {"reassoc", "contract", "nsz", "arcp"}


def dot_rows_pair(src, index, gather, start, end, w_a, w_b, out_a, out_b):
    """out_a[i] = src[row] . w_a and out_b[i] = src[row] . w_b for i < end - start, where
    row = index[start + i] when gather, else start + i. Float32 sums (float64 for float64 src).

    w_a, w_b: weight rows of src's depth K, or bfloat16 rows packed in uint32 (K / 2 words).
    Two weight rows stream through one loop: twice the loads in flight, which a
    bandwidth-bound decode step needs (measured: 33 GB/s on one core against 24-32 GB/s
    for one row at a time; four rows per loop fell to 18). Pass the same row twice for a
    single dot product.
    """
    if w_a.dtype == np.uint32:
        _dot_rows_pair_packed(src, index, gather, start, end, w_a, w_b, out_a, out_b)
    else:
        _dot_rows_pair_plain(src, index, gather, start, end, w_a, w_b, out_a, out_b)


@overload(dot_rows_pair, inline="always")
def _dot_rows_pair(src, index, gather, start, end, w_a, w_b, out_a, out_b):
    kernel = _dot_rows_pair_packed if w_a.dtype == types.uint32 else _dot_rows_pair_plain
    return lambda src, index, gather, start, end, w_a, w_b, out_a, out_b: kernel(
        src, index, gather, start, end, w_a, w_b, out_a, out_b
    )


@njit(cache=True, inline="always", fastmath=FASTMATH)
def _dot_rows_pair_plain(src, index, gather, start, end, w_a, w_b, out_a, out_b):
    depth = w_a.shape[0]
    for i in range(end - start):
        r = index[start + i] if gather else start + i
        dot_a = acc_zero(src.dtype)
        dot_b = acc_zero(src.dtype)
        for k in range(depth):
            xv = widen(src[r, k])
            dot_a += xv * widen(w_a[k])
            dot_b += xv * widen(w_b[k])
        out_a[i], out_b[i] = dot_a, dot_b


@njit(cache=True, inline="always", fastmath=FASTMATH)
def _dot_rows_pair_packed(src, index, gather, start, end, w_a, w_b, out_a, out_b):
    # bfloat16 weights as uint32 words: loading 16-bit elements one by one kept LLVM from
    # vectorizing the widening, and the loop streamed at half of torch.sum's bandwidth.
    # Rows go two at a time, so each widened weight word feeds four sums.
    num = end - start
    for i in range(0, num - 1, 2):
        r = index[start + i] if gather else start + i
        s = index[start + i + 1] if gather else start + i + 1
        ra = acc_zero(src.dtype)
        rb = acc_zero(src.dtype)
        sa = acc_zero(src.dtype)
        sb = acc_zero(src.dtype)
        for k in range(w_a.shape[0]):
            a_lo, a_hi = bf16_pair(w_a[k])
            b_lo, b_hi = bf16_pair(w_b[k])
            r_lo, r_hi = widen(src[r, 2 * k]), widen(src[r, 2 * k + 1])
            s_lo, s_hi = widen(src[s, 2 * k]), widen(src[s, 2 * k + 1])
            ra += r_lo * a_lo + r_hi * a_hi
            rb += r_lo * b_lo + r_hi * b_hi
            sa += s_lo * a_lo + s_hi * a_hi
            sb += s_lo * b_lo + s_hi * b_hi
        out_a[i], out_b[i], out_a[i + 1], out_b[i + 1] = ra, rb, sa, sb
    if num % 2:
        i = num - 1
        r = index[start + i] if gather else start + i
        dot_a = acc_zero(src.dtype)
        dot_b = acc_zero(src.dtype)
        for k in range(w_a.shape[0]):
            x_lo, x_hi = widen(src[r, 2 * k]), widen(src[r, 2 * k + 1])
            a_lo, a_hi = bf16_pair(w_a[k])
            b_lo, b_hi = bf16_pair(w_b[k])
            dot_a += x_lo * a_lo + x_hi * a_hi
            dot_b += x_lo * b_lo + x_hi * b_hi
        out_a[i], out_b[i] = dot_a, dot_b


@njit(cache=True, parallel=True, fastmath=FASTMATH)
def grouped_mm_nk(a, w, bias, has_bias, offsets, experts, block, out):
    """out[r] = a[r] @ w[e].T (+ bias[e]) for the rows r of every expert e in experts.

    a: [R, K]; w: [E, N, K]; bias: [E, N] float32 (read when has_bias); offsets: [E+1] int32;
    experts: [A] int32, the experts to compute; block: even; out: [R, N] (a's type).
    Grid: A * ceil(N / block) tasks, one per (expert, block of output columns).
    """
    num_cols = w.shape[1]
    num_blocks = (num_cols + block - 1) // block
    for task in prange(experts.shape[0] * num_blocks):
        e = experts[task // num_blocks]
        n0 = (task % num_blocks) * block
        start, end = offsets[e], offsets[e + 1]
        acc_a = acc_zeros(end - start, a.dtype)
        acc_b = acc_zeros(end - start, a.dtype)
        for n in range(n0, min(n0 + block, num_cols), 2):
            m = min(n + 1, num_cols - 1)  # the last column of an odd count pairs with itself
            dot_rows_pair(a, offsets, False, start, end, w[e, n], w[e, m], acc_a, acc_b)
            for i in range(end - start):
                va = acc_a[i] + bias[e, n] if has_bias else acc_a[i]
                vb = acc_b[i] + bias[e, m] if has_bias else acc_b[i]
                out[start + i, n] = narrow(va, out.dtype)
                out[start + i, m] = narrow(vb, out.dtype)
