"""Each path of the numba backend's expert MLP timed in turns on one preset: the decode kernels,
the register tiles and the blocked path's library products, whatever the thresholds in
backends/numba_backend.py would choose. What those thresholds are set from (docs/cpu.md).

    python benchmarks/cpu_paths.py --preset olmoe-1b-7b --scale 0.5 --tokens 128,256,512
    python benchmarks/cpu_paths.py --dtype float32 --tokens 256,1024
    python benchmarks/cpu_paths.py --weights int4 --tokens 128,256
"""

from __future__ import annotations

import argparse

import torch

import moe_dispatch as md
from moe_dispatch.backends import numba_backend as nb
from moe_dispatch.benchmarking.cases import make_experts, make_inputs, quantize_experts
from moe_dispatch.benchmarking.presets import get_preset
from moe_dispatch.benchmarking.timing import measure_many, median

# (the rows limit of the decode kernels, whether the register tiles serve any size) per path;
# the limits are functions made once: a step's thresholds are kept per ExpertWeights under a
# key that holds them (numba_backend.decode_setup)
PATHS = {"decode": (lambda *args, **kwargs: float("inf"), False), "register tiles": (lambda *args, **kwargs: 0, True),
         "blocked": (lambda *args, **kwargs: 0, False)}


def forced(path: str) -> None:
    """Send the steps that follow down path."""
    limit, tiles = PATHS[path]
    nb.fused_rows_limit = limit
    nb.BF16_REGISTER_TILES = nb.LARGE_FLOAT32_REGISTER_TILES = tiles
    nb.QUANTIZED_REGISTER_TILES_MAX_EXPERT_BYTES = float("inf") if tiles else 0
    nb.REGISTER_TILES_MAX_EXPERT_FLOPS = float("inf") if tiles else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="olmoe-1b-7b")
    parser.add_argument("--scale", type=float, default=0.5)
    parser.add_argument("--tokens", default="128,256,512")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--weights", default="dense", help="dense, or a quantized format (bfloat16 only)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--budget", type=float, default=1.5, help="seconds timed per point, all paths together")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device("cpu"), getattr(torch, args.dtype)
    preset = get_preset(args.preset, args.scale)
    experts = make_experts(preset, dtype, device)
    if args.weights != "dense":
        experts = quantize_experts(experts, args.weights)
    weights: dict[str, md.ExpertWeights] = {}
    print(f"{args.preset} x{args.scale}, {args.dtype}, {args.weights} weights, {torch.get_num_threads()} threads; "
          f"median ms of each path, timed in turns")
    for tokens in (int(t) for t in args.tokens.split(",")):
        inputs = make_inputs(preset, tokens, dtype, device)
        calls = {}
        for path in PATHS:
            weights[path] = md.ExpertWeights(experts.weights.w_gate_up, experts.weights.w_down)

            def step(path=path):
                forced(path)
                return md.moe_mlp(inputs.x, inputs.weights, inputs.ids, weights[path], backend="numba")
            step()  # compiles, and makes the decode setup with this path's thresholds
            calls[path] = step
        with torch.no_grad():
            times = {path: median(t) for path, t in measure_many(calls, device, budget_s=args.budget).items()}
        rows = tokens * preset.top_k / preset.num_experts
        print(f"T={tokens:5d} ({rows:6.1f} rows per expert): "
              + "  ".join(f"{path} {ms:8.3f}" for path, ms in times.items()))


if __name__ == "__main__":
    main()
