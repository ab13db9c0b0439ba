"""The expert MLP of float and bfloat16 experts with dozens of rows each, on register tiles
(outer_products.py), GEMM1 and GEMM2 computed transposed:

  h^T = w_gate_up[e] @ x_e^T,  a^T = act(h^T),  o^T = w_down[e] @ a^T

so that the weights are read as they are stored (rows of K, the tiles' left operand: one
element broadcast per multiply-add of a strip of rows) and only the activations are
transposed: each chunk of up to 128 float32 rows of one expert is gathered from x into x^T,
and its o^T written back as rows for the combine. The weights stay one copy in their own
layout, as training updates them, and each is read once per chunk; the chunk's operands
(x^T, h^T, a^T, o^T) stay in a thread's cache from GEMM1 to GEMM2.

The dot-product kernels (mlp.py) read each weight row once for all of an expert's rows and
serve the few rows of a decode step; at dozens of rows per expert and a small K their
horizontal sums and scalar epilogues cost more than the products (H=I=64: 33 GFLOP/s on two
cores), and the library's products pay a call and a gathered copy per expert.

bfloat16 experts (expert_mlp_bf16) go through the same steps on pairs of bfloat16 along K (the
tiles' bfloat16 operands): x^T and a^T hold one 32-bit word of two elements per row and pair,
h^T and o^T float32 sums, a^T rounded to bfloat16 once as the blocked path rounds it. Where
the CPU multiplies bfloat16 pairs in one instruction (AVX512-BF16) a tile runs at the rate
oneDNN's bfloat16 product reaches on large matrices, already at 64 rows, where oneDNN's
per-expert products run at half of it (docs/cpu.md, "bfloat16 experts on register tiles").
"""

from __future__ import annotations

import numpy as np
from numba import prange, types
from numba.extending import overload

from .activations import activate, activate_strip, is_gated
from .caching import njit
from .outer_products import LINE, STRIP_BYTES, VECTOR_BYTES, strip_parts, strip_product
from .quantized import dequantize_experts
from .scalars import narrow
from .transposes import BLOCK, transpose_block
from .vector_width import wide_vectors

# Rows of an expert that go through GEMM1 and GEMM2 together (128 float32): the weights are
# read once per chunk (olmoe-1b-7b x0.25 ran as fast with chunks of 64, 128 or 256 rows).
CHUNK_BYTES = 2 * STRIP_BYTES
# Intermediate columns of a bfloat16 chunk's GEMM1 and activation at a time (an even number:
# a^T's rows go in pairs): their h^T, 256 rows of a chunk's 144, is 147 KB.
INTER_BLOCK = 128
# Units of work (a chunk's part of the intermediate columns) per thread, at least, for the
# threads of a bfloat16 expert MLP to share them evenly: mixtral-8x7b's 8 experts of 64 rows
# each one chunk, uneven by a few rows, on two threads went as 5 chunks and 3 (intermediate_parts).
UNITS_PER_THREAD = 8
# The most bytes of float32 outputs the parts of the chunks may hold until they are added.
PARTS_BYTES = 64 << 20


@njit(cache=True)
def chunks(offsets, size):
    """(expert, first row) of each chunk of at most size rows of every expert with rows."""
    count = 0
    for e in range(offsets.shape[0] - 1):
        count += (offsets[e + 1] - offsets[e] + size - 1) // size
    expert, first = np.empty(count, dtype=np.int32), np.empty(count, dtype=np.int32)
    count = 0
    for e in range(offsets.shape[0] - 1):
        for r in range(offsets[e], offsets[e + 1], size):
            expert[count], first[count] = e, r
            count += 1
    return expert, first


@njit(cache=True)
def chunk_costs(offsets, expert, first, size, lanes):
    """What each chunk of at most size rows costs the tiles, sums of lanes to a vector: the
    parts of vectors its strips take (strip_parts)."""
    costs = np.empty(expert.shape[0], dtype=np.int64)
    for chunk in range(expert.shape[0]):
        costs[chunk] = strip_parts(min(size, offsets[expert[chunk] + 1] - first[chunk]), lanes)
    return costs


@njit(cache=True)
def balanced_ranges(costs, slots):
    """bounds [slots + 1]: slot s takes units bounds[s] to bounds[s + 1], consecutive ones of
    about equal cost in all (experts' rows are uneven), each boundary on the side of a unit
    where the running cost comes nearer its share."""
    total = costs.sum()
    bounds = np.empty(slots + 1, dtype=np.int64)
    bounds[0], done, slot = 0, 0, 1
    for unit in range(costs.shape[0]):
        before = done
        done += costs[unit]
        while slot < slots and done * slots >= total * slot:
            after = done * slots - total * slot <= total * slot - before * slots
            bounds[slot] = unit + 1 if after else unit
            slot += 1
    bounds[slot:] = costs.shape[0]
    return bounds


@njit(cache=True)
def intermediate_parts(num_chunks, slots, blocks, output_bytes):
    """Parts of INTER_BLOCK columns into which each chunk's intermediate columns go, at most
    blocks: one where the chunks are many, more where they are few against the threads
    (UNITS_PER_THREAD), so that a few large experts still share out evenly; as many as hold
    an output of output_bytes (float32) each within PARTS_BYTES."""
    if num_chunks == 0:
        return 1
    wanted = min(blocks, (UNITS_PER_THREAD * slots + num_chunks - 1) // num_chunks)
    return max(1, min(wanted, PARTS_BYTES // max(output_bytes, 1)))


@njit(cache=True, inline="always")
def part_blocks(part, parts, blocks):
    """(first, end): the INTER_BLOCK blocks of intermediate columns of a chunk's part."""
    return part * blocks // parts, (part + 1) * blocks // parts


@njit(cache=True, parallel=True)
def expert_mlp(x, token_of_row, w_gate_up, b_gate_up, has_b_gate_up, w_down, b_down, has_b_down, offsets, act,
               slots, save_h, h, o):
    """o[r] = w_down[e] @ act(h[r]) + b_down[e] with h[r] = w_gate_up[e] @ x[token_of_row[r]] +
    b_gate_up[e], for the rows r of every expert e.

    x: [T, H]; token_of_row: [R] int32, checked; w_gate_up: [E, W, H]; w_down: [E, H, I], all
    float32 or all float64; b_gate_up [E, W], b_down [E, H] (read when has_...); offsets: [E+1]
    int32, checked; act: FusedActivation (gated: W = 2I); slots: the threads, which take runs of
    chunks of about equal rows (balanced_ranges); h: [R, W] out (written when save_h); o: [R, H] out.
    """
    hidden, width, inter = x.shape[1], w_gate_up.shape[1], w_down.shape[2]
    chunk_rows = CHUNK_BYTES // x.itemsize
    # the chunk's rows one cache line apart from a power of two: rows 1 KB apart fell into four
    # of L1's sets, and transposing through them missed at every element
    lead = chunk_rows + LINE // x.itemsize
    expert, first = chunks(offsets, chunk_rows)
    slots = max(1, min(slots, expert.shape[0]))
    scratch = np.empty((slots, (2 * hidden + width + inter) * lead), dtype=x.dtype)
    flat_x, flat_gate_up, flat_down = x.reshape(-1), w_gate_up.reshape(-1), w_down.reshape(-1)
    flat_h, flat_o = h.reshape(-1), o.reshape(-1)
    bounds = balanced_ranges(chunk_costs(offsets, expert, first, chunk_rows, VECTOR_BYTES // x.itemsize), slots)
    for slot in prange(slots):
        wide_vectors()
        xt = scratch[slot, :hidden * lead]
        ht = scratch[slot, hidden * lead:(hidden + width) * lead]
        at = scratch[slot, (hidden + width) * lead:(hidden + width + inter) * lead]
        ot = scratch[slot, (hidden + width + inter) * lead:]
        starts = np.empty(BLOCK, dtype=np.int64)
        for chunk in range(bounds[slot], bounds[slot + 1]):
            e, r0 = expert[chunk], first[chunk]
            rows = min(chunk_rows, offsets[e + 1] - r0)
            gather_columns(flat_x, hidden, token_of_row, r0, rows, xt, lead, starts)
            strip_product(flat_gate_up, e * width * hidden, hidden, width, hidden, xt, 0, lead, ht, 0, lead, rows)
            if has_b_gate_up:
                _add_bias(ht, lead, rows, b_gate_up, e, 0, width)
            if save_h:
                columns_to_rows(ht, lead, rows, width, flat_h, r0 * width, starts)
            for i in range(inter):
                gate = i * act.step if is_gated(act) else i
                up = gate + act.shift if is_gated(act) else i
                activate_strip(ht[gate * lead:], ht[up * lead:], at[i * lead:], rows, act)
            strip_product(flat_down, e * hidden * inter, inter, hidden, inter, at, 0, lead, ot, 0, lead, rows)
            columns_to_rows(ot, lead, rows, hidden, flat_o, r0 * hidden, starts)
            if has_b_down:
                for j in range(r0, r0 + rows):
                    for n in range(hidden):
                        o[j, n] += b_down[e, n]


@njit(cache=True, parallel=True)
def expert_mlp_bf16(x, token_of_row, w_gate_up, b_gate_up, has_b_gate_up, w_down, b_down, has_b_down, offsets, act,
                    slots, save_h, h, o):
    """expert_mlp of bfloat16 x and weights, as uint32 words of two bfloat16 along K (the lower
    address first): x [T, H/2], w_gate_up [E, W, H/2], w_down [E, H, I/2], or either a
    quantized.QuantizedRows of [E, N, K], each expert dequantized to bfloat16 into its thread's
    buffer as its first chunk comes; b_gate_up [E, W] and b_down [E, H] float32; h [R, W] and
    o [R, H] bfloat16 bits (uint16) out. Where the chunks are few, each one's intermediate
    columns go to the threads in parts (intermediate_parts), each part's o summed in float32
    over its columns and the parts added once all are done."""
    pairs = x.shape[1]
    width, _ = matrix_shape(w_gate_up)
    hidden, inter_pairs = matrix_shape(w_down)
    inter, num_rows = 2 * inter_pairs, o.shape[0]
    chunk_rows = CHUNK_BYTES // x.itemsize
    lead = chunk_rows + LINE // x.itemsize  # as in expert_mlp
    expert, first = chunks(offsets, chunk_rows)
    blocks = (inter + INTER_BLOCK - 1) // INTER_BLOCK
    # quantized experts are dequantized whole by each thread that takes a part of them
    parts = 1
    if in_place(w_gate_up) and in_place(w_down):
        parts = intermediate_parts(expert.shape[0], slots, blocks, num_rows * hidden * 4)
    costs = chunk_costs(offsets, expert, first, chunk_rows, VECTOR_BYTES // 4)
    unit_costs = np.empty(expert.shape[0] * parts, dtype=np.int64)
    for unit in range(unit_costs.shape[0]):
        b0, b1 = part_blocks(unit % parts, parts, blocks)
        unit_costs[unit] = costs[unit // parts] * (b1 - b0)
    slots = max(1, min(slots, unit_costs.shape[0]))
    words = np.empty((slots, (pairs + inter_pairs) * lead), dtype=np.uint32)
    block_rows = 2 * min(INTER_BLOCK, inter)  # of h^T: a block's gates and ups
    sums = np.empty((slots, (block_rows + hidden) * lead + chunk_rows * max(block_rows, hidden)), dtype=np.float32)
    # each part's o, summed once every part is done
    partial = np.empty((parts if parts > 1 else 0) * num_rows * hidden, dtype=np.float32)
    gate_up_buffers, down_buffers = expert_buffers(w_gate_up, slots), expert_buffers(w_down, slots)
    flat_x = x.reshape(-1)
    bounds = balanced_ranges(unit_costs, slots)
    for slot in prange(slots):
        wide_vectors()
        xt, at = words[slot, :pairs * lead], words[slot, pairs * lead:]
        ht, ot = sums[slot, :block_rows * lead], sums[slot, block_rows * lead:(block_rows + hidden) * lead]
        o_rows = sums[slot, (block_rows + hidden) * lead:]
        starts = np.empty(BLOCK, dtype=np.int64)  # of a block's rows in the source
        gate_up, down, last, last_chunk = xt[:0], xt[:0], -1, -1
        for unit in range(bounds[slot], bounds[slot + 1]):
            chunk, part = unit // parts, unit % parts
            e, r0 = expert[chunk], first[chunk]
            rows = min(chunk_rows, offsets[e + 1] - r0)
            if e != last:
                gate_up = expert_words(w_gate_up, e, gate_up_buffers[slot])
                down = expert_words(w_down, e, down_buffers[slot])
                last = e
            if chunk != last_chunk:
                gather_columns(flat_x, pairs, token_of_row, r0, rows, xt, lead, starts)
                last_chunk = chunk
            b0, b1 = part_blocks(part, parts, blocks)
            i_first, i_end = b0 * INTER_BLOCK, min(inter, b1 * INTER_BLOCK)
            # GEMM1 and the activation a block of intermediate columns at a time: their h^T stays in
            # L2 (all of Mixtral's 14336 rows of h^T would be 8 MB)
            for i0 in range(i_first, i_end, INTER_BLOCK):
                count = min(INTER_BLOCK, inter - i0)
                # h's rows of the block: one run (interleaved, or no gate: step 1, shift 0), or the
                # gates' and the ups' (gates first: step 1, shift I)
                runs = 2 if act.step == 1 and act.shift > 0 else 1
                run_rows = count * act.step
                for run in range(runs):
                    n0 = i0 * act.step + run * act.shift
                    strip_product(gate_up, n0 * pairs, pairs, run_rows, pairs, xt, 0, lead, ht, run * run_rows * lead,
                                  lead, rows)
                    if has_b_gate_up:
                        _add_bias(ht[run * run_rows * lead:], lead, rows, b_gate_up, e, n0, run_rows)
                    if save_h:
                        columns_to_rows(ht[run * run_rows * lead:], lead, rows, run_rows, o_rows, 0, starts)
                        _rounded_rows(o_rows, rows, run_rows, h, r0, n0, b_gate_up, e, False)
                up_shift = run_rows if runs == 2 else act.shift
                step = act.step
                # two rows of a^T at a time, each element rounded once into its half of a word
                for i in range(0, count, 2):
                    activate_pairs(ht[i * step * lead:], ht[(i * step + up_shift) * lead:], ht[(i + 1) * step * lead:],
                                   ht[((i + 1) * step + up_shift) * lead:], at[((i0 + i) // 2) * lead:], rows, act)
            strip_product(down, i_first // 2, inter_pairs, hidden, (i_end - i_first) // 2, at, i_first // 2 * lead,
                          lead, ot, 0, lead, rows)
            if parts == 1:
                columns_to_rows(ot, lead, rows, hidden, o_rows, 0, starts)
                _rounded_rows(o_rows, rows, hidden, o, r0, 0, b_down, e, has_b_down)
            else:
                columns_to_rows(ot, lead, rows, hidden, partial, (part * num_rows + r0) * hidden, starts)
    if parts > 1:
        for chunk in prange(expert.shape[0]):
            e, r0 = expert[chunk], first[chunk]
            rows = min(chunk_rows, offsets[e + 1] - r0)
            # the other parts added into the first's rows a part at a time: loops along the rows
            # that vectorize, where a sum over the parts for each element did not
            total = partial[r0 * hidden:(r0 + rows) * hidden]
            for part in range(1, parts):
                other = partial[(part * num_rows + r0) * hidden:(part * num_rows + r0 + rows) * hidden]
                for n in range(rows * hidden):
                    total[n] += other[n]
            _rounded_rows(total, rows, hidden, o, r0, 0, b_down, e, has_b_down)


def matrix_shape(w):
    """(N, K/2) of each expert of w: [E, N, K/2] bfloat16 words, or quantized.QuantizedRows."""
    if isinstance(w, np.ndarray):
        return w.shape[1], w.shape[2]
    return w.codes.shape[1], w.depth // 2


def in_place(w):
    """Whether the tiles read w's own words (not a quantized weight dequantized per expert)."""
    return isinstance(w, np.ndarray)


def expert_buffers(w, slots):
    """A buffer per thread for one expert of w dequantized to bfloat16 (none for words)."""
    return np.empty((slots, 0 if isinstance(w, np.ndarray) else w.codes.shape[1] * w.depth), dtype=np.uint16)


def expert_words(w, e, buffer):
    """Expert e of w as flat bfloat16 words: a view of w's, or dequantized into buffer."""
    if isinstance(w, np.ndarray):
        return w[e].reshape(-1)
    dequantize_experts(w, np.full(1, e, dtype=np.int32), buffer.reshape(1, w.codes.shape[1], w.depth))
    return buffer.view(np.uint32)


@overload(matrix_shape, inline="always")
def _matrix_shape(w):
    if isinstance(w, types.Array):
        return lambda w: (w.shape[1], w.shape[2])
    return lambda w: (w.codes.shape[1], w.depth // 2)


@overload(in_place, inline="always")
def _in_place(w):
    is_array = isinstance(w, types.Array)
    return lambda w: is_array


@overload(expert_buffers, inline="always")
def _expert_buffers(w, slots):
    if isinstance(w, types.Array):
        return lambda w, slots: np.empty((slots, 0), dtype=np.uint16)
    return lambda w, slots: np.empty((slots, w.codes.shape[1] * w.depth), dtype=np.uint16)


@overload(expert_words, inline="always")
def _expert_words(w, e, buffer):
    if isinstance(w, types.Array):
        return lambda w, e, buffer: w[e].reshape(-1)

    def dequantized(w, e, buffer):
        dequantize_experts(w, np.full(1, e, dtype=np.int32), buffer.reshape(1, w.codes.shape[1], w.depth))
        return buffer.view(np.uint32)
    return dequantized


@njit(cache=True, inline="always")
def _add_bias(ht, lead, rows, bias, e, n0, count):
    """ht[n * lead + j] += bias[e, n0 + n] for n < count rows of a chunk's h^T, j < rows."""
    for n in range(count):
        for j in range(rows):
            ht[n * lead + j] += bias[e, n0 + n]


@njit(cache=True, inline="always")
def activate_pairs(gate_low, up_low, gate_high, up_high, out, count, act):
    """out[j] = the bfloat16 bits of activate(gate_low[j], up_low[j]) in its low half and of
    activate(gate_high[j], up_high[j]) in its high half, for j < count: a loop that vectorizes."""
    for j in range(count):
        low = np.uint32(narrow(activate(gate_low[j], up_low[j], act, True), np.uint16))
        high = np.uint32(narrow(activate(gate_high[j], up_high[j], act, True), np.uint16))
        out[j] = low | (high << np.uint32(16))


def gather_columns(x, depth, token_of_row, first, rows, xt, lead, starts):
    """xt[k * lead + j] = x[token_of_row[first + j] * depth + k] for j < rows, k < depth: a
    chunk's rows of x (flat) gathered as columns; 32-bit elements in transposed blocks in
    registers (starts: BLOCK integers of scratch)."""
    for j in range(rows):
        for k in range(depth):
            xt[k * lead + j] = x[token_of_row[first + j] * depth + k]


def columns_to_rows(src, lead, rows, width, dst, dst_start, starts):
    """dst[dst_start + j * width + n] = src[n * lead + j] for j < rows, n < width: a chunk's
    columns back to rows; 32-bit elements as gather_columns."""
    for j in range(rows):
        for n in range(width):
            dst[dst_start + j * width + n] = src[n * lead + j]


@overload(gather_columns, inline="always")
def _gather_columns(x, depth, token_of_row, first, rows, xt, lead, starts):
    if x.dtype.bitwidth == 32:
        def blocks(x, depth, token_of_row, first, rows, xt, lead, starts):
            for j0 in range(0, rows, BLOCK):
                count = min(BLOCK, rows - j0)
                for j in range(count):
                    starts[j] = token_of_row[first + j0 + j] * depth
                for k0 in range(0, depth, BLOCK):
                    transpose_block(x, starts, count, min(BLOCK, depth - k0), xt, k0 * lead + j0, lead)
                    starts[:count] += BLOCK
        return blocks

    def elements(x, depth, token_of_row, first, rows, xt, lead, starts):
        # BLOCK rows at a time: their lines stay in L1
        for j0 in range(0, rows, BLOCK):
            for k in range(depth):
                for j in range(j0, min(j0 + BLOCK, rows)):
                    xt[k * lead + j] = x[token_of_row[first + j] * depth + k]
    return elements


@overload(columns_to_rows, inline="always")
def _columns_to_rows(src, lead, rows, width, dst, dst_start, starts):
    if src.dtype.bitwidth == 32:
        def blocks(src, lead, rows, width, dst, dst_start, starts):
            for n0 in range(0, width, BLOCK):
                count = min(BLOCK, width - n0)
                for n in range(count):
                    starts[n] = (n0 + n) * lead
                for j0 in range(0, rows, BLOCK):
                    transpose_block(src, starts, count, min(BLOCK, rows - j0), dst, dst_start + j0 * width + n0,
                                    width)
                    starts[:count] += BLOCK
        return blocks

    def elements(src, lead, rows, width, dst, dst_start, starts):
        for j0 in range(0, rows, BLOCK):
            for n in range(width):
                for j in range(j0, min(j0 + BLOCK, rows)):
                    dst[dst_start + j * width + n] = src[n * lead + j]
    return elements


@njit(cache=True, inline="always")
def _rounded_rows(src, rows, width, dst, r0, n0, bias, e, has_bias):
    """dst[r0 + j, n0 + n] = src[j * width + n] (+ bias[e, n0 + n]) rounded to bfloat16 (bits),
    for j < rows, n < width."""
    for j in range(rows):
        for n in range(width):
            add = bias[e, n0 + n] if has_bias else np.float32(0)
            dst[r0 + j, n0 + n] = narrow(src[j * width + n] + add, dst.dtype)
