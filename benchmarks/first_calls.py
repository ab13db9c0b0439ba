"""A server's first calls on an empty Numba cache, with and without warm_up before them: each
call's first time against its second, so what a request waits for the kernels to compile shows
(docs/cpu.md, "JIT cost and the cache").

    python benchmarks/first_calls.py                    # olmoe-1b-7b x0.5, bfloat16, T = 1, 16, 512, 2048
    python benchmarks/first_calls.py --weights int4 --tokens 1,64 --backward

Each mode runs in a fresh interpreter on a fresh, empty cache directory: "cold" calls the layer
at each T in turn; "warmed" runs warm_up(layer, max_tokens=max T) first, then the same calls.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from rich.console import Console
from rich.table import Table

CHILD = """
import json, sys, time
import torch
import moe_dispatch as md
from moe_dispatch.benchmarking.cases import make_experts, make_layer, quantized_experts
from moe_dispatch.benchmarking.presets import DTYPES, get_preset

args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"])
preset, dtype = get_preset(args["preset"], args["scale"]), DTYPES[args["dtype"]]
experts = (quantized_experts(preset, args["weights"], dtype, "cpu") if args["weights"]
           else make_experts(preset, dtype, "cpu"))
layer = make_layer(experts).requires_grad_(args["backward"] and not args["weights"])
result = {"warm_up": None, "calls": []}
if args["warm"]:
    start = time.perf_counter()
    md.warm_up(layer, max_tokens=max(args["tokens"]), backward=args["backward"])
    result["warm_up"] = time.perf_counter() - start
gen = torch.Generator().manual_seed(0)
for tokens in args["tokens"]:
    x = torch.randn(tokens, preset.hidden_size, generator=gen).to(dtype).requires_grad_(args["backward"])
    times = []
    for _ in range(2):
        start = time.perf_counter()
        out = layer(x)
        if args["backward"]:
            out.float().square().mean().backward()
        times.append(time.perf_counter() - start)
    result["calls"].append([tokens, *times])
print(json.dumps(result))
"""


def run(args, warm: bool) -> dict:
    settings = dict(preset=args.preset, scale=args.scale, dtype=args.dtype, weights=args.weights,
                    tokens=[int(t) for t in args.tokens.split(",")], threads=args.threads,
                    backward=args.backward, warm=warm)
    with tempfile.TemporaryDirectory(prefix="numba-cache-") as cache:
        env = {**os.environ, "NUMBA_CACHE_DIR": cache}
        done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(settings)], env=env, check=True,
                              capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="olmoe-1b-7b")
    parser.add_argument("--scale", type=float, default=0.5)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--weights", help="a quantized format (int8, int4, fp8, mxfp4)")
    parser.add_argument("--tokens", default="1,16,512,2048")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--backward", action="store_true")
    args = parser.parse_args()
    cold, warmed = run(args, warm=False), run(args, warm=True)
    table = Table(title=f"{args.preset} x{args.scale}, {args.weights or args.dtype}"
                        f"{', forward and backward' if args.backward else ''}: first and second call, seconds")
    for column in ("T", "cold: first", "second", "warmed: first", "second"):
        table.add_column(column, justify="right")
    for (tokens, *cold_times), (_, *warm_times) in zip(cold["calls"], warmed["calls"]):
        table.add_row(str(tokens), *(f"{t:.3f}" for t in (*cold_times, *warm_times)))
    console = Console()
    console.print(table)
    console.print(f"warm_up(max_tokens={max(int(t) for t in args.tokens.split(','))}) took "
                  f"{warmed['warm_up']:.1f} s; the cold calls' first times add up to "
                  f"{sum(c[1] for c in cold['calls']):.1f} s")


if __name__ == "__main__":
    main()
