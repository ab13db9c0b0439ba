"""The fused expert MLP for small batches (decode).

Decode runs in two parallel passes, each reading every active expert's weights once:
  gate_up_act:  GEMM1 loading its rows straight from x (no permuted copy), with the
                activation in its epilogue;
  down_combine: GEMM2 with the routing weight and the combine in its epilogue.
Weights are in the layout of transformers 5 experts (K contiguous): w_gate_up [E, W, H]
with W = 2I (gate rows, then up rows) or I, w_down [E, H, I].
"""

from __future__ import annotations

from numba import njit, prange

from .grouped_mm import FASTMATH, dot_rows_pair
from .scalars import acc_zeros, act_value, narrow


@njit(cache=True, parallel=True, fastmath=FASTMATH)
def gate_up_act(x, token_of_row, w, bias, has_bias, offsets, experts, inter, gated, code, block, save_h, h, a):
    """h[r] = x[token_of_row[r]] @ w[e].T + bias[e] and a[r] = act(h[r]) for the rows of each e.

    x: [T, H], float32 (float64) or w's type; token_of_row: [R] int32; w: [E, W, H];
    bias: [E, W] float32 (read when has_bias); offsets: [E+1] int32; experts: [A] int32, the
    experts with rows; inter: I; gated: W = 2I and a = act(gate) * up; code: the activation
    (scalars.py); block: even; h: [R, W] out (w's type, written when save_h);
    a: [R, I] out, float32 (float64 for float64 x).
    Grid: A * ceil(I / block) tasks, one per (expert, block of intermediate columns); a
    gated task reads the gate row and the up row of each column together.
    """
    num_blocks = (inter + block - 1) // block
    for task in prange(experts.shape[0] * num_blocks):
        e = experts[task // num_blocks]
        i0 = (task % num_blocks) * block
        start, end = offsets[e], offsets[e + 1]
        first = acc_zeros(end - start, x.dtype)
        second = acc_zeros(end - start, x.dtype)
        # Gated: column i's gate row with its up row. Plain: columns i and i + 1.
        step = 1 if gated else 2
        for i in range(i0, min(i0 + block, inter), step):
            j = inter + i if gated else min(i + 1, inter - 1)
            dot_rows_pair(x, token_of_row, True, start, end, w[e, i], w[e, j], first, second)
            for q in range(end - start):
                g = first[q] + bias[e, i] if has_bias else first[q]
                u = second[q] + bias[e, j] if has_bias else second[q]
                if save_h:
                    h[start + q, i] = narrow(g, h.dtype)
                    h[start + q, j] = narrow(u, h.dtype)
                if gated:
                    a[start + q, i] = act_value(g, code) * u
                else:
                    a[start + q, i] = act_value(g, code)
                    a[start + q, j] = act_value(u, code)


@njit(cache=True, parallel=True, fastmath=FASTMATH)
def down_combine(a, w, bias, has_bias, offsets, experts, token_of_row, row_weight, block, out):
    """out[t] = sum over the rows r of token t of row_weight[r] * (a[r] @ w[e].T + bias[e]).

    a: [R, I] float32 (float64); w: [E, H, I]; bias: [E, H] float32 (read when has_bias);
    offsets: [E+1] int32; experts: [A] int32; token_of_row: [R] int32; row_weight: [R] float32;
    out: [T, H] (w's type). Grid: ceil(H / block) tasks, each owning a block of output
    columns for every token, so no two tasks add into the same element.
    """
    num_tokens = out.shape[0]
    hidden = w.shape[1]
    num_blocks = (hidden + block - 1) // block
    most_rows = 0
    for ei in range(experts.shape[0]):
        most_rows = max(most_rows, offsets[experts[ei] + 1] - offsets[experts[ei]])
    for task in prange(num_blocks):
        c0 = task * block
        width = min(block, hidden - c0)
        acc = acc_zeros((num_tokens, width), a.dtype)
        # Allocated once per task, not per expert: thousands of small allocations per call
        # cost as much as the dot products at T=16.
        dots_a = acc_zeros(most_rows, a.dtype)
        dots_b = acc_zeros(most_rows, a.dtype)
        for ei in range(experts.shape[0]):
            e = experts[ei]
            start, end = offsets[e], offsets[e + 1]
            for c in range(0, width, 2):
                d = min(c + 1, width - 1)  # the last column of an odd width pairs with itself
                dot_rows_pair(a, token_of_row, False, start, end, w[e, c0 + c], w[e, c0 + d], dots_a, dots_b)
                for q in range(end - start):
                    sa = dots_a[q] + bias[e, c0 + c] if has_bias else dots_a[q]
                    sb = dots_b[q] + bias[e, c0 + d] if has_bias else dots_b[q]
                    t = token_of_row[start + q]
                    acc[t, c] += row_weight[start + q] * sa
                    if d != c:
                        acc[t, d] += row_weight[start + q] * sb
        for t in range(num_tokens):
            for c in range(width):
                out[t, c0 + c] = narrow(acc[t, c], out.dtype)
