"""The grouped matmul for experts with few rows: each task reads its block of one expert's
weights once and applies it to all of that expert's rows, so a small batch costs what
reading the active experts' weights costs. Experts with many rows, and weights whose K
is not contiguous, go to BLAS instead (see moe_dispatch/backends/numba_backend.py).

Weights are read as w[e] = [N, K] with K contiguous (nn.Linear layout, and what
transformers 5 stores): dot products over K. Sums are float32 (float64 for float64
inputs); 16-bit inputs are widened in registers.
"""

from __future__ import annotations

from numba import njit, prange

from .scalars import acc_zero, acc_zeros, narrow, widen

# reassoc/contract let LLVM vectorize the dot products (a sum's order changes, as in any
# BLAS); no nnan/ninf, so NaN and inf still propagate.
FASTMATH = {"reassoc", "contract", "nsz", "arcp"}


@njit(cache=True, inline="always", fastmath=FASTMATH)
def dot_rows_pair(src, index, gather, start, end, w_a, w_b, out_a, out_b):
    """out_a[i] = src[row] . w_a and out_b[i] = src[row] . w_b for i < end - start, where
    row = index[start + i] when gather, else start + i. Float32 sums (float64 for float64 src).

    Two weight rows stream through one loop: twice the loads in flight, which a
    bandwidth-bound decode step needs (measured: 33 GB/s on one core against 24-32 GB/s
    for one row at a time; four rows per loop fell to 18). Pass the same row twice for a
    single dot product.
    """
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
