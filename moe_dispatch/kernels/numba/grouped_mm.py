"""The grouped matmul for experts with few rows: each task reads its block of one expert's
weights once and applies it to all of that expert's rows, so a small batch costs what
reading the active experts' weights costs. Experts with many rows, and weights whose K
is not contiguous, go to BLAS instead (see moe_dispatch/backends/numba_backend.py).

Weights are read as w[e] = [N, K] with K contiguous (nn.Linear layout, and what
transformers 5 stores): dot products over K. Sums are float32 (float64 for float64
inputs); 16-bit inputs are widened in registers.

Contiguous bfloat16 weights with an even K arrive packed, two elements per uint32 word
(`scalars.bf16_pair` splits a word with a shift and a mask). Their activations then come
in the split layout: each float32 row holds its even elements, then its odd ones
(`split_col`), so the word k of a weight row meets src[r, k] and src[r, K/2 + k], two
contiguous loads, where interleaved loads cost shuffles in the innermost loop.
"""

from __future__ import annotations

import numpy as np
from numba import prange, types
from numba.extending import overload

from .bf16_dots import bf16_dots, bf16_quad_dots
from .caching import njit
from .outer_products import ROWS, STRIP_BYTES, product_tile, row_offsets, strip_product
from .scalars import acc_zero, acc_zeros, bf16_pair, narrow, widen
from .vector_width import wide_vectors

# reassoc/contract let LLVM vectorize the dot products (a sum's order changes, as in any
# BLAS); no nnan/ninf, so NaN and inf still propagate.
FASTMATH = {"reassoc", "contract", "nsz", "arcp"}
# Rows of a weight gradient per task: a strip of b's rows (the expert's rows) serves this many.
BLOCK_WGRAD = 8 * ROWS

@njit(cache=True, inline="always")
def split_col(col, depth, split):
    """Where column col of a depth-wide row lies in the split layout (when split)."""
    return col // 2 + (col % 2) * (depth // 2) if split else col


def dot_rows_pair(src, index, gather, start, end, w_a, w_b, out):
    """out[0, i] = src[row] . w_a and out[1, i] = src[row] . w_b for i < end - start, where
    row = index[start + i] when gather, else start + i. Float32 sums (float64 for float64 src).

    w_a, w_b: weight rows of src's depth K; or bfloat16 rows packed as uint32 words (K / 2 of
    them), and then src is float32 in the split layout, or bfloat16 bits (uint16) in element
    order (bf16_dots.py; K a multiple of its STEP). Two weight rows stream through one loop:
    twice the loads in flight, which a bandwidth-bound decode step needs. Pass a row twice for
    one dot product.
    """
    if src.dtype == np.uint16 and w_a.dtype == np.uint32:
        bf16_dots(src, index, gather, start, end, w_a, w_b, out)
    elif w_a.dtype == np.uint32:
        _dot_rows_pair_packed(src, index, gather, start, end, w_a, w_b, out)
    else:
        _dot_rows_pair_plain(src, index, gather, start, end, w_a, w_b, out)


def dot_rows_quad(src, index, gather, start, end, w0, w1, w2, w3, out):
    """dot_rows_pair over four weight rows: out[j, i] = src[row] . w_j for j < 4.

    More multiply-adds per load, for steps that many rows per expert make compute-bound
    (gate_up_act's quad); where streaming the weights bounds a step, two rows stream faster.
    """
    if src.dtype == np.uint16 and w0.dtype == np.uint32:
        bf16_quad_dots(src, index, gather, start, end, w0, w1, w2, w3, out)
    elif w0.dtype == np.uint32:
        _dot_rows_quad_packed(src, index, gather, start, end, w0, w1, w2, w3, out)
    else:
        _dot_rows_quad_plain(src, index, gather, start, end, w0, w1, w2, w3, out)


@overload(dot_rows_pair, inline="always")
def _dot_rows_pair(src, index, gather, start, end, w_a, w_b, out):
    if src.dtype == types.uint16 and w_a.dtype == types.uint32:  # bfloat16 activations: bf16_dots.py
        kernel = bf16_dots
    else:
        kernel = _dot_rows_pair_packed if w_a.dtype == types.uint32 else _dot_rows_pair_plain
    return lambda src, index, gather, start, end, w_a, w_b, out: kernel(src, index, gather, start, end, w_a, w_b, out)


@overload(dot_rows_quad, inline="always")
def _dot_rows_quad(src, index, gather, start, end, w0, w1, w2, w3, out):
    if src.dtype == types.uint16 and w0.dtype == types.uint32:
        return lambda src, index, gather, start, end, w0, w1, w2, w3, out: bf16_quad_dots(
            src, index, gather, start, end, w0, w1, w2, w3, out)
    if w0.dtype == types.uint32:
        return lambda src, index, gather, start, end, w0, w1, w2, w3, out: _dot_rows_quad_packed(
            src, index, gather, start, end, w0, w1, w2, w3, out
        )

    return lambda src, index, gather, start, end, w0, w1, w2, w3, out: _dot_rows_quad_plain(
        src, index, gather, start, end, w0, w1, w2, w3, out
    )


@njit(cache=True, inline="always", fastmath=FASTMATH)
def _dot_rows_pair_plain(src, index, gather, start, end, w_a, w_b, out):
    # Rows go two at a time: four sums per pass, one load per multiply-add where one row at
    # a time needed 1.5 (float32 at 64 rows per expert: the loads bound the loop).
    num = end - start
    for i in range(0, num - 1, 2):
        r = index[start + i] if gather else start + i
        s = index[start + i + 1] if gather else start + i + 1
        ra = acc_zero(src.dtype)
        rb = acc_zero(src.dtype)
        sa = acc_zero(src.dtype)
        sb = acc_zero(src.dtype)
        for k in range(w_a.shape[0]):
            wa, wb = widen(w_a[k]), widen(w_b[k])
            xr, xs = widen(src[r, k]), widen(src[s, k])
            ra += xr * wa
            rb += xr * wb
            sa += xs * wa
            sb += xs * wb
        out[0, i], out[1, i], out[0, i + 1], out[1, i + 1] = ra, rb, sa, sb
    if num % 2:
        i = num - 1
        r = index[start + i] if gather else start + i
        dot_a = acc_zero(src.dtype)
        dot_b = acc_zero(src.dtype)
        for k in range(w_a.shape[0]):
            xv = widen(src[r, k])
            dot_a += xv * widen(w_a[k])
            dot_b += xv * widen(w_b[k])
        out[0, i], out[1, i] = dot_a, dot_b


@njit(cache=True, inline="always", fastmath=FASTMATH)
def _dot_rows_quad_plain(src, index, gather, start, end, w0, w1, w2, w3, out):
    # Two rows against four weight rows: eight sums per pass, six loads for eight
    # multiply-adds where two pairs took eight.
    num = end - start
    for i in range(0, num - 1, 2):
        r = index[start + i] if gather else start + i
        s = index[start + i + 1] if gather else start + i + 1
        r0 = r1 = r2 = r3 = s0 = s1 = s2 = s3 = acc_zero(src.dtype)
        for k in range(w0.shape[0]):
            xr, xs = widen(src[r, k]), widen(src[s, k])
            v0, v1, v2, v3 = widen(w0[k]), widen(w1[k]), widen(w2[k]), widen(w3[k])
            r0 += xr * v0
            r1 += xr * v1
            r2 += xr * v2
            r3 += xr * v3
            s0 += xs * v0
            s1 += xs * v1
            s2 += xs * v2
            s3 += xs * v3
        out[0, i], out[1, i], out[2, i], out[3, i] = r0, r1, r2, r3
        out[0, i + 1], out[1, i + 1], out[2, i + 1], out[3, i + 1] = s0, s1, s2, s3
    if num % 2:
        _dot_rows_pair_plain(src, index, gather, start + num - 1, end, w0, w1, out[:2, num - 1:])
        _dot_rows_pair_plain(src, index, gather, start + num - 1, end, w2, w3, out[2:, num - 1:])


@njit(cache=True, inline="always", fastmath=FASTMATH)
def _dot_rows_pair_packed(src, index, gather, start, end, w_a, w_b, out):
    # Rows go two at a time, so each widened weight word feeds four sums.
    half = w_a.shape[0]
    num = end - start
    for i in range(0, num - 1, 2):
        r = index[start + i] if gather else start + i
        s = index[start + i + 1] if gather else start + i + 1
        ra = rb = sa = sb = np.float32(0.0)
        for k in range(half):
            r_lo, r_hi, s_lo, s_hi = src[r, k], src[r, half + k], src[s, k], src[s, half + k]
            lo, hi = bf16_pair(w_a[k])
            ra += r_lo * lo + r_hi * hi
            sa += s_lo * lo + s_hi * hi
            lo, hi = bf16_pair(w_b[k])
            rb += r_lo * lo + r_hi * hi
            sb += s_lo * lo + s_hi * hi
        out[0, i], out[1, i], out[0, i + 1], out[1, i + 1] = ra, rb, sa, sb
    if num % 2:
        i = num - 1
        r = index[start + i] if gather else start + i
        ra = rb = np.float32(0.0)
        for k in range(half):
            r_lo, r_hi = src[r, k], src[r, half + k]
            lo, hi = bf16_pair(w_a[k])
            ra += r_lo * lo + r_hi * hi
            lo, hi = bf16_pair(w_b[k])
            rb += r_lo * lo + r_hi * hi
        out[0, i], out[1, i] = ra, rb


@njit(cache=True, inline="always", fastmath=FASTMATH)
def _dot_rows_quad_packed(src, index, gather, start, end, w0, w1, w2, w3, out):
    # Rows go two at a time, so each widened weight word feeds four sums.
    half = w0.shape[0]
    num = end - start
    for i in range(0, num - 1, 2):
        r = index[start + i] if gather else start + i
        s = index[start + i + 1] if gather else start + i + 1
        r0 = r1 = r2 = r3 = s0 = s1 = s2 = s3 = np.float32(0.0)
        for k in range(half):
            r_lo, r_hi, s_lo, s_hi = src[r, k], src[r, half + k], src[s, k], src[s, half + k]
            lo, hi = bf16_pair(w0[k])
            r0 += r_lo * lo + r_hi * hi
            s0 += s_lo * lo + s_hi * hi
            lo, hi = bf16_pair(w1[k])
            r1 += r_lo * lo + r_hi * hi
            s1 += s_lo * lo + s_hi * hi
            lo, hi = bf16_pair(w2[k])
            r2 += r_lo * lo + r_hi * hi
            s2 += s_lo * lo + s_hi * hi
            lo, hi = bf16_pair(w3[k])
            r3 += r_lo * lo + r_hi * hi
            s3 += s_lo * lo + s_hi * hi
        out[0, i], out[1, i], out[2, i], out[3, i] = r0, r1, r2, r3
        out[0, i + 1], out[1, i + 1], out[2, i + 1], out[3, i + 1] = s0, s1, s2, s3
    if num % 2:
        i = num - 1
        r = index[start + i] if gather else start + i
        r0 = r1 = r2 = r3 = np.float32(0.0)
        for k in range(half):
            r_lo, r_hi = src[r, k], src[r, half + k]
            lo, hi = bf16_pair(w0[k])
            r0 += r_lo * lo + r_hi * hi
            lo, hi = bf16_pair(w1[k])
            r1 += r_lo * lo + r_hi * hi
            lo, hi = bf16_pair(w2[k])
            r2 += r_lo * lo + r_hi * hi
            lo, hi = bf16_pair(w3[k])
            r3 += r_lo * lo + r_hi * hi
        out[0, i], out[1, i], out[2, i], out[3, i] = r0, r1, r2, r3


@njit(cache=True, parallel=True, fastmath=FASTMATH)
def grouped_mm_nk(a, w, bias, has_bias, offsets, experts, block, quad_rows, out):
    """out[r] = a[r] @ w[e].T (+ bias[e]) for the rows r of every expert e in experts.

    a: [R, K], float32 in the split layout when w is packed; w: [E, N, K] (or packed
    [E, N, K/2]); bias: [E, N] float32 (read when has_bias); offsets: [E+1] int32;
    experts: [A] int32, the experts to compute; block: a multiple of 4; quad_rows: the rows
    from which an expert's columns go four at a time (dot_rows_quad), else two; out: [R, N].
    Grid: A * ceil(N / block) tasks, one per (expert, block of output columns).
    """
    num_cols = w.shape[1]
    num_blocks = (num_cols + block - 1) // block
    for task in prange(experts.shape[0] * num_blocks):
        wide_vectors()
        e = experts[task // num_blocks]
        n0 = (task % num_blocks) * block
        start, end = offsets[e], offsets[e + 1]
        dots = acc_zeros((4, end - start), a.dtype)
        width = 4 if end - start >= quad_rows else 2
        for n in range(n0, min(n0 + block, num_cols), width):
            # the last columns of a count off the width repeat the last one
            cols = (n, min(n + 1, num_cols - 1), min(n + 2, num_cols - 1), min(n + 3, num_cols - 1))
            if width == 4:
                dot_rows_quad(a, offsets, False, start, end, w[e, cols[0]], w[e, cols[1]], w[e, cols[2]],
                              w[e, cols[3]], dots)
            else:
                dot_rows_pair(a, offsets, False, start, end, w[e, cols[0]], w[e, cols[1]], dots)
            for j in range(width):
                c = cols[j]
                for i in range(end - start):
                    v = dots[j, i] + bias[e, c] if has_bias else dots[j, i]
                    out[start + i, c] = narrow(v, out.dtype)


@njit(cache=True, parallel=True)
def grouped_mm_kn(a, w, bias, has_bias, offsets, experts, out):
    """out[r] = a[r] @ w[e] (+ bias[e]) for the rows r of every expert e in experts, by
    register tiles (outer_products.py).

    a: [R, K] float32 or float64; w: [E, K, N] of a's dtype, N contiguous (w_down [E, H, I] in
    GEMM1's gradient, w_gate_up [E, 2I, H] in x's); bias: [E, N] (read when has_bias);
    offsets: [E+1] int32; experts: [A] int32; out: [R, N].
    Grid: A * ceil(N / strip) tasks, one per (expert, strip of columns), each taking the
    expert's rows against the strip (outer_products.strip_product).
    """
    depth, width = w.shape[1], w.shape[2]
    strip = STRIP_BYTES // a.itemsize
    strips = (width + strip - 1) // strip
    flat_a, flat_w, flat_out = a.reshape(-1), w.reshape(-1), out.reshape(-1)
    for task in prange(experts.shape[0] * strips):
        e = experts[task // strips]
        n0 = (task % strips) * strip
        columns = min(strip, width - n0)
        start, end = offsets[e], offsets[e + 1]
        strip_product(flat_a, start * depth, depth, end - start, depth, flat_w, e * depth * width + n0, width, flat_out,
                      start * width + n0, width, columns)
        if has_bias:
            for i in range(start, end):
                for j in range(n0, n0 + columns):
                    out[i, j] += bias[e, j]


@njit(cache=True, parallel=True)
def grouped_mm_wgrad(a, b, offsets, out):
    """out[e] = a[rows of e].T @ b[rows of e] for every expert e, zeros where e has no rows:
    a weight gradient, by register tiles (outer_products.py).

    a: [R, M], b: [R, N], both float32 or both float64; offsets: [E+1] int32; out: [E, M, N].
    Grid: E * ceil(M / BLOCK_WGRAD) * ceil(N / strip) tasks, each (expert, block of M, strip
    of N) taking its block ROWS rows of out at a time; a tile's depth is the expert's rows.
    """
    num_experts, height, width = out.shape
    strip = STRIP_BYTES // a.itemsize
    strips = (width + strip - 1) // strip
    blocks = (height + BLOCK_WGRAD - 1) // BLOCK_WGRAD
    flat_a, flat_b, flat_out = a.reshape(-1), b.reshape(-1), out.reshape(-1)
    for task in prange(num_experts * blocks * strips):
        e = task // (blocks * strips)
        m0 = (task // strips) % blocks * BLOCK_WGRAD
        n0 = (task % strips) * strip
        columns = min(strip, width - n0)
        start, depth = offsets[e], offsets[e + 1] - offsets[e]
        for m in range(m0, min(m0 + BLOCK_WGRAD, height), ROWS):
            count = min(ROWS, height - m)
            rows = row_offsets(start * height, m, count, 1)
            product_tile(flat_a, rows, count, height, flat_b, start * width + n0, width, depth, flat_out,
                         (e * height + m) * width + n0, width, columns, False, rows, 0)
