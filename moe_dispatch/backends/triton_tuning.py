"""Which tile config each Triton launch gets: the candidates per kernel and shape, the
autotuner with its on-disk cache, and the compile fallback.

- Defaults come from a heuristic on the shape and fit in ~96 KB of shared memory, which every
  GPU since sm_80 has, consumer cards included (sm_86/89/120 have about 100 KB). On sm_90 and
  sm_100 the candidates may use up to ~200 KB.
- Autotuning (on by default on CUDA; MOE_DISPATCH_AUTOTUNE=0 pins the default config) times
  the candidates once per shape bucket and stores the winner in
  $MOE_DISPATCH_CACHE_DIR (default ~/.cache/moe_dispatch)/triton-<version>-<device>.json,
  stamped with the versions of this package and Triton and the GPU's name: a file stamped
  otherwise, or unreadable, is ignored with a warning and rewritten (cache_files.py), and an
  entry that is no launchable TileConfig is tuned again.
  It never runs while a CUDA graph is being captured or while torch's sync debug mode is on
  (timing needs host syncs): those calls use the cached or default config. The first tuning
  in a process logs a warning on the "moe_dispatch" logger, since that call pauses.
- float32 without TF32 (torch's default) makes tl.dot an FMA loop on the CUDA cores, which
  holds each thread's slices of both operands in registers: its candidates are smaller tiles,
  with short K-steps and more warps, so that ptxas does not spill (_fma_tiles).
- A candidate that fails to compile or launch (OutOfResources or anything else) is skipped
  with a warning; the chosen config failing falls back to SAFE, once, with a warning. An error
  that an earlier kernel left on the device (a device-side assert) is raised as it came.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, replace
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterator, Optional, TypeVar

import torch
import triton

from .. import cache_files
from ..cache_files import CACHE_DIR_ENV  # noqa: F401 (where the tests and tools look it up)
from ..kernels.triton.tiles import TileConfig, dot_precision

AUTOTUNE_ENV = "MOE_DISPATCH_AUTOTUNE"
LOG = logging.getLogger("moe_dispatch")
SMALL_SMEM = 96 * 1024
LARGE_SMEM = 200 * 1024
Result = TypeVar("Result")


# Compiles everywhere Triton runs: small tiles, two stages, well under 48 KB of shared memory.
SAFE = TileConfig(32, 32, 32, num_warps=4, num_stages=2)
# Under TRITON_INTERPRET=1 the sizes only need to exercise every tail.
INTERPRETER = TileConfig(16, 16, 16, num_warps=1, num_stages=1)


def shared_memory_budget(device: torch.device) -> int:
    major, _ = torch.cuda.get_device_capability(device)
    return LARGE_SMEM if major in (9, 10) else SMALL_SMEM


def _fit(tile: TileConfig, elem_bytes: int, operands_n: int, budget: int) -> Optional[TileConfig]:
    """The tile with as many pipeline stages (2..4) as fit the budget, or None."""
    per_stage = (tile.block_m * tile.block_k + operands_n * tile.block_k * tile.block_n) * elem_bytes
    stages = min(4, budget // per_stage)
    return replace(tile, num_stages=stages) if stages >= 2 else None


def _candidates(tiles, elem_bytes: int, operands_n: int, budget: int) -> list[TileConfig]:
    fitted = (_fit(TileConfig(*t), elem_bytes, operands_n, budget) for t in dict.fromkeys(tiles))
    return [c for c in fitted if c is not None] or [SAFE]


def _fma_tiles(tiles, block_k: int) -> list[tuple]:
    """The tiles for an FMA dot (float32 without TF32): at most 8192 outputs, at least 8 warps,
    K-steps of block_k, the one with which none of a kernel's tiles spills inside its main
    loop on sm_80, 86, 89, 90 or 120; larger tiles do (docs/gpu.md, "Tile configs")."""
    return [(m, n, min(k, block_k), max(w, 8)) for m, n, k, w in tiles if m * n <= 8192]


def _mma_warps(tiles) -> list[tuple]:
    """The tiles with no more warps than the tensor cores' tiles of 16 x 8 outputs they hold: a
    16 x 16 tile of 4 warps gives two warps the same outputs, and each pair decodes the same
    quantized weights (`python benchmarks/kernel_loops.py`: twice the instructions a weight)."""
    return [(m, n, k, min(w, max(1, (m // 16) * (n // 8)))) for m, n, k, w in tiles]


def gemm_tiles(rows_per_expert: float, two: bool, elem_bytes: int, budget: int,
               fma: bool = False) -> list[TileConfig]:
    """Tile candidates for grouped_gemm_kernel under a shared-memory budget, the default first.

    The tile height follows the mean rows per expert. two: the gated GEMM's two accumulators.
    fma: float32 without TF32 (see _fma_tiles).
    """
    big = budget > SMALL_SMEM
    if rows_per_expert <= 16:
        tiles = [(16, 64, 128, 4), (16, 128, 64, 4), (16, 32, 128, 4), (32, 64, 64, 4)]
    elif rows_per_expert <= 64:
        tiles = [(32, 64, 64, 4), (64, 64, 64, 4), (32, 128, 64, 4), (64, 128, 32, 4)]
    else:
        tiles = [(64, 128, 32, 4), (128, 64, 32, 4), (64, 64, 64, 4), (128, 128, 32, 8)]
        if big:
            tiles = [(128, 128, 64, 8), (128, 256, 64, 8), (64, 256, 64, 8)] + tiles
    if two:
        # Twice the warps keep two accumulators in registers (ptxas spills otherwise);
        # 128x128 only where 16 warps still leave 128 registers a thread (sm_90, sm_100).
        largest = 128 * 128 if big else 128 * 64
        tiles = [(m, n, k, min(16, 2 * w)) for m, n, k, w in tiles if n <= 128 and m * n <= largest]
    tiles = _fma_tiles(tiles, 16) if fma else _mma_warps(tiles)
    candidates = _candidates(tiles, elem_bytes, 2 if two else 1, budget)
    if big and rows_per_expert > 64 and not fma:
        # Hopper and later: the two leading tiles again with TMA weight loads, for the tuner to weigh
        candidates += [replace(c, tma=True) for c in candidates[:2]]
    return candidates


def w8a8_tiles(tiles: list[TileConfig], two: bool) -> list[TileConfig]:
    """A w8a8 GEMM's tiles: the 16-bit ones (their K-steps divide 128) with at least 8 warps,
    and at most 64 columns for two accumulators. On sm_80/86 both operands' e4m3 codes are
    decoded in registers: 4 warps' 64x128 tile spills (216 bytes a thread on sm_80), and so
    does the gated one with 8 warps (192 bytes on sm_86) or 16 (8 bytes on sm_80)."""
    return list(dict.fromkeys(replace(c, num_warps=max(c.num_warps, 8), block_n=min(c.block_n, 64) if two else
                                      c.block_n) for c in tiles))


def decode_tiles(n_cols: int, programs_per_tile: int, two: bool, elem_bytes: int, budget: int,
                 sms: int, fma: bool = False) -> list[TileConfig]:
    """Tile candidates for the decode kernels (kernels/triton/decode.py), the default first.

    Their rows are the 16 tokens, so only the width and the K-step vary: narrow tiles spread
    a few experts' weights over many programs, long K-steps keep enough bytes in flight per
    program to stream them. The default is the widest tile that still gives ~2 programs per SM
    (programs_per_tile: how many programs share each column tile), else the narrowest.
    """
    if fma:  # float32 without TF32: tiles that spill nothing on sm_80, 86, 89, 90 or 120
        tiles = [(16, 64, 64, 8), (16, 32, 64, 8), (16, 16, 128, 8)]
    else:
        tiles = _mma_warps([(16, 64, 128, 4), (16, 32, 128, 4), (16, 16, 256, 4), (16, 32, 256, 4), (16, 16, 512, 4)])
    wide_enough = [t for t in tiles if triton.cdiv(n_cols, t[1]) * programs_per_tile >= 2 * sms]
    default = wide_enough[0] if wide_enough else min(tiles, key=lambda t: t[1])  # the first narrowest
    return _candidates([default] + [t for t in tiles if t != default], elem_bytes, 2 if two else 1, budget)


def act_backward_tiles(rows_per_expert: float, elem_bytes: int, budget: int,
                       fma: bool = False) -> list[TileConfig]:
    """Tile candidates for grouped_gemm_act_backward_kernel, the default first: its epilogue
    holds g, both halves of h and dh at once, so its tiles are smaller than the forward's."""
    if rows_per_expert <= 16:
        tiles = [(16, 64, 128, 4), (16, 32, 128, 4), (32, 64, 64, 4)]
    else:
        # 8 warps for 64x64: with 4, the gated epilogue needs all 255 registers and spills
        tiles = [(64, 64, 64, 8), (64, 64, 32, 8), (64, 128, 32, 8), (128, 64, 32, 8)]
        if budget > SMALL_SMEM:
            tiles[1:1] = [(64, 128, 64, 8), (128, 64, 64, 8)]
    return _candidates(_fma_tiles(tiles, 32) if fma else tiles, elem_bytes, 1, budget)


def wgrad_tiles(elem_bytes: int, budget: int, fma: bool = False) -> list[TileConfig]:
    """Tile candidates for grouped_wgrad_kernel (K = rows of one expert), the default first."""
    tiles = [(64, 64, 32, 4), (64, 128, 32, 4), (128, 64, 32, 8), (128, 128, 32, 8)]
    if budget > SMALL_SMEM:
        tiles = [(128, 128, 64, 8), (128, 256, 64, 8)] + tiles
    return _candidates(_fma_tiles(tiles, 32) if fma else tiles, elem_bytes, 1, budget)


def gemm_candidates(num_rows: int, num_experts: int, k_dim: int, n_cols: int, two: bool,
                    dtype: torch.dtype, device: torch.device) -> list[TileConfig]:
    """gemm_tiles for this device, each with the K-split that fills it (the decode variant)."""
    tiles = gemm_tiles(num_rows / max(num_experts, 1), two, _bytes(dtype), shared_memory_budget(device),
                       uses_fma(dtype, device))
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return [replace(c, split_k=_split_k(c, num_rows, num_experts, k_dim, n_cols, sms)) for c in tiles]


def _split_k(config: TileConfig, num_rows: int, num_experts: int, k_dim: int, n_cols: int, sms: int) -> int:
    """Enough K-splits for ~2 programs per SM when the row tiles alone are too few."""
    # at least one tile per busy expert, at least R / BLOCK_M in all
    m_tiles = max(triton.cdiv(num_rows, config.block_m), min(num_rows, num_experts))
    tiles = max(1, m_tiles * triton.cdiv(n_cols, config.block_n))
    wanted = triton.cdiv(2 * sms, tiles)
    return max(1, min(8, wanted, k_dim // (4 * config.block_k)))


def decode_candidates(n_cols: int, programs_per_tile: int, two: bool, dtype: torch.dtype,
                      device: torch.device) -> list[TileConfig]:
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return decode_tiles(n_cols, programs_per_tile, two, _bytes(dtype), shared_memory_budget(device), sms,
                        uses_fma(dtype, device))


def act_backward_candidates(num_rows: int, num_experts: int, dtype: torch.dtype,
                            device: torch.device) -> list[TileConfig]:
    return act_backward_tiles(num_rows / max(num_experts, 1), _bytes(dtype), shared_memory_budget(device),
                              uses_fma(dtype, device))


def wgrad_candidates(dtype: torch.dtype, device: torch.device) -> list[TileConfig]:
    return wgrad_tiles(_bytes(dtype), shared_memory_budget(device), uses_fma(dtype, device))


def _bytes(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits // 8


# ---- how float32 multiplies, which the keys and candidates follow


def uses_fma(dtype: torch.dtype, device: torch.device) -> bool:
    """float32 without TF32: tl.dot runs as FMAs on the CUDA cores, not on the tensor cores."""
    return dtype == torch.float32 and dot_precision(dtype, device) == "ieee"


def dtype_tag(dtype: torch.dtype, device: torch.device) -> str:
    """The dtype as the autotune keys name it: float32 with how it multiplies, since the FMA and
    the TF32 dots have different candidates and winners."""
    name = str(dtype).split(".")[1]
    return f"{name}-{dot_precision(dtype, device)}" if dtype == torch.float32 else name


# ---- the autotune cache --------------------------------------------------------------------


@lru_cache(maxsize=None)
def _device_slug(device: torch.device) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", torch.cuda.get_device_name(device)).strip("-")


def cache_path(device: torch.device) -> Path:
    return cache_files.cache_dir() / f"triton-{triton.__version__}-{_device_slug(device)}.json"


@lru_cache(maxsize=None)  # asked on every launch on a GPU
def cache_stamp(device: Optional[torch.device] = None) -> dict:
    """What a tuning result depends on besides its key. The file name holds Triton's version and
    a slug of the GPU's name, but two GPUs can share a slug and a package upgrade can change the
    kernels and their candidates: results stamped otherwise are not used."""
    from .. import __version__  # the package is imported by the time anything is tuned

    gpu = torch.cuda.get_device_name(device) if device is not None and device.type == "cuda" else "none"
    return {"moe_dispatch": __version__, "triton": triton.__version__, "device": gpu}


def _config(entry) -> Optional[TileConfig]:
    """The TileConfig a cache entry holds, or None for one of another shape or with values no
    launch takes (positive ints; powers of two where tl.arange and the warps need them)."""
    try:
        config = TileConfig(**entry)
    except TypeError:  # not a mapping, or the fields of another version of TileConfig
        return None
    powers = (config.block_m, config.block_n, config.block_k, config.num_warps)
    counts = powers + (config.num_stages, config.split_k)
    if (all(type(v) is int and v > 0 for v in counts) and not any(v & (v - 1) for v in powers)
            and type(config.tma) is bool):
        return config
    return None


def shape_bucket(num_rows: int) -> int:
    """Rows rounded up to a power of two: nearby batch sizes share one tuning result."""
    return triton.next_power_of_2(max(num_rows, 1))


def _do_bench(fn: Callable[[], object]) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=5, rep=20)


# CUDA errors that poison the context: every later call fails with them, whatever its config.
_STICKY_CUDA_ERRORS = ("device-side assert", "illegal memory access", "illegal instruction", "misaligned address",
                       "unspecified launch failure")


def _sticky_cuda_error(exc: Exception) -> bool:
    return any(text in str(exc) for text in _STICKY_CUDA_ERRORS)


class Tuner:
    """Picks a config per key: the cached result, else (when allowed) the fastest candidate.

    bench(fn) -> milliseconds times one candidate; run() is the entry point the launchers use.
    """

    def __init__(self, bench: Callable[[Callable[[], object]], float] = _do_bench):
        self.bench = bench
        self._lock = threading.Lock()
        self._tables: dict[Path, dict] = {}
        self._failed: set[tuple[str, TileConfig]] = set()
        # run()'s choices that cannot change, by key, device and the settings they were made under
        self._settled: dict[tuple, TileConfig] = {}
        self.announced = False  # the notice that a first call pauses to tune was logged (or not wanted)

    def run(self, key: str, candidates: Callable[[], list[TileConfig]], launch: Callable[[TileConfig], Result],
            device: torch.device) -> Result:
        """launch(config) with the config for key, tuning first when allowed and not cached.

        candidates() lists the configs to try, the default first; CPU tensors (the
        interpreter) always use INTERPRETER.
        """
        if device.type != "cuda":
            return launch(INTERPRETER)
        # The host's time per launch is what an eager decode step costs: a settled choice skips
        # the candidates, the cache file's name and its stamp from then on.
        memo = (key, device, os.environ.get(AUTOTUNE_ENV, "1"), os.environ.get(cache_files.CACHE_DIR_ENV))
        config = self._settled.get(memo)
        if config is None:
            config, settled = self._select(key, candidates, launch, cache_path(device), _may_tune(),
                                           cache_stamp(device))
            if settled:
                self._settled[memo] = config
        return self.launch(key, config, launch)

    def select(self, key: str, candidates: Callable[[], list[TileConfig]], launch: Callable[[TileConfig], object],
               path: Path, may_tune: bool, stamp: Optional[dict] = None) -> TileConfig:
        """The cached config for key in the table at path, else the fastest candidate (persisted),
        else the default candidates()[0] (autotuning off, or tuning not allowed now). stamp:
        what the table must be stamped with (cache_stamp(device); default: no GPU)."""
        return self._select(key, candidates, launch, path, may_tune, stamp)[0]

    def _select(self, key: str, candidates: Callable[[], list[TileConfig]], launch: Callable[[TileConfig], object],
                path: Path, may_tune: bool, stamp: Optional[dict]) -> tuple[TileConfig, bool]:
        """(select's config, whether it is settled: pinned, cached or tuned, not a default
        taken while tuning is not allowed)."""
        if os.environ.get(AUTOTUNE_ENV, "1") == "0":
            return candidates()[0], True
        stamp = stamp or cache_stamp()
        with self._lock:
            table = self._table(path, stamp)
            if key in table:
                config = _config(table[key])
                if config is not None:
                    return config, True
                cache_files.warn_once(path, f"the entry for {key} is no tile config; tuning it again")
                del table[key]
            if not may_tune:
                return candidates()[0], False
            config = self._tune(key, candidates(), launch, path)
            table[key] = asdict(config)
            # Another process may have tuned other keys since this one read the file: keep theirs.
            for other, entry in cache_files.read_stamped(path, stamp).items():
                table.setdefault(other, entry)
            cache_files.write_stamped(path, stamp, table)
            return config, True

    def launch(self, key: str, config: TileConfig, launch: Callable[[TileConfig], Result]) -> Result:
        """launch(config); if it fails (compile error, out of resources), warn and use SAFE from then on.
        An error an earlier kernel left on the device (a failed device-side check) is no fault of
        the config: it is raised as it came."""
        if (key, config) in self._failed:
            config = SAFE
        try:
            return launch(config)
        except Exception as exc:
            if config == SAFE or _sticky_cuda_error(exc):
                raise
            self._failed.add((key, config))
            warnings.warn(
                f"moe_dispatch: tile config {config} failed for {key} ({exc!r}); using the safe config {SAFE}",
                stacklevel=3,
            )
            return launch(SAFE)

    def _tune(self, key: str, options: list[TileConfig], launch: Callable, path: Path) -> TileConfig:
        if not self.announced:  # the first call of a new shape pauses to compile and time: say why, once
            self.announced = True
            LOG.warning("moe_dispatch: autotuning the Triton kernels for a new shape (once per shape, cached in %s). "
                        "`moe-dispatch tune` does it ahead of time; MOE_DISPATCH_AUTOTUNE=0 skips it.", path)
        start = time.perf_counter()
        timings = []
        for config in options:
            try:
                timings.append((self.bench(lambda: launch(config)), config))
            except Exception as exc:  # a candidate that cannot compile here is simply not a winner
                if _sticky_cuda_error(exc):  # nor could any other: nothing is learnt or cached
                    raise
                warnings.warn(f"moe_dispatch: tile config {config} failed for {key}: {exc!r}", stacklevel=4)
        winner = min(timings, key=lambda t: t[0])[1] if timings else SAFE
        LOG.info("moe_dispatch: tuned %s in %.1f s over %d candidates: %s", key, time.perf_counter() - start,
                 len(options), winner)
        return winner

    def _table(self, path: Path, stamp: dict) -> dict:
        if path not in self._tables:
            self._tables[path] = cache_files.read_stamped(path, stamp)
        return self._tables[path]


def _may_tune() -> bool:
    """Timing syncs with the host: never inside a CUDA graph capture or under sync debug mode."""
    return not torch.cuda.is_current_stream_capturing() and torch.cuda.get_sync_debug_mode() == 0


TUNER = Tuner()


@contextmanager
def tuning_asked_for() -> Iterator[None]:
    """Autotuning on, whatever MOE_DISPATCH_AUTOTUNE says, and without the notice that a call
    pauses for it: for the callers that tune ahead of time."""
    previous, announced = os.environ.get(AUTOTUNE_ENV), TUNER.announced
    os.environ[AUTOTUNE_ENV] = "1"
    TUNER.announced = True
    try:
        yield
    finally:
        if previous is None:
            del os.environ[AUTOTUNE_ENV]
        else:
            os.environ[AUTOTUNE_ENV] = previous
        TUNER.announced = announced
