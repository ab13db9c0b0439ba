"""The numba backend: the fast CPU path.

Launchers here check the index arrays, allocate, pick a path and call the kernels in
moe_dispatch/kernels/numba/. Tensors reach the kernels as zero-copy NumPy views; 16-bit
floats as their bit patterns (bfloat16 as uint16, float16 as int16), widened to float32
in registers.

Two paths, chosen per call from the rows each active expert receives:
  decode  (few rows per expert): Numba kernels that read each active expert's weights
          once, parallel over (expert, block of output columns); the MLP is fused (gather
          in GEMM1's loads, activation in its epilogue, routing weight and combine in GEMM2's).
  blocked (many rows): the experts side by side, each on one thread (expert_threads.py),
          through buffers reused from expert to expert: its rows gathered from x, a library
          product for both GEMMs (cpu_matmul: oneDNN, or BLAS; weights packed for oneDNN
          with formats/onednn.py), the activation between them; then one combine of the
          rows. grouped_mm likewise sends large groups to those products.
Numba's threads follow torch.get_num_threads() unless NUMBA_NUM_THREADS is set. The
threading layer is Numba's choice (NUMBA_THREADING_LAYER); docs/cpu.md measures the
layers beside torch's OpenMP pool and says when to pick workqueue.
"""

from __future__ import annotations

import functools
import math
import os
import threading
from typing import Callable, NamedTuple, Optional

import numba
import numpy as np
import torch

from .. import validation as check
from .. import activations
from ..activations import activate
from ..experts import ExpertWeights
from ..formats import dense
from ..formats.onednn import OneDNNPacked, packed_experts
from ..formats.quantized import QuantizedWeight
from ..kernels.numba import expert_tiles
from ..kernels.numba import grouped_mm as gmm
from ..kernels.numba import mlp, mlp_backward, outer_products
from ..kernels.numba import permute as perm
from ..kernels.numba import plan as plan_kernels
from ..kernels.numba import quantized as quantized_kernels
from ..kernels.numba import routing as routing_kernels
from ..kernels.numba import tile_products
from ..kernels.numba.activations import FusedActivation, fused
from ..kernels.numba.bf16_dots import STEP as BF16_STEP
from ..kernels.numba.bf16_dots import TAKES_BF16_DOTS
from ..kernels.numba.packed_dots import E4M3_BF16_DOTS
from ..plan import DispatchPlan
from . import huge_pages
from .base import Backend
from .cpu_matmul import computes_in_float32, matmul_into, onednn_float32, takes_grouped_mm
from .expert_threads import Task, expert_rows, expert_tasks, run_tasks
from .step_threads import STEP_THREADS

Tensor = torch.Tensor

# When the Numba kernels (each expert's weights read once, its rows streamed against them)
# beat a library product per expert, by the library that computes float32 (docs/cpu.md, "The
# expert MLP"): (SMALL_GROUP_ROWS, BLOCKED_EXPERT_FLOPS). The kernels serve an expert with up
# to SMALL_GROUP_ROWS rows whatever its size, and beyond that while its rows need fewer
# multiply-adds than BLOCKED_EXPERT_FLOPS, the fixed cost of a blocked expert. grouped_mm sends
# each expert its own way; moe_mlp takes the fused decode path while the active experts average
# at most the limit.
# bfloat16 experts stay in the kernels up to 10 rows where the CPU multiplies bfloat16 pairs in
# one instruction (kernels/numba/bf16_dots.py; mixtral-8x7b x0.25 at 10 rows: 11.1 ms against
# the library's 14.1), 8 elsewhere.
_BF16_ROWS = 10 if TAKES_BF16_DOTS else 8
# float32 experts up to 24 MFLOP per expert where the kernels have 512-bit vectors, 80 where
# they have 256 (an AVX2 EPYC, float32, oneDNN: qwen3-30b-a3b x0.25 at 64-128 rows, 38-75 MFLOP,
# 1.09-1.31x faster in the kernels; olmoe-1b-7b x0.25 at 64 rows 1.39x, at 128 rows, 100 MFLOP,
# 1.06x slower).
_FLOAT32_EXPERT_FLOPS = 24e6 if outer_products.VECTOR_BYTES == 64 else 80e6
FUSED_LIMITS = {
    "onednn": {torch.float32: (40, _FLOAT32_EXPERT_FLOPS), torch.float64: (192, 0),
               torch.bfloat16: (_BF16_ROWS, 20e6), torch.float16: (16, 27e6)},
    "blas": {torch.float32: (192, 0), torch.float64: (192, 0),
             torch.bfloat16: (_BF16_ROWS, 20e6), torch.float16: (128, 0)},
}
# bfloat16 experts whose blocked products go through float32 (no oneDNN bfloat16 product: no
# AVX-512) have their weights converted on every call, a fixed cost that grows with the
# expert: the kernels serve them up to 64 rows (an AVX2 EPYC, 2 threads, in-process against the
# limits above: at 64 rows olmoe-1b-7b x0.5 111 ms against 127, qwen3-30b-a3b x0.5 167
# against 192, mixtral-8x7b x0.5 391 against 880; olmoe-1b-7b at 128 rows 225 against 210).
WIDENED_BF16_LIMITS = (64, 0)


# Rows per expert up to which the fused kernels serve bfloat16 experts that widen their
# weights (K off vdpbf16ps's steps of 32) where the blocked path runs on tiles: gpt-oss-20b
# x0.25 (H = I = 720) at 8 rows, 6.4 ms blocked against 8.5 fused; at 4, 5.5 against 7.1.
WIDENING_ROWS_BESIDE_TILES = 6
# Rows per expert up to which the quantized decode kernels serve experts whose blocked
# products dequantize their slices onto AMX tiles, by format: where the two paths' times
# cross on olmoe-1b-7b x0.5 (both read each weight once, so the size of the experts moves the
# crossing little). int8 at 12 rows: 9.9 ms fused, 14.7 on tiles; at 24 rows 18.6 and 16.0;
# fp8 at 8 rows 14.3 and 16.8, at 12 rows 22.0 and 17.0 (2026-12-03).
QUANTIZED_ROWS_BESIDE_TILES = {"int8": 18, "int4": 12, "mxfp4": 10, "fp8": 9}


def fused_rows_limit(dtype: torch.dtype, flops_per_row: int, on_tiles: bool = False, widens: bool = False,
                     formats: tuple[str, ...] = (), register_tiles: bool = False, small: bool = True) -> float:
    """Rows per expert up to which the Numba kernels serve an expert whose every row costs
    flops_per_row; on_tiles: its blocked products run on AMX tiles, whose fixed cost per
    expert is small (bfloat16 experts of H=512, I=192 at 32 rows: 9.4 ms blocked against 20
    for the fused kernels; at 8 rows the fused kernels still win), fewer where the kernels
    widen its bfloat16 weights rather than take bf16_dots (widens), or by its quantized
    weights' formats; register_tiles: the expert MLP on register tiles takes over beyond
    DOTS_ROWS_BESIDE_REGISTER_TILES, for bfloat16 beyond BF16_DOTS_ROWS_BESIDE_REGISTER_TILES
    (WIDENING_ROWS_BESIDE_TILES where the kernels widen), for quantized experts beyond
    QUANTIZED_ROWS_BESIDE_REGISTER_TILES, for float experts larger than small_experts beyond
    LARGE_FLOAT32_ROWS_BESIDE_REGISTER_TILES."""
    if register_tiles and formats:
        return min(QUANTIZED_ROWS_BESIDE_REGISTER_TILES[fmt] for fmt in formats)
    if register_tiles and dtype == torch.bfloat16:
        return WIDENING_ROWS_BESIDE_TILES if widens else BF16_DOTS_ROWS_BESIDE_REGISTER_TILES
    if register_tiles:
        return DOTS_ROWS_BESIDE_REGISTER_TILES if small else LARGE_FLOAT32_ROWS_BESIDE_REGISTER_TILES
    small_group_rows, blocked_expert_flops = (
        WIDENED_BF16_LIMITS if dtype == torch.bfloat16 and computes_in_float32(dtype)
        else FUSED_LIMITS["onednn" if onednn_float32() else "blas"][dtype])
    if on_tiles and formats:
        return min(QUANTIZED_ROWS_BESIDE_TILES[fmt] for fmt in formats)
    if on_tiles:
        return min(small_group_rows, WIDENING_ROWS_BESIDE_TILES) if widens else small_group_rows
    return max(small_group_rows, blocked_expert_flops / max(flops_per_row, 1))


def takes_bf16_dots(*depths: int) -> bool:
    """Whether the fused kernels multiply bfloat16 weights of these K by bf16_dots."""
    return TAKES_BF16_DOTS and all(depth % BF16_STEP == 0 for depth in depths)


def mlp_rows_limit(x: Tensor, experts: ExpertWeights) -> float:
    """fused_rows_limit of the expert MLP, as a float whatever its source: the decode kernels
    take it as an argument, and an int64 would compile them a second time."""
    weights = (experts.w_gate_up, experts.w_down)
    formats = ()
    if is_quantized(experts):
        tiles = all(isinstance(w, QuantizedWeight) and takes_quantized_tiles(w, x.dtype) for w in weights)
        formats = tuple(w.format for w in weights if isinstance(w, QuantizedWeight))
    else:
        tiles = all(on_tiles(dense(w)) for w in weights)
    widens = not takes_bf16_dots(experts.w_gate_up.shape[2], experts.intermediate_size)
    return float(fused_rows_limit(x.dtype, mlp_flops_per_row(*weights), tiles, widens, formats,
                                  takes_register_tiles(x, experts), small_experts(experts)))


# The dtypes of the register tiles (kernels/numba/outer_products.py), on CPUs with AVX-512. On
# an EPYC with AVX2 only (16 vector registers, tiles of 6 x 2 vectors) the tiles reached 36
# GFLOP/s a core where the library's product reached 90, and the paths they replace were faster
# (float32, E=16, top-2, 512 tokens, one thread; H=I=64: forward 1.22x, training 1.79x; H=I=256:
# forward 1.39x, training level): none there.
REGISTER_TILE_DTYPES = (torch.float32, torch.float64) if outer_products.VECTOR_BYTES == 64 else ()
# The backward's products run on register tiles for small experts (REGISTER_TILES_MAX_DEPTH
# below) below this many FLOPs per expert. Against the library's, in the backend (E=16): H=I=64
# at 64 rows per expert 2.0x (dX) and 2.2x (weight gradient), H=I=256 1.03x and 1.77x; H=I=384
# at 256 rows (75 MFLOP) 0.76x and 1.46x; of H=512, I=256 (olmoe-1b-7b x0.25, E=64) at 64 rows
# 0.94x and 0.61x, where an output past 4 MB goes expert by expert to the library's products.
REGISTER_TILES_BELOW_FLOPS = 32e6


def product_on_register_tiles(group_flops: float, a: Tensor, b: Tensor) -> bool:
    """Whether a grouped product of a [R, K] with b (w [E, K, N], or [R, N] for a weight
    gradient), group_flops per expert, runs on register tiles."""
    return (a.dtype in REGISTER_TILE_DTYPES and b.dtype == a.dtype and group_flops < REGISTER_TILES_BELOW_FLOPS
            and max(a.shape[1], b.shape[-1]) <= REGISTER_TILES_MAX_DEPTH)


# Float experts whose H and I are at most REGISTER_TILES_MAX_DEPTH run the expert MLP on
# register tiles (kernels/numba/expert_tiles.py) beyond DOTS_ROWS_BESIDE_REGISTER_TILES rows
# per active expert, while an expert's rows cost at most REGISTER_TILES_MAX_EXPERT_FLOPS; the
# blocked path's library products beyond. Against the paths before them (float32, E=16,
# top-2, H=I, in turns): H=64 1.10x at 8 rows, 1.29x at 16, 1.87x at 64, 2.43x at 256; H=256
# 1.07x at 16, 2.30x at 64 and 1.15x at 256 (100 MFLOP an expert); H=384 at 256 rows (226
# MFLOP) 0.88x. From H=512 they are level at best (olmoe-1b-7b x0.25 0.88-1.03x, gpt-oss-20b
# x0.25 0.68-0.84x): the dot-product kernels' horizontal sums and the library's calls are paid
# once per longer row there.
REGISTER_TILES_MAX_DEPTH = 384
DOTS_ROWS_BESIDE_REGISTER_TILES = 8
REGISTER_TILES_MAX_EXPERT_FLOPS = 120e6
# bfloat16 experts run the expert MLP on register tiles of bfloat16 pairs (vdpbf16ps) beyond
# this many rows per active expert where the decode kernels take bf16_dots (beyond
# WIDENING_ROWS_BESIDE_TILES where they widen): on a Zen 5, 2 threads, register tiles against
# the decode kernels (four weight rows a pass from QUAD_ROWS) and the library's products
# (oneDNN, AVX512-BF16) in turns, ms: olmoe-1b-7b x0.5 at 16 rows 10.5 / 7.3 / 16.4, at 24
# rows 11.0 / 9.7 / 18.8, at 32 rows 11.8 / 12.3 / 20.9, at 64 rows 19.0 / 31.4 / 25.9, at
# 512 rows 141 / 333 / 151; mixtral-8x7b x0.5 at 16 rows 32.2 / 24.8 / 36.4, at 24 rows 38.1
# / 34.6 / 43.6, at 32 rows 41.5 / 43.6 / 48.3; qwen3-30b-a3b x0.25 at 16 rows 4.7 / 3.8 /
# 11.2; gpt-oss-20b x0.25 (K=720, widened) at 8 rows 4.2 / 4.7 / 7.1.
BF16_DOTS_ROWS_BESIDE_REGISTER_TILES = 28
# Quantized experts of bfloat16 activations leave the decode kernels for the register tiles
# (each expert dequantized to bfloat16 once per call) beyond these rows per expert, by format:
# olmoe-1b-7b x0.5, decode kernels / register tiles / the blocked path's library products, ms:
# int4 at 16 rows 7.5 / 10.2 / 19.6, at 32 rows 15.7 / 12.1 / 22.4, at 64 31.7 / 19.6 / 30.7;
# int8 at 16 rows 7.0 / 10.4, at 32 14.5 / 12.4; mxfp4 10.3 / 12.4 and 21.2 / 14.4; fp8 at 16
# rows 15.3 / 11.1 where its decode kernels convert each e4m3 code to float32, and where they
# take bfloat16 pairs (E4M3_BF16_DOTS) 16.6 / 21.2, at 24 rows 25.1 / 25.9, at 32 33.4 / 29.8.
QUANTIZED_ROWS_BESIDE_REGISTER_TILES = {"int8": 20, "int4": 20, "mxfp4": 20, "fp8": 20 if E4M3_BF16_DOTS else 10}
# float32 experts larger than REGISTER_TILES_MAX_DEPTH take the register tiles too, beyond
# LARGE_FLOAT32_ROWS_BESIDE_REGISTER_TILES rows per expert and at any number of rows, where the
# CPU has AVX512-BF16 and no AMX (AMD's Zen 4 and 5: measured on a Zen 5, 2 threads, against
# the decode kernels or oneDNN's products, whichever the step took: olmoe-1b-7b x0.5 at 16
# rows 17.0 / 15.3 ms, 32 rows 22.6 / 23.1, 64 rows 34.1 / 44.8, 128 rows 71.3 / 76.1, 512
# rows 255 / 269; qwen3-30b-a3b x0.25 at 16 rows 6.5 / 8.4, 64 rows 14.8 / 27.7. On the Xeon
# above, with AMX, the tiles were slower from H=512, before their transposes ran in registers).
LARGE_FLOAT32_REGISTER_TILES = TAKES_BF16_DOTS and not tile_products.tiles_available()
LARGE_FLOAT32_ROWS_BESIDE_REGISTER_TILES = 32
# Quantized experts of at most this many bytes (as bfloat16) take the register tiles: each
# thread dequantizes a whole expert into a buffer of its own. bfloat16 experts take them at
# any size: mixtral-8x7b x0.5 (88 MB an expert, 8 experts), against the blocked path's
# products in turns on a Zen 5, 2 threads: at 16 rows per expert 33.6 / 37.0 ms, at 64 rows
# 66.1 / 69.7, at 256 rows 213 / 209 (x0.25, 22 MB: at 64 rows 16.8 / 22.0, at 256 54.5 / 63.7).
QUANTIZED_REGISTER_TILES_MAX_EXPERT_BYTES = 32 << 20
# Where bfloat16 experts go to register tiles at all: where the CPU multiplies bfloat16 pairs
# in one instruction (elsewhere the tiles widen each pair, at float32's rate).
BF16_REGISTER_TILES = TAKES_BF16_DOTS


def takes_register_tiles(x: Tensor, experts: ExpertWeights) -> bool:
    """Whether the expert MLP on register tiles serves these experts."""
    if x.dtype == torch.bfloat16:
        return takes_bf16_register_tiles(experts)
    weights = (experts.w_gate_up, experts.w_down)
    if not all(isinstance(w, Tensor) and w.dtype == x.dtype and w.is_contiguous() for w in map(plain, weights)):
        return False
    return x.dtype in REGISTER_TILE_DTYPES and (small_experts(experts) or large_float32_tiles(x))


def plain(w):
    """The tensor the register tiles read for w: a OneDNNPacked weight's own (the tiles serve
    it faster than oneDNN's packed copies, and no copy is made: olmoe-1b-7b x0.5 bfloat16 on a
    Zen 5, T=512 18.8 ms against 23.1, T=4096 141 against 141), else w."""
    return w.weight if isinstance(w, OneDNNPacked) else w


def small_experts(experts: ExpertWeights) -> bool:
    """Whether H and I are at most REGISTER_TILES_MAX_DEPTH."""
    return max(experts.hidden_size, experts.intermediate_size) <= REGISTER_TILES_MAX_DEPTH


def large_float32_tiles(x: Tensor) -> bool:
    """Whether float32 experts of any size take the register tiles (LARGE_FLOAT32_REGISTER_TILES)."""
    return x.dtype == torch.float32 and LARGE_FLOAT32_REGISTER_TILES


def takes_bf16_register_tiles(experts: ExpertWeights) -> bool:
    """Whether the expert MLP of bfloat16 activations runs on register tiles: where the CPU
    multiplies bfloat16 pairs in one instruction, whole pairs along both K, for bfloat16
    weights or quantized ones (each expert dequantized to bfloat16 as its rows come), unless
    the blocked path multiplies them on AMX tiles."""
    weights = (experts.w_gate_up, experts.w_down)
    if all(isinstance(w, QuantizedWeight) for w in weights):
        expert_bytes = 2 * experts.hidden_size * (experts.w_gate_up.shape[1] + experts.intermediate_size)
        pairs = (all(not takes_quantized_tiles(w, torch.bfloat16) for w in weights)
                 and expert_bytes <= QUANTIZED_REGISTER_TILES_MAX_EXPERT_BYTES)
    else:
        pairs = all(isinstance(w, Tensor) and w.dtype == torch.bfloat16 and is_packed(w) and not on_tiles(w)
                    for w in map(plain, weights))
    return (BF16_REGISTER_TILES and pairs and experts.hidden_size % 2 == experts.intermediate_size % 2 == 0
            and experts.hidden_size > 0 and experts.intermediate_size > 0)


def register_tiles_rows(x: Tensor, experts: ExpertWeights) -> float:
    """Rows per active expert up to which the expert MLP runs on register tiles (0: never)."""
    if not takes_register_tiles(x, experts):
        return 0
    if x.dtype == torch.bfloat16 or large_float32_tiles(x) and not small_experts(experts):
        return float("inf")
    return REGISTER_TILES_MAX_EXPERT_FLOPS / mlp_flops_per_row(experts.w_gate_up, experts.w_down)


def mlp_flops_per_row(w_gate_up: Tensor, w_down: Tensor) -> int:
    """2 * H * (W + I): GEMM1 and GEMM2 of one row."""
    return 2 * w_gate_up.shape[2] * (w_gate_up.shape[1] + w_down.shape[2])


# Rows per active expert from which the decode GEMMs read four weight rows per pass rather
# than two (quad): where many rows make the step compute-bound, not where streaming weights
# bounds it.
QUAD_ROWS = 8
# Output columns per task (a multiple of 4: the kernels take columns four or two at a time):
# enough tasks to balance threads, enough work to amortize one.
BLOCK_NK = 16
# The most intermediate columns per decode GEMM1 task (gate_up_block).
MAX_GATE_UP_BLOCK = 128


def gate_up_block(intermediate: int) -> int:
    """Intermediate columns per task of the decode GEMM1 (gate_up_act): each expert's columns
    split among the threads, from BLOCK_NK to MAX_GATE_UP_BLOCK columns (a multiple of 4). A
    task has a fixed cost (its buffers, the start of its two weight streams): at olmoe-1b-7b x0.5
    on 2 threads, 128-column tasks ran quantized steps 5-9% faster than 16-column ones, bfloat16
    ones up to 7% (docs/cpu.md)."""
    per_task = -(-intermediate // torch.get_num_threads())
    return min(MAX_GATE_UP_BLOCK, max(BLOCK_NK, -(-per_task // 4) * 4))


def down_block(hidden: int) -> int:
    """Output columns per task of the decode GEMM2 (down_combine): one task per thread (the
    parallel loop hands each thread its tasks in one static chunk anyway), at least 64
    columns: each task walks every active expert, reading its block of w_down in two
    sequential streams, and longer streams read faster (docs/cpu.md)."""
    per_task = -(-hidden // torch.get_num_threads())  # Numba's count follows torch's
    return max(64, per_task)


# Numba's workqueue layer runs one parallel region at a time and aborts the process on a
# second: launches from several Python threads take turns.
_LAUNCH_LOCK = threading.RLock()


# The torch thread count each Python thread last synced Numba's to (Numba's count is per
# Python thread too).
_SYNCED = threading.local()


def sync_threads() -> None:
    """Give Numba torch's thread count, unless the user pinned NUMBA_NUM_THREADS; checked
    again only when torch's count changes: the checks cost a tenth of a small decode step."""
    torch_threads = torch.get_num_threads()
    if getattr(_SYNCED, "torch_threads", None) == torch_threads:
        return
    if "NUMBA_NUM_THREADS" not in os.environ:
        wanted = max(1, min(torch_threads, numba.config.NUMBA_NUM_THREADS))
        if numba.get_num_threads() != wanted:
            numba.set_num_threads(wanted)
    _SYNCED.torch_threads = torch_threads


def launcher(method):
    """Run a backend method with Numba's thread count synced, torch's kept, and the launch
    lock held. Reading the count also starts Numba's threads: a parallel kernel loaded from the
    cache does not, and one called before them crashes the process."""

    @functools.wraps(method)
    def wrapped(*args, **kwargs):
        with _LAUNCH_LOCK:
            torch_threads = torch.get_num_threads()
            sync_threads()
            try:
                return method(*args, **kwargs)
            finally:
                # Numba's OpenMP layer, started by the first launch, resets the OpenMP thread
                # count torch reads (the two runtimes share it): put torch's back.
                if torch.get_num_threads() != torch_threads:
                    torch.set_num_threads(torch_threads)

    return wrapped


# The NumPy type the kernels read each float type as: 16-bit floats as their bits
_ARRAY_TYPES = {torch.bfloat16: np.uint16, torch.float16: np.int16, torch.float32: np.float32, torch.float64: np.float64}


def as_array(t: Tensor) -> np.ndarray:
    """A zero-copy NumPy view of a CPU tensor; bfloat16 as uint16 bits, float16 as int16 bits."""
    t = t.detach()
    if t.dtype in (torch.bfloat16, torch.float16):
        return t.view(torch.int16).numpy().view(_ARRAY_TYPES[t.dtype])
    return t.numpy()


def empty_array(shape: tuple, dtype: torch.dtype) -> tuple[np.ndarray, Tensor]:
    """A new array as as_array gives a tensor of dtype, and that tensor: NumPy allocates it,
    which costs a decode step a third of what torch.empty and as_array do on cold caches."""
    array = np.empty(shape, dtype=_ARRAY_TYPES[dtype])
    return array, torch.from_numpy(array).view(dtype)


def is_packed(w: Tensor) -> bool:
    """Whether the kernels read w as uint32 words, two bfloat16 elements each: contiguous
    bfloat16 with an even K (they split a word with a shift and a mask, which vectorizes
    where 16-bit loads did not)."""
    return w.dtype == torch.bfloat16 and w.is_contiguous() and w.shape[-1] % 2 == 0 and w.storage_offset() % 2 == 0


def weights_array(w: Tensor) -> np.ndarray:
    """as_array for the weights the kernels read, packed when is_packed(w)."""
    if is_packed(w):
        # through the flat storage: a unit dimension may carry an odd stride (N=1), which view refuses
        return w.detach().flatten().view(torch.int32).view(*w.shape[:-1], -1).numpy().view(np.uint32)
    return as_array(w)


def pairs_array(t) -> object:
    """What the register tiles of bfloat16 pairs read: a tensor's uint32 words of two bfloat16
    (is_packed(t)), a quantized weight's rows (dequantized an expert at a time)."""
    return quantized_rows(t) if isinstance(t, QuantizedWeight) else weights_array(t)


def split_array(t: Tensor) -> np.ndarray:
    """[R, K] activations as float32 in the split layout that kernels on packed weights read:
    each row's even elements, then its odd ones."""
    t = t.detach()
    return torch.cat((t[:, 0::2], t[:, 1::2]), dim=1).to(torch.float32).numpy()


def as_bits(t: Tensor) -> np.ndarray:
    """A zero-copy view of t's bits as same-width integers: for kernels that only move data."""
    bits = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.detach().view(bits).numpy()


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Sums and per-row scalars (routing weights, biases) are float32, float64 for float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def scalars_array(t: Optional[Tensor], dtype: torch.dtype) -> np.ndarray:
    """2-D t (biases, routing weights) as a contiguous array of dtype's accumulator type;
    a [1, 1] stand-in when t is None (the kernel is told not to read it)."""
    if t is None:
        return _NO_SCALARS[dtype == torch.float64]
    t, acc = t.detach(), acc_dtype(dtype)
    # .to() costs about a microsecond even where it has nothing to do
    return (t if t.dtype == acc else t.to(acc)).contiguous().numpy()


_NO_SCALARS = {False: np.zeros((1, 1), dtype=np.float32), True: np.zeros((1, 1), dtype=np.float64)}


def refuse_bad_ids(ids: Tensor, num_experts: int, num_bad: int) -> None:
    """Raise for the num_bad ids a plan kernel counted outside [0, num_experts)."""
    check.expert_id_values(ids, num_experts)  # names a bad id
    raise ValueError(f"ids must lie in [0, {num_experts}): {num_bad} expert ids fall outside")


def int32_array(t: Tensor) -> np.ndarray:
    if t.dtype == torch.int32 and t.is_contiguous():  # a plan's arrays: no conversion to pay for
        return t.numpy()
    return t.detach().to(torch.int32).contiguous().numpy()


def check_offsets(offsets: np.ndarray, num_rows: int) -> None:
    if not perm.offsets_valid(offsets, num_rows):
        raise ValueError(f"offsets must rise from 0 to the number of rows ({num_rows}); got {offsets.tolist()}")


def check_indices(name: str, indices: np.ndarray, limit: int) -> None:
    if indices.size and not perm.indices_in_range(indices, limit):
        raise ValueError(f"{name} must lie in [0, {limit}); got values from {indices.min()} to {indices.max()}")


def experts_by_size(offsets: np.ndarray, max_small: int) -> tuple[np.ndarray, list[int]]:
    """(experts with 1..max_small rows as int32, experts with more rows)."""
    counts = np.diff(offsets)
    small = np.flatnonzero((counts > 0) & (counts <= max_small)).astype(np.int32)
    large = np.flatnonzero(counts > max_small).tolist()
    return small, large


def rows_of_k_view(w: Tensor) -> Optional[Tensor]:
    """w [E, K, N] as the contiguous [E, N, K] the Numba kernel reads (nn.Linear storage passed
    as w.transpose(1, 2)), or None for any other strides, which matmul_into reads."""
    view = w.transpose(1, 2)
    return view if view.is_contiguous() else None


def decode_experts(x: Tensor, experts: ExpertWeights) -> mlp.DecodeExperts:
    """The experts as the Numba decode kernels read them (K-contiguous dense weights)."""
    w_gate_up, w_down, b_gate_up, b_down = experts.tensors()
    return mlp.DecodeExperts(
        weights_array(w_gate_up), scalars_array(b_gate_up, x.dtype), b_gate_up is not None,
        weights_array(w_down), scalars_array(b_down, x.dtype), b_down is not None,
        is_packed(w_gate_up), is_packed(w_down), fused(experts.activation, experts.gate_up_columns),
    )


def quantized_rows(w: QuantizedWeight) -> quantized_kernels.QuantizedRows:
    """A quantized weight as the Numba kernels read it (zero-copy views)."""
    zeros = _NO_ZEROS if w.zeros is None else w.zeros.numpy()
    return quantized_kernels.ROWS_CLASSES[w.format](
        w.codes.view(torch.uint8).numpy(), w.scales.numpy(), zeros, w.block[0], w.block[1], w.zeros is not None,
        w.codes_per_byte == 2, w.shape[2],
    )


_NO_ZEROS = np.zeros((1, 1, 1), dtype=np.uint8)


def quantized_experts(x: Tensor, experts: ExpertWeights) -> quantized_kernels.QuantizedExperts:
    """Quantized experts as the Numba decode kernels read them."""
    return quantized_kernels.QuantizedExperts(
        quantized_rows(experts.w_gate_up), scalars_array(experts.b_gate_up, x.dtype), experts.b_gate_up is not None,
        quantized_rows(experts.w_down), scalars_array(experts.b_down, x.dtype), experts.b_down is not None,
        fused(experts.activation, experts.gate_up_columns),
    )


def is_quantized(experts: ExpertWeights) -> bool:
    return isinstance(experts.w_gate_up, QuantizedWeight) or isinstance(experts.w_down, QuantizedWeight)


def on_tiles(w: Tensor) -> bool:
    """Whether the AMX tile products take w [E, N, K]: contiguous bfloat16, N in whole tiles,
    K even, and AMX here."""
    return (w.dtype == torch.bfloat16 and is_packed(w) and tile_products.fits(w.shape[2], w.shape[1])
            and tile_products.tiles_available())


def tile_words(w: Tensor) -> Optional[np.ndarray]:
    """w as the tile products read it (uint32 pairs of bfloat16), or None where they do not."""
    return weights_array(w) if on_tiles(w) else None


def takes_quantized_tiles(w: QuantizedWeight, dtype: torch.dtype) -> bool:
    """Whether the tile products take w for activations of dtype (each slice dequantized to
    bfloat16 as they reach it)."""
    return (dtype == torch.bfloat16 and tile_products.fits_quantized(w.shape[2], w.shape[1], w.block[1])
            and tile_products.tiles_available())


def tile_multiply(out: Tensor, a: Tensor, w_tiles, task: Task, bounds: np.ndarray,
                  bias: Optional[Tensor], act: FusedActivation = tile_products.PRODUCT, inter: int = 0,
                  interleaved: bool = False) -> None:
    """out = the task's rows a [n, K] times their experts' weights (+ bias), on AMX tiles
    (w_tiles: tile_words(w), or quantized_rows(w) where takes_quantized_tiles): one call for the task's experts, no copy
    of their weights. With act (one of tile_products.EPILOGUES), out [n, inter] = that
    activation of the product."""
    first, last, start, end = task
    quantized = not isinstance(w_tiles, np.ndarray)
    width = w_tiles.codes.shape[1] if quantized else w_tiles.shape[1]
    bias32 = np.zeros((1, width), dtype=np.float32) if bias is None else bias[first:last].float().numpy()
    tile_products.expert_products(a.view(torch.int32).numpy().view(np.uint32), w_tiles, bounds, first, last, start,
                                  end, as_array(out), bias32, bias is not None,
                                  tile_products.scratch(a.shape[1], quantized), tile_products.tail_config(a.shape[1]),
                                  act, inter, interleaved)


class ExpertMatrices:
    """Each expert's [K, N] matrix of a weight [E, N, K], as the blocked path's products read
    it: on AMX tiles (tile_multiply), a bfloat16 weight as it is and a quantized one
    dequantized slice by slice as the tiles reach it; else a view of a float weight for the
    library (with its oneDNN-packed copy, when it has one), or a quantized expert dequantized
    into its thread's buffer, reused from expert to expert. No dense copy of the experts is
    ever made."""

    def __init__(self, w, dtype: torch.dtype, save_for_backward: bool, threads: int):
        self.quantized = isinstance(w, QuantizedWeight)
        if self.quantized:
            self.rows = quantized_rows(w)
            self.tiles = self.rows if takes_quantized_tiles(w, dtype) else None
            self.buffers = [torch.empty(w.shape[1:], dtype=dtype) for _ in range(threads if self.tiles is None else 0)]
        else:
            self.weight = dense(w)
            self.matrices = self.weight.transpose(1, 2)
            self.tiles = tile_words(self.weight)
            self.packed = None if self.tiles is not None else packed_experts(w, save_for_backward)

    def bias_between(self, e: int, bias: Optional[Tensor], slot: int) -> tuple:
        """matmul_into's (b, bias, packed) for expert e on the thread of this slot: its [K, N]
        matrix, bias[e], its packed copy."""
        bias_e = None if bias is None else bias[e]
        if self.quantized:
            return self.dequantized(e, slot).T, bias_e, None
        return self.matrices[e], bias_e, self.packed and self.packed.expert(self.weight, e)

    def dequantized(self, e: int, slot: int) -> Tensor:
        """Quantized expert e, dequantized into the buffer of this slot's thread."""
        buffer = self.buffers[slot]
        quantized_kernels.dequantize_experts(self.rows, np.array([e], dtype=np.int32), as_array(buffer)[None])
        return buffer

    def multiply(self, out: Tensor, a: Tensor, task: Task, bounds: np.ndarray, bias: Optional[Tensor],
                 slot: int, scratch: bool = False) -> Tensor:
        """The task's rows a [n, K] times their experts' matrices (+ bias), returned: on AMX
        tiles where they take the weight, else a run of experts in one torch._grouped_mm where
        it serves them (a dozen fewer torch calls per expert, a third of a step of 128 small
        experts), else expert by expert. In out; or, where out is only scratch, in the tensor
        the library returns where it makes one (copying it costs about what the activation
        does)."""
        if self.tiles is not None:
            tile_multiply(out, a, self.tiles, task, bounds, bias)
            return out
        first, last, start, _ = task
        if last - first > 1 and not self.quantized and not self.packed:  # a run holds whole experts
            matrices = self.matrices[first:last]
            if takes_grouped_mm(2 * a.shape[0] * a.shape[1] * out.shape[1] / (last - first), a, matrices):
                offs = torch.from_numpy((bounds[first + 1:last + 1] - start).astype(np.int32))
                product = torch._grouped_mm(a, matrices, offs=offs)
                if bias is not None:
                    counts = torch.from_numpy(np.diff(bounds[first:last + 1]).astype(np.int64))
                    product += bias[first:last].to(out.dtype).repeat_interleave(counts, dim=0)
                return product if scratch else out.copy_(product)
        if scratch and last - first == 1:
            return matmul_into(None, a, *self.bias_between(first, bias, slot))
        for e, begin, stop in expert_rows(task, bounds):
            rows = slice(begin - start, stop - start)
            matmul_into(out[rows], a[rows], *self.bias_between(e, bias, slot))
        return out


def decode_kernels(x: Tensor, experts: ExpertWeights) -> Optional[tuple]:
    """(the decode step's kernel module, the experts as its kernels read them), or None where
    the fused kernels cannot read them: a float weight beside a quantized one, or float weights
    whose K is not contiguous (the blocked path's library products read any strides)."""
    if all(isinstance(w, QuantizedWeight) for w in (experts.w_gate_up, experts.w_down)):
        return quantized_kernels, quantized_experts(x, experts)
    if not is_quantized(experts) and all(dense(w).is_contiguous() for w in (experts.w_gate_up, experts.w_down)):
        return mlp, decode_experts(x, experts)
    return None


def decode_tiles(hidden: int, intermediate: int) -> mlp.DecodeTiles:
    return mlp.DecodeTiles(gate_up_block(intermediate), QUAD_ROWS, down_block(hidden))


class DecodeSetup(NamedTuple):
    """What a decode step derives from the experts alone, once (ExpertWeights.derived)."""

    rows_limit: float  # mlp_rows_limit
    register_rows: float  # register_tiles_rows
    kernels: Optional[tuple]  # decode_kernels
    tiles: mlp.DecodeTiles
    kind: tuple  # what its time depends on besides the rows (STEP_THREADS)

    def run(self, rows: int, step: Callable[[], int]) -> int:
        """step(), a decode kernel's call returning its status, on the threads STEP_THREADS
        gives steps of this kind and about this many rows."""
        return STEP_THREADS.run((self.kind, rows.bit_length()), step, mlp.DECODE_OK)


def step_kind(x: Tensor, experts: ExpertWeights) -> tuple:
    """The activations' dtype, the experts' sizes and each weight's format or dtype."""
    weights = (experts.w_gate_up, experts.w_down)
    return (x.dtype, experts.num_experts, experts.hidden_size, experts.intermediate_size,
            *(w.format if isinstance(w, QuantizedWeight) else w.dtype for w in weights))


def decode_settings(dtype: torch.dtype) -> tuple:
    """What a DecodeSetup depends on besides the experts: the activations' dtype, the matmul
    library setting, fused_rows_limit itself and the register tiles' limits (which tests
    replace to force a path), and the thread count (its tiles)."""
    return ("numba decode", dtype, onednn_float32(), fused_rows_limit, REGISTER_TILES_MAX_DEPTH,
            REGISTER_TILES_MAX_EXPERT_FLOPS, BF16_REGISTER_TILES, LARGE_FLOAT32_REGISTER_TILES,
            torch.get_num_threads())


def make_decode_setup(x: Tensor, experts: ExpertWeights) -> DecodeSetup:
    return DecodeSetup(mlp_rows_limit(x, experts), register_tiles_rows(x, experts), decode_kernels(x, experts),
                       decode_tiles(experts.hidden_size, experts.intermediate_size), step_kind(x, experts))


def decode_setup(x: Tensor, experts: ExpertWeights) -> DecodeSetup:
    """The DecodeSetup of experts for activations of x's dtype, kept on them under its
    decode_settings."""
    return experts.derived(decode_settings(x.dtype), lambda: make_decode_setup(x, experts))


def takes_decode_step(setup: DecodeSetup, experts: ExpertWeights, slots: int) -> bool:
    """Whether a step of slots (token, expert) pairs may take the decode kernels: no more than
    the serial plan serves, and no more rows than they take were every expert active (else no
    call, nor compile)."""
    return (0 < slots <= plan_kernels.MIN_SLOTS_PER_CHUNK and setup.kernels is not None
            and slots <= setup.rows_limit * experts.num_experts)


class RoutedDecode:
    """A layer's decode step (NumbaBackend.routed_decode), prepared once: the router and the
    routing options as the kernel reads them, and the experts' DecodeSetup while the settings
    it depends on stay."""

    def __init__(self, x: Tensor, router: Tensor, top_k: int, experts: ExpertWeights, setup: DecodeSetup, *,
                 scoring, renormalize, bias, n_groups, topk_groups, scale):
        bias = routing_kernels.NO_ROUTING.bias if bias is None else bias.detach().float().contiguous().numpy()
        self.routing = routing_kernels.Routing(as_array(router.contiguous()), bias, scoring == "sigmoid",
                                               n_groups or 0, topk_groups or 0, renormalize, float(scale))
        self.top_k, self.experts = top_k, experts
        self.settings, self.setup = decode_settings(x.dtype), setup
        # the routing weights' type: the kernel routes x's rows into arrays of it
        self.weights_type = _ARRAY_TYPES[acc_dtype(x.dtype)]

    @launcher
    def __call__(self, x: Tensor) -> Optional[Tensor]:
        settings = decode_settings(x.dtype)
        if settings != self.settings:
            self.settings, self.setup = settings, decode_setup(x, self.experts)
        if not takes_decode_step(self.setup, self.experts, x.shape[0] * self.top_k):
            return None
        weights = np.empty((x.shape[0], self.top_k), dtype=self.weights_type)
        ids = np.empty((x.shape[0], self.top_k), dtype=np.int64)
        status, out = decode(self.setup, x, weights, ids, self.routing, self.experts)
        return None if status == mlp.NOT_DECODE else out


def decode(setup: DecodeSetup, x: Tensor, weights, ids, routing, experts: ExpertWeights) -> tuple[int, Tensor]:
    """(status, output) of the decode kernels' call on these arrays (moe_mlp_decode_ids)."""
    out_array, out = empty_array(tuple(x.shape), x.dtype)
    module, kernel_experts = setup.kernels
    arrays = (as_array(x.contiguous()), weights, ids, routing, experts.num_experts, setup.rows_limit,
              kernel_experts, setup.tiles, out_array)
    return setup.run(ids.size, lambda: module.moe_mlp_decode_ids(*arrays)), out


class NumbaBackend(Backend):
    name = "numba"
    refuses_bad_ids = True  # the counting sort counts them, and make_plan raises
    native_formats = tuple(quantized_kernels.ROWS_CLASSES)

    def unavailable_reason(self, device: torch.device) -> Optional[str]:
        if device.type != "cpu":
            return f"numba runs on the CPU; got {device}"
        return None

    # ---- primitives ------------------------------------------------------------------
    @launcher
    def make_plan(self, ids: Tensor, num_experts: int) -> DispatchPlan:
        num_tokens, top_k = ids.shape
        counts = torch.empty(num_experts, dtype=torch.int32)
        offsets = torch.empty(num_experts + 1, dtype=torch.int32)
        token_of_row = torch.empty(num_tokens * top_k, dtype=torch.int32)
        row_of_slot = torch.empty(num_tokens, top_k, dtype=torch.int32)
        num_chunks = max(1, min(numba.get_num_threads(), ids.numel() // plan_kernels.MIN_SLOTS_PER_CHUNK))
        kernel = plan_kernels.make_plan_parallel if num_chunks > 1 else plan_kernels.make_plan_serial
        num_bad = kernel(
            ids.detach().contiguous().numpy(), num_experts, num_chunks,
            counts.numpy(), offsets.numpy(), token_of_row.numpy(), row_of_slot.numpy(),
        )
        if num_bad:
            refuse_bad_ids(ids, num_experts, num_bad)
        return DispatchPlan(counts, offsets, token_of_row, row_of_slot)

    @launcher
    def permute(self, x: Tensor, token_of_row: Tensor) -> Tensor:
        rows = int32_array(token_of_row)
        check_indices("token_of_row", rows, x.shape[0])
        out = x.new_empty(rows.shape[0], x.shape[1])
        perm.gather_rows(as_bits(x.contiguous()), rows, as_bits(out))
        return out

    @launcher
    def unpermute(self, ys: Tensor, row_of_slot: Tensor, weights: Optional[Tensor]) -> Tensor:
        slots = int32_array(row_of_slot)
        check_indices("row_of_slot", slots, ys.shape[0])
        if weights is None:
            weights = torch.ones(slots.shape, dtype=acc_dtype(ys.dtype))
        out = ys.new_empty(slots.shape[0], ys.shape[1])
        perm.combine(as_array(ys.contiguous()), slots, scalars_array(weights, ys.dtype), as_array(out))
        return out

    @launcher
    def grouped_mm(self, a: Tensor, w: Tensor, offsets: Tensor, bias: Optional[Tensor] = None) -> Tensor:
        a = a.contiguous()
        bounds = int32_array(offsets)
        check_offsets(bounds, a.shape[0])
        w_rows = rows_of_k_view(w)
        words = tile_words(w_rows) if w_rows is not None else None
        flops_per_row = 2 * w.shape[1] * w.shape[2]
        limit = (fused_rows_limit(a.dtype, flops_per_row, words is not None, not takes_bf16_dots(w.shape[1]))
                 if w_rows is not None else 0)
        small, large = experts_by_size(bounds, limit)
        group_flops = 2 * a.shape[0] * w.shape[1] * w.shape[2] / max(len(large), 1)
        if w_rows is None and w.is_contiguous() and product_on_register_tiles(group_flops, a, w):
            out = a.new_empty(a.shape[0], w.shape[2])
            gmm.grouped_mm_kn(as_array(a), as_array(w), scalars_array(bias, a.dtype), bias is not None, bounds,
                              np.flatnonzero(np.diff(bounds)).astype(np.int32), as_array(out))
            return out
        if large and not small.size and bias is None and words is None and takes_grouped_mm(group_flops, a, w):
            return torch._grouped_mm(a, w, offs=torch.from_numpy(bounds[1:]))
        out = a.new_empty(a.shape[0], w.shape[2])

        def multiply(task: Task, slot: int) -> None:
            if words is not None:
                tile_multiply(out[task.start:task.end], a[task.start:task.end], words, task, bounds, bias)
                return
            for e, start, end in expert_rows(task, bounds):
                matmul_into(out[start:end], a[start:end], w[e], None if bias is None else bias[e])

        threads = torch.get_num_threads()
        run_tasks(expert_tasks(bounds, threads, large), multiply, threads)
        if small.size:
            src = split_array(a) if is_packed(w_rows) else as_array(a)
            gmm.grouped_mm_nk(src, weights_array(w_rows), scalars_array(bias, a.dtype), bias is not None,
                              bounds, small, BLOCK_NK, QUAD_ROWS, as_array(out))
        return out

    @launcher
    def grouped_mm_wgrad(self, a: Tensor, b: Tensor, offsets: Tensor, num_experts: int) -> Tensor:
        bounds = int32_array(offsets)
        check_offsets(bounds, a.shape[0])
        group_flops = 2 * a.shape[0] * a.shape[1] * b.shape[1] / max(np.count_nonzero(np.diff(bounds)), 1)
        if product_on_register_tiles(group_flops, a, b):
            out = a.new_empty(num_experts, a.shape[1], b.shape[1])
            gmm.grouped_mm_wgrad(as_array(a.contiguous()), as_array(b.contiguous()), bounds, as_array(out))
            return out
        # One library product per expert: the [M, N] output is what costs, and it writes it fastest.
        # a large output on huge pages, which torch._grouped_mm's own cannot ask for
        small = num_experts * a.shape[1] * b.shape[1] * a.element_size() < huge_pages.MIN_BYTES
        if small and takes_grouped_mm(group_flops, a.T, b):  # zeros for experts without rows, as below
            return torch._grouped_mm(a.T, b, offs=torch.from_numpy(bounds[1:]))
        out = huge_pages.new_empty(a, num_experts, a.shape[1], b.shape[1])
        # by index: a boolean mask's assignment walks the whole output, 10 ms of a 128 MB one
        out[torch.from_numpy(np.flatnonzero(np.diff(bounds) == 0))] = 0

        def multiply(task: Task, slot: int) -> None:
            e, _, start, end = task
            matmul_into(out[e], a[start:end].T, b[start:end], None)

        threads = torch.get_num_threads()
        run_tasks(expert_tasks(bounds, threads, whole_experts=True), multiply, threads)
        return out

    # ---- composites ------------------------------------------------------------------
    @launcher
    def unpermute_backward(
        self, dy: Tensor, ys: Tensor, token_of_row: Tensor, row_of_slot: Tensor, weights: Optional[Tensor]
    ) -> tuple[Tensor, Optional[Tensor]]:
        if weights is None:
            return self.permute(dy, token_of_row), None
        slots = int32_array(row_of_slot)
        if not perm.is_permutation(slots, ys.shape[0]):
            raise ValueError(f"row_of_slot must hold each row in [0, {ys.shape[0]}) exactly once")
        dys = ys.new_empty(ys.shape)
        dweights = torch.empty(slots.shape, dtype=acc_dtype(ys.dtype))
        perm.combine_backward(
            as_array(dy.contiguous()), as_array(ys.contiguous()), slots,
            scalars_array(weights, ys.dtype), as_array(dys), dweights.numpy(),
        )
        return dys, dweights

    @launcher
    def moe_mlp(
        self, x: Tensor, weights: Tensor, plan: DispatchPlan, experts: ExpertWeights, save_for_backward: bool
    ) -> tuple[Tensor, Tensor]:
        if experts.quantizes_activations:  # no Numba kernel does: the reference's definition (base.w8a8_mm)
            return super().moe_mlp(x, weights, plan, experts, save_for_backward)
        bounds = int32_array(plan.offsets)
        check_offsets(bounds, plan.num_rows)
        active = int(np.count_nonzero(np.diff(bounds)))
        setup = decode_setup(x, experts)
        if setup.kernels is not None and active and plan.num_rows <= setup.rows_limit * active:
            return self._moe_mlp_decode(x, weights, bounds, plan, experts, setup, save_for_backward)
        if active and plan.num_rows <= setup.register_rows * active:
            return self._moe_mlp_register_tiles(x, weights, bounds, plan, experts, save_for_backward)
        return self._moe_mlp_blocked(x, weights, bounds, plan, experts, save_for_backward)

    def warm_up_tokens(self, x, experts, top_k, max_tokens):
        """The powers of two, and the tokens on each side of the limits of rows per active
        expert between moe_mlp's paths."""
        counts = set(super().warm_up_tokens(x, experts, top_k, max_tokens))
        if experts is not None:
            setup = decode_setup(x, experts)
            for limit in (setup.rows_limit if setup.kernels is not None else 0, setup.register_rows):
                if 0 < limit < math.inf:
                    rows = math.floor(limit)
                    counts.add(rows * experts.num_experts // top_k)  # at most `limit` rows an expert
                    counts.add(math.ceil((rows + 1) * experts.num_experts / top_k))  # past it
        return sorted(t for t in counts if 0 < t <= max_tokens)

    def _moe_mlp_register_tiles(self, x, weights, bounds, plan, experts, save_for_backward) -> tuple[Tensor, Tensor]:
        """Float and bfloat16 experts on register tiles (kernels/numba/expert_tiles.py), the
        rows' outputs met in one combine."""
        w_gate_up, w_down = plain(experts.w_gate_up), plain(experts.w_down)
        b_gate_up, b_down = experts.b_gate_up, experts.b_down
        rows = int32_array(plan.token_of_row)
        check_indices("token_of_row", rows, x.shape[0])
        slots = int32_array(plan.row_of_slot)
        check_indices("row_of_slot", slots, plan.num_rows)
        h = x.new_empty(plan.num_rows if save_for_backward else 0, w_gate_up.shape[1])
        o = x.new_empty(plan.num_rows, x.shape[1])
        if x.dtype == torch.bfloat16:  # pairs of bfloat16 along K, as uint32 words
            kernel, array = expert_tiles.expert_mlp_bf16, pairs_array
            x = x if is_packed(x) else x.clone(memory_format=torch.contiguous_format)
        else:
            kernel, array, x = expert_tiles.expert_mlp, as_array, x.contiguous()
        kernel(array(x), rows, array(w_gate_up), scalars_array(b_gate_up, x.dtype), b_gate_up is not None,
               array(w_down), scalars_array(b_down, x.dtype), b_down is not None, bounds,
               fused(experts.activation, experts.gate_up_columns), torch.get_num_threads(), save_for_backward,
               as_array(h), as_array(o))
        out = x.new_empty(x.shape)
        perm.combine(as_array(o), slots, scalars_array(weights, x.dtype), as_array(out))
        return out, h

    def _moe_mlp_blocked(self, x, weights, bounds, plan, experts, save_for_backward) -> tuple[Tensor, Tensor]:
        """The experts side by side (expert_threads.py), each thread through its own buffers,
        sized for the largest task and reused: T*k-row intermediates would be fresh memory on
        every call, and their page faults cost as much as the eager loop's whole lead
        (docs/cpu.md). GEMM1's product where the library returns it in new memory (a task's
        rows, not T*k) is activated as it is, not copied. The rows' outputs meet in one combine."""
        num_rows, hidden = plan.num_rows, x.shape[1]
        b_gate_up, b_down = experts.b_gate_up, experts.b_down
        inter, width = experts.intermediate_size, experts.w_gate_up.shape[1]
        rows = int32_array(plan.token_of_row)
        check_indices("token_of_row", rows, x.shape[0])
        slots = int32_array(plan.row_of_slot)
        check_indices("row_of_slot", slots, num_rows)
        threads = torch.get_num_threads()
        tasks = expert_tasks(bounds, threads)
        most = max((task.end - task.start for task in tasks), default=0)
        h_all = x.new_empty(num_rows if save_for_backward else 0, width)
        o_all = x.new_empty(num_rows, hidden)
        buffers = [[x.new_empty(most, n) for n in (hidden, width, inter)] for _ in range(min(threads, len(tasks)))]
        token = torch.from_numpy(rows).long()
        w1, w2 = (ExpertMatrices(w, x.dtype, save_for_backward, len(buffers))
                  for w in (experts.w_gate_up, experts.w_down))

        activation = activations.get(experts.activation)
        # AMX tiles apply SwiGLU in GEMM1's epilogue (where no autograd wants GEMM1's output)
        epilogue = (w1.tiles is not None and not save_for_backward and inter % tile_products.TILE == 0
                    and activation.code in tile_products.EPILOGUES)
        act = fused(activation, activations.gate_up_columns(activation, experts.interleaved, inter))

        def expert_mlp(task: Task, slot: int) -> None:
            start, end = task.start, task.end
            x_n, h_n, a_n = (buffer[:end - start] for buffer in buffers[slot])
            torch.index_select(x, 0, token[start:end], out=x_n)
            if epilogue:
                tile_multiply(a_n, x_n, w1.tiles, task, bounds, b_gate_up, act, inter, experts.interleaved)
            else:
                h = w1.multiply(h_all[start:end] if save_for_backward else h_n, x_n, task, bounds, b_gate_up, slot,
                                scratch=not save_for_backward)
                a = activate(h, activation, experts.interleaved)
                a_n = a if a.dtype == x.dtype else a_n.copy_(a)
            w2.multiply(o_all[start:end], a_n, task, bounds, b_down, slot)

        run_tasks(tasks, expert_mlp, threads)
        out = x.new_empty(x.shape)
        perm.combine(as_array(o_all), slots, scalars_array(weights, x.dtype), as_array(out))
        return out, h_all

    @launcher
    def moe_mlp_backward_rows(self, h, g, dyp, w_row, activation, interleaved=False):
        num_rows, inter = g.shape
        activation = activations.get(activation)
        if h.shape != (num_rows, activation.width(inter)) or dyp.shape[0] != num_rows or w_row.shape != (num_rows,):
            raise ValueError(f"h {tuple(h.shape)}, g {tuple(g.shape)}, dyp {tuple(dyp.shape)} and w_row "
                             f"{tuple(w_row.shape)} must agree on the rows (and h on I for {activation.name})")
        a, dh, do = dyp.new_empty(num_rows, inter), dyp.new_empty(h.shape), dyp.new_empty(dyp.shape)
        d_row = torch.empty(num_rows, dtype=acc_dtype(dyp.dtype))
        mlp_backward.backward_rows(
            as_array(h.contiguous()), as_array(g.contiguous()), as_array(dyp.contiguous()),
            scalars_array(w_row, dyp.dtype),
            fused(activation, activations.gate_up_columns(activation, interleaved, inter)),
            as_array(a), as_array(dh), as_array(do), d_row.numpy(),
        )
        return a, d_row, dh, do

    def _moe_mlp_decode(self, x, weights, bounds, plan, experts, setup, save_for_backward) -> tuple[Tensor, Tensor]:
        # One call into Numba for the whole step: every torch operation here costs tens of
        # microseconds when a decode step starts with cold caches.
        module, kernel_experts = setup.kernels
        h = x.new_empty(plan.num_rows if save_for_backward else 0, experts.w_gate_up.shape[1])
        out = x.new_empty(x.shape)
        rows, slots = int32_array(plan.token_of_row), int32_array(plan.row_of_slot)
        arrays = (as_array(x.contiguous()), scalars_array(weights, x.dtype), bounds, rows, slots,
                  kernel_experts, setup.tiles, save_for_backward, as_array(h), as_array(out))
        status = setup.run(plan.num_rows, lambda: module.moe_mlp_decode(*arrays))
        if status != mlp.DECODE_OK:  # the kernel refused an index array before reading through it
            check_indices("token_of_row", rows, x.shape[0])
            check_indices("row_of_slot", slots, rows.shape[0])
        return out, h

    @launcher
    def moe_mlp_from_ids(self, x, weights, ids, experts):
        # Tried on as many slots as the serial plan serves; the kernel builds the plan, then
        # declines when the experts receive more rows than the fused kernels take.
        if experts.quantizes_activations or ids.numel() > plan_kernels.MIN_SLOTS_PER_CHUNK:
            return None  # before the setup: a large batch pays nothing here
        setup = decode_setup(x, experts)
        if not takes_decode_step(setup, experts, ids.numel()):
            return None
        status, out = decode(setup, x, scalars_array(weights, x.dtype), ids.detach().contiguous().numpy(),
                             routing_kernels.NO_ROUTING, experts)
        if status == mlp.NOT_DECODE:
            return None
        if status:
            refuse_bad_ids(ids, experts.num_experts, status)
        return out

    def routed_decode(self, x, router, top_k, experts, **route_options):
        if experts.quantizes_activations:
            return None
        setup = decode_setup(x, experts)
        return None if setup.kernels is None else RoutedDecode(x, router, top_k, experts, setup, **route_options)
