"""The fused expert MLP for small batches (decode).

Decode runs in two parallel passes, each reading every active expert's weights once:
  gate_up_act:  GEMM1 loading its rows straight from x (no permuted copy), with the
                activation in its epilogue;
  down_combine: GEMM2 with the routing weight and the combine in its epilogue.
Weights are in the layout of transformers 5 experts (K contiguous): w_gate_up [E, W, H]
with W = 2I (gate rows, then up rows) or I, w_down [E, H, I]; packed bfloat16 weights
take their activations in the split layout (see grouped_mm.py), or, where the CPU has
AVX512-BF16 and K comes in whole steps, as bfloat16 bits (bf16_dots.py).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import prange

from .activations import FusedActivation, activate, is_gated
from .bf16_dots import STEP, TAKES_BF16_DOTS
from .caching import njit
from .grouped_mm import FASTMATH, dot_rows_pair, dot_rows_quad, split_col
from .plan import make_plan_serial
from .routing import route_rows
from .scalars import acc_zeros, narrow, widen
from .vector_width import wide_vectors


class DecodeExperts(NamedTuple):
    """The experts as the decode kernels read them."""

    w_gate_up: np.ndarray  # [E, W, H] (16-bit as bits), or bfloat16 packed in uint32 words [E, W, H/2]
    b_gate_up: np.ndarray  # [E, W] float32 (float64 for float64), [1, 1] when absent
    has_b_gate_up: bool
    w_down: np.ndarray  # [E, H, I], or packed [E, H, I/2]
    b_down: np.ndarray  # [E, H] float32 (float64)
    has_b_down: bool
    gate_up_packed: bool  # w_gate_up packed: x reaches GEMM1 in the split layout
    down_packed: bool  # w_down packed: the activations reach GEMM2 in the split layout
    act: FusedActivation


class DecodeTiles(NamedTuple):
    """How the decode kernels cut their work into tasks."""

    block_gate_up: int  # intermediate columns per GEMM1 task (even)
    quad_rows: int  # rows per active expert from which the GEMMs read 4 weight rows a pass
    block_down: int  # output columns per GEMM2 task


@njit(cache=True, inline="always")
def gate_up_values(dots, p, q, r, e, col_a, col_b, bias, has_bias, save_h, h):
    """Row r's sums dots[p, q] of weight row col_a and dots[p + 1, q] of row col_b with their
    biases, kept in h when save_h."""
    g = dots[p, q] + bias[e, col_a] if has_bias else dots[p, q]
    u = dots[p + 1, q] + bias[e, col_b] if has_bias else dots[p + 1, q]
    if save_h:
        h[r, col_a] = narrow(g, h.dtype)
        h[r, col_b] = narrow(u, h.dtype)
    return g, u


@njit(cache=True, inline="always")
def gate_up_epilogue(dots, p, q, r, e, i, col_a, col_b, bias, has_bias, save_h, h, act, inter, split_a, a):
    """Row r's outputs from the sums dots[p, q] of weight row col_a and dots[p + 1, q] of row
    col_b: gated, the gate and up of intermediate column i; plain, columns col_a and col_b."""
    g, u = gate_up_values(dots, p, q, r, e, col_a, col_b, bias, has_bias, save_h, h)
    # one call site of the activation, inlined: gated, one output; plain, one per column
    for c in range(1 if is_gated(act) else 2):
        col = i if is_gated(act) else (col_a if c == 0 else col_b)
        a[r, split_col(col, inter, split_a)] = activate(g if c == 0 else u, u, act)


@njit(cache=True, parallel=True, fastmath=FASTMATH)
def gate_up_act(x, token_of_row, w, bias, has_bias, offsets, experts, inter, act, block, quad, save_h, h,
                split_a, a):
    """h[r] = x[token_of_row[r]] @ w[e].T + bias[e] and a[r] = act(h[r]) for the rows of each e.

    x: [T, H], float32 (float64), split when w is packed, or bfloat16 bits (uint16) for
    packed w where the dot products take them (bf16_dots.py); token_of_row: [R] int32;
    w: [E, W, H] (or packed); bias: [E, W] float32 (read when has_bias); offsets: [E+1] int32;
    experts: [A] int32, the experts with rows; inter: I; act: FusedActivation (gated: W = 2I,
    gate row i at i * act.step, up row at i * act.step + act.shift); block: even; quad: gated
    columns go two at a time (four weight rows per pass; see below); h: [R, W] out (the
    weights' type, written when save_h); a: [R, I] out, float32 (float64 for float64 x), in
    the split layout when split_a.
    Grid: A * ceil(I / block) tasks, one per (expert, block of intermediate columns); a
    gated task reads the gate row and the up row of each column together.
    """
    num_blocks = (inter + block - 1) // block
    step, shift = act.step, act.shift
    for task in prange(experts.shape[0] * num_blocks):
        wide_vectors()
        e = experts[task // num_blocks]
        i0 = (task % num_blocks) * block
        width = min(block, inter - i0)
        start, end = offsets[e], offsets[e + 1]
        dots = acc_zeros((4, end - start), x.dtype)
        if is_gated(act) and quad:
            # Columns s and s + half of the block together: four weight rows in four
            # sequential streams, faster where many rows make the step compute-bound,
            # slower than two rows when reading the weights bounds it (docs/cpu.md).
            half = (width + 1) // 2
            for s in range(half):
                i = i0 + s
                j = i + half if s + half < width else i
                dot_rows_quad(x, token_of_row, True, start, end, w[e, i * step], w[e, i * step + shift],
                              w[e, j * step], w[e, j * step + shift], dots)
                for q in range(end - start):
                    for p, col in ((0, i), (2, j)):
                        gate_up_epilogue(dots, p, q, start + q, e, col, col * step, col * step + shift, bias,
                                          has_bias, save_h, h, act, inter, split_a, a)
        else:
            # Gated: column i's gate row with its up row. Plain: columns i and i + 1.
            for i in range(i0, i0 + width, 1 if is_gated(act) else 2):
                col_a, col_b = (i * step, i * step + shift) if is_gated(act) else (i, min(i + 1, inter - 1))
                dot_rows_pair(x, token_of_row, True, start, end, w[e, col_a], w[e, col_b], dots)
                for q in range(end - start):
                    gate_up_epilogue(dots, 0, q, start + q, e, i, col_a, col_b, bias, has_bias, save_h, h, act,
                                      inter, split_a, a)


@njit(cache=True, inline="always")
def _add_columns(dots, p, c, d, skip, c0, e, start, end, token_of_row, row_weight, bias, has_bias, acc):
    """acc[t, col - c0] += row_weight * (dots[p or p + 1, q] + bias[e, col]) for the rows q of
    expert e (token t) and col c (sums dots[p]) and d (dots[p + 1]), each unless it is skip
    (a part past the block's end; -1 for none) and d unless it is c."""
    for q in range(end - start):
        t, weight = token_of_row[start + q], row_weight[start + q]
        if c != skip:
            v = dots[p, q] + bias[e, c] if has_bias else dots[p, q]
            acc[t, c - c0] += weight * v
        if d != c and d != skip:
            v = dots[p + 1, q] + bias[e, d] if has_bias else dots[p + 1, q]
            acc[t, d - c0] += weight * v


@njit(cache=True, parallel=True, fastmath=FASTMATH)
def down_combine(a, w, bias, has_bias, offsets, experts, token_of_row, row_weight, block, quad, out):
    """out[t] = sum over the rows r of token t of row_weight[r] * (a[r] @ w[e].T + bias[e]).

    a: [R, I] float32 (float64), split when w is packed, or bfloat16 bits as for
    gate_up_act's x; w: [E, H, I] (or packed);
    bias: [E, H] float32 (read when has_bias); offsets: [E+1] int32; experts: [A] int32;
    token_of_row: [R] int32; row_weight: [R] float32; block: columns per task; quad: four
    weight rows per pass (as gate_up_act's); out: [T, H] (the weights' type). Grid:
    ceil(H / block) tasks, each owning a block of output columns for every token, so no two
    tasks add into the same element.
    """
    num_tokens = out.shape[0]
    hidden = w.shape[1]
    num_blocks = (hidden + block - 1) // block
    most_rows = 0
    for ei in range(experts.shape[0]):
        most_rows = max(most_rows, offsets[experts[ei] + 1] - offsets[experts[ei]])
    for task in prange(num_blocks):
        wide_vectors()
        c0 = task * block
        width = min(block, hidden - c0)
        acc = acc_zeros((num_tokens, width), a.dtype)
        # Allocated once per task, not per expert: thousands of small allocations per call
        # cost as much as a small step's dot products.
        dots = acc_zeros((4, most_rows), a.dtype)
        # Streams that each read a part of the block's rows in order: sequential streams keep
        # the hardware prefetcher ahead, better than neighbouring rows (streams that jump at
        # every step). Two halves where reading the weights bounds the step (four quarters read
        # slower there, docs/cpu.md, "down_combine"), four where many rows make it
        # compute-bound (quad).
        streams = 4 if quad else 2
        part = (width + streams - 1) // streams
        for ei in range(experts.shape[0]):
            e = experts[ei]
            start, end = offsets[e], offsets[e + 1]
            for s in range(part):
                c = c0 + s
                # a part past the block's end repeats column c, whose sums it then leaves out
                d = c + part if s + part < width else c
                if quad:
                    f = c + 2 * part if s + 2 * part < width else c
                    g = c + 3 * part if s + 3 * part < width else c
                    dot_rows_quad(a, token_of_row, False, start, end, w[e, c], w[e, d], w[e, f], w[e, g], dots)
                    _add_columns(dots, 2, f, g, c, c0, e, start, end, token_of_row, row_weight, bias, has_bias,
                                 acc)
                else:
                    dot_rows_pair(a, token_of_row, False, start, end, w[e, c], w[e, d], dots)
                _add_columns(dots, 0, c, d, -1, c0, e, start, end, token_of_row, row_weight, bias, has_bias, acc)
        for t in range(num_tokens):
            for c in range(width):
                out[t, c0 + c] = narrow(acc[t, c], out.dtype)


# What moe_mlp_decode returns: whether it ran, or refused an index array before reading through it.
DECODE_OK, BAD_INDEX = 0, 1
# What moe_mlp_decode_ids returns when the step is not one for the fused kernels.
NOT_DECODE = -1


@njit(cache=True)
def decode_inputs(x, weights, offsets, token_of_row, row_of_slot, split_x):
    """What a decode step starts from: (whether every index lies in its range (if not, the
    rest is empty and nothing may be computed), x widened to float32 (float64 for float64
    weights; split when split_x), each row's routing weight [R], the active experts int32).

    x: [T, H] (16-bit as bits); weights: [T, k] float32 (float64); offsets: [E+1] int32,
    already checked; token_of_row: [R] int32; row_of_slot: [T, k] int32.
    """
    num_tokens, hidden = x.shape
    num_rows = token_of_row.shape[0]
    ok = True
    for r in range(num_rows):
        ok &= 0 <= token_of_row[r] < num_tokens
    for t in range(num_tokens):
        for j in range(row_of_slot.shape[1]):
            ok &= 0 <= row_of_slot[t, j] < num_rows
    if not ok:
        return False, acc_zeros((0, 0), weights.dtype), acc_zeros(0, weights.dtype), np.empty(0, dtype=np.int32)
    x_wide = acc_zeros((num_tokens, hidden), weights.dtype)
    for t in range(num_tokens):
        # row views indexed by the loop's own counter: split_col's index took a negative
        # index's wraparound on every element, and the loop did not vectorize
        row, wide = x[t], x_wide[t]
        if split_x:
            half = hidden // 2
            evens, odds = wide[:half], wide[half:]
            for i in range(half):
                evens[i], odds[i] = widen(row[2 * i]), widen(row[2 * i + 1])
        else:
            for c in range(hidden):
                wide[c] = widen(row[c])
    row_weight = acc_zeros(num_rows, weights.dtype)
    for t in range(num_tokens):
        for j in range(row_of_slot.shape[1]):
            row_weight[row_of_slot[t, j]] = weights[t, j]
    num_active = 0
    for e in range(offsets.shape[0] - 1):
        num_active += offsets[e + 1] > offsets[e]
    active = np.empty(num_active, dtype=np.int32)
    num_active = 0
    for e in range(offsets.shape[0] - 1):
        if offsets[e + 1] > offsets[e]:
            active[num_active] = e
            num_active += 1
    return True, x_wide, row_weight, active


@njit(cache=True)
def moe_mlp_decode(x, weights, offsets, token_of_row, row_of_slot, experts, tiles, save_h, h, out):
    """The decode step on a plan; see _decode_step."""
    return _decode_step(x, weights, offsets, token_of_row, row_of_slot, experts, tiles, save_h, h, out)


@njit(cache=True)
def _decode_step(x, weights, offsets, token_of_row, row_of_slot, experts, tiles, save_h, h, out):
    """The whole decode step in one call from Python: check the plan's index arrays, widen x
    (split when the weights are packed; packed weights that take bf16_dots read x as it is),
    scatter the routing weights to rows, then gate_up_act and down_combine. Each operation Python runs costs tens of microseconds
    when a step starts with cold caches, as a decode step between other layers does; here
    they cost a loop each.

    x: [T, H] (16-bit as bits); weights: [T, k] float32 (float64); offsets: [E+1] int32,
    already checked; token_of_row: [R] int32; row_of_slot: [T, k] int32; experts:
    DecodeExperts; tiles: DecodeTiles; h: [R, W] out (the weights' type, written when
    save_h); out: [T, H] out (x's type). Returns DECODE_OK, or BAD_INDEX when an index falls
    outside its range (and then computes nothing).
    """
    # Packed bfloat16 weights meet bfloat16 activations in bf16_dots where the CPU multiplies
    # them in one instruction: x as it is, and the GEMM2 input rounded to bfloat16 once, as the
    # blocked path and the reference round it.
    hidden = x.shape[1]
    inter = experts.w_down.shape[2] * 2 if experts.down_packed else experts.w_down.shape[2]
    bf16_gate_up = TAKES_BF16_DOTS and experts.gate_up_packed and hidden % STEP == 0
    bf16_down = TAKES_BF16_DOTS and experts.down_packed and inter % STEP == 0
    ok, x_wide, row_weight, active = decode_inputs(x, weights, offsets, token_of_row, row_of_slot,
                                                   experts.gate_up_packed and not bf16_gate_up)
    if not ok:
        return BAD_INDEX
    num_rows, num_active = token_of_row.shape[0], active.shape[0]
    quad = num_rows >= tiles.quad_rows * num_active
    split_a = experts.down_packed and not bf16_down
    a = acc_zeros((num_rows, inter), weights.dtype)
    if bf16_gate_up:
        gate_up_act(x, token_of_row, experts.w_gate_up, experts.b_gate_up, experts.has_b_gate_up, offsets, active,
                    inter, experts.act, tiles.block_gate_up, quad, save_h, h, split_a, a)
    else:
        gate_up_act(x_wide, token_of_row, experts.w_gate_up, experts.b_gate_up, experts.has_b_gate_up, offsets,
                    active, inter, experts.act, tiles.block_gate_up, quad, save_h, h, split_a, a)
    if bf16_down:
        down_combine(bfloat16_bits(a), experts.w_down, experts.b_down, experts.has_b_down, offsets, active,
                     token_of_row, row_weight, tiles.block_down, quad, out)
    else:
        down_combine(a, experts.w_down, experts.b_down, experts.has_b_down, offsets, active, token_of_row,
                     row_weight, tiles.block_down, quad, out)
    return DECODE_OK


@njit(cache=True)
def bfloat16_bits(a):
    """a [R, I] float32 rounded to bfloat16, as bits."""
    bits = np.empty(a.shape, dtype=np.uint16)
    for r in range(a.shape[0]):
        for c in range(a.shape[1]):
            bits[r, c] = narrow(a[r, c], bits.dtype)
    return bits


@njit(cache=True)
def decode_plan(ids, num_experts, rows_limit):
    """The plan of a decode step's expert ids, by a serial counting sort (a decode step has
    few slots): (status, offsets, token_of_row, row_of_slot). status: the number of ids
    outside [0, E), NOT_DECODE when the active experts receive more than rows_limit rows on
    average (a step for the blocked path), else 0, and then the arrays are the plan.
    """
    num_tokens, top_k = ids.shape
    offsets = np.empty(num_experts + 1, dtype=np.int32)
    token_of_row = np.empty(num_tokens * top_k, dtype=np.int32)
    row_of_slot = np.empty((num_tokens, top_k), dtype=np.int32)
    num_bad = make_plan_serial(ids, num_experts, np.int64(1), np.empty(num_experts, dtype=np.int32), offsets,
                               token_of_row, row_of_slot)
    if num_bad:
        return num_bad, offsets, token_of_row, row_of_slot
    num_active = 0
    for e in range(num_experts):
        num_active += offsets[e + 1] > offsets[e]
    if token_of_row.shape[0] > rows_limit * num_active:
        return NOT_DECODE, offsets, token_of_row, row_of_slot
    return 0, offsets, token_of_row, row_of_slot


@njit(cache=True)
def step_plan(x, weights, ids, routing, num_experts, rows_limit):
    """decode_plan of ids, after routing.route_rows has routed x's rows into weights and ids
    where routing (a routing.Routing) holds a layer's router (a layer's whole step in one
    call); routing.NO_ROUTING leaves both as the caller gave them."""
    if routing.router.shape[0] != 0:
        route_rows(x, routing, weights, ids)
    return decode_plan(ids, num_experts, rows_limit)


@njit(cache=True)
def moe_mlp_decode_ids(x, weights, ids, routing, num_experts, rows_limit, experts, tiles, out):
    """The decode step from the expert ids, the plan built in the same call, for a call that
    needs neither the plan nor h: ids [T, k] int; routing: a layer's, or routing.NO_ROUTING,
    as step_plan takes it; num_experts: E; rows_limit: the most rows per active expert, on
    average, the fused kernels take; the rest as for _decode_step. Returns decode_plan's
    status: nothing is computed unless it is 0.
    """
    status, offsets, token_of_row, row_of_slot = step_plan(x, weights, ids, routing, num_experts, rows_limit)
    if status:
        return status
    # save_h as a runtime bool (always false here), not a constant: _decode_step and the
    # kernels then compile once for both entry points, not once each.
    _decode_step(x, weights, offsets, token_of_row, row_of_slot, experts, tiles, status != 0,
                 np.empty((0, experts.w_gate_up.shape[1]), dtype=out.dtype), out)
    return 0
