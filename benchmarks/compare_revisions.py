"""Time moe_mlp (or the whole MoE layer) on two revisions of this repository side by side, and
print the ratio of their medians: whether a change made anything slower.

    python benchmarks/compare_revisions.py HEAD~1                    # that commit against the working tree
    python benchmarks/compare_revisions.py v1 --new v2 --preset qwen3-30b-a3b --tokens 1,64
    python benchmarks/compare_revisions.py HEAD~1 --dtypes bfloat16 --weights int4,fp8   # quantized experts
    python benchmarks/compare_revisions.py HEAD~1 --op layer --tokens 1     # router, routing and experts

The old revision is checked out into a temporary worktree. One worker process per revision
builds the same inputs (a preset's shape, seeded), warms every point up (JIT compiles outside
the timing), then the two take turns: a burst of calls on one, a burst on the other, for
`--rounds` rounds, alternating which goes first. A machine's drift over minutes (other tenants,
clocks) then falls on both sides alike, where separate runs one after the other would each
catch a different part of it. Only the public API is called, so any two revisions compare.

Each worker compiles the kernels afresh into its own Numba cache directory, so that neither side
runs kernels loaded from an earlier run's cache. On a 2-core cloud VM the same code against
itself (float32 olmoe-1b-7b x0.5, T=512) came out 0.93x with the new side's kernels from the
cache and 0.97-1.02x with both compiled in their process, and a process compiling them ran
3-4% faster than one loading them in 5 of 6 pairs, though the machine code was the same byte
for byte.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from moe_dispatch.benchmarking.timing import KEPT_BLOCK_BYTES, KEPT_FREE_BYTES

REPOSITORY = Path(__file__).resolve().parent.parent

# The worker: reads one JSON command per line, answers one JSON line.
WORKER = r'''
import functools, json, sys, time
import torch
import moe_dispatch as md
from moe_dispatch.benchmarking.presets import get_preset

torch.set_num_threads(int(sys.argv[1]))
points = {}
for line in sys.stdin:
    command = json.loads(line)
    if command["do"] == "setup":
        preset = get_preset(command["preset"], command["scale"])
        dtype = getattr(torch, command["dtype"])
        gen = torch.Generator().manual_seed(0)
        e, k, h, i = preset.num_experts, preset.top_k, preset.hidden_size, preset.intermediate_size
        width = 2 * i if preset.activation in ("swiglu", "geglu", "clamped_swiglu") else i
        w_gate_up = (torch.randn(e, width, h, generator=gen) * h**-0.5).to(dtype)
        w_down = (torch.randn(e, h, i, generator=gen) * i**-0.5).to(dtype)
        if command["weights"] != "dense":  # round to nearest, each format's default groups
            w_gate_up, w_down = (md.quantize(w, command["weights"], dtype=dtype) for w in (w_gate_up, w_down))
        t = command["tokens"]
        x = torch.randn(t, h, generator=gen).to(dtype)
        ids = torch.rand(t, e, generator=gen).topk(k, dim=-1).indices
        weights = torch.rand(t, k, generator=gen).softmax(-1)
        # the experts declared once, as a layer holds them (a revision before ExpertWeights: tensors)
        if hasattr(md, "ExpertWeights"):
            experts = (md.ExpertWeights(w_gate_up, w_down, activation=preset.activation),)
            options = {}
        else:
            experts, options = (w_gate_up, w_down), {"activation": preset.activation}
        if command["op"] == "layer":  # the preset's layer (its routing, shared experts), weights its own (seeded)
            torch.manual_seed(0)
            shape = (preset.layer_kwargs() if hasattr(preset, "layer_kwargs") else  # a revision before layer_kwargs
                     dict(hidden_size=h, intermediate_size=i, num_experts=e, top_k=k, activation=preset.activation))
            layer = md.MoE(**shape, dtype=dtype, backend=command["backend"])
            if command["weights"] != "dense":
                layer.quantize_(command["weights"])
            call = functools.partial(layer, x)
        else:
            call = functools.partial(md.moe_mlp, x, weights, ids, *experts, **options, backend=command["backend"])
        key = command["key"]
        points[key] = call
        with torch.no_grad():
            call()  # compiles the kernels; warmup_s of calls after it
            start = time.perf_counter()
            while time.perf_counter() - start < command["warmup_s"]:
                call()
        print(json.dumps({"ok": key}), flush=True)
    else:
        call = points[command["key"]]
        times = []
        with torch.no_grad():
            for _ in range(command["reps"]):
                start = time.perf_counter()
                call()
                times.append(time.perf_counter() - start)
        print(json.dumps({"times": times}), flush=True)
'''


class Worker:
    def __init__(self, tree: Path, threads: int, keep_freed_memory: bool, cache: Path):
        env = dict(os.environ, PYTHONPATH=str(tree), NUMBA_CACHE_DIR=str(cache))
        if keep_freed_memory:  # timing.keep_freed_memory's settings, through glibc's variables
            env.update(MALLOC_MMAP_THRESHOLD_=str(KEPT_BLOCK_BYTES), MALLOC_TRIM_THRESHOLD_=str(KEPT_FREE_BYTES))
        self.process = subprocess.Popen([sys.executable, "-c", WORKER, str(threads)], cwd=tree, env=env, text=True,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def ask(self, **command) -> dict:
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"a worker stopped: exit code {self.process.wait()}")
        return json.loads(line)

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old", help="the revision to compare against")
    parser.add_argument("--new", help="another revision (default: the working tree)")
    parser.add_argument("--op", choices=("moe_mlp", "layer"), default="moe_mlp",
                        help="moe_mlp, or the preset's whole MoE layer (router, routing, routed and shared experts)")
    parser.add_argument("--preset", default="olmoe-1b-7b")
    parser.add_argument("--scale", type=float, default=0.5)
    parser.add_argument("--tokens", default="1,16,512")
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--backends", default="numba,torch")
    parser.add_argument("--weights", default="dense", help="dense, or quantized formats: int8,int4,fp8,mxfp4")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--rounds", type=int, default=15, help="turns of each side per point")
    parser.add_argument("--seconds", type=float, default=0.2, help="about how long a burst lasts")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="the workers' malloc keeps freed memory (as `moe-dispatch bench --keep-freed-memory`)")
    args = parser.parse_args()
    points = [(backend, dtype, weights, int(t)) for backend in args.backends.split(",")
              for dtype in args.dtypes.split(",") for weights in args.weights.split(",") for t in args.tokens.split(",")]
    times: dict = {}
    with tempfile.TemporaryDirectory() as scratch:
        old_tree = Path(scratch) / "old"
        subprocess.run(["git", "-C", str(REPOSITORY), "worktree", "add", "--detach", "--force", str(old_tree),
                        args.old], check=True, capture_output=True)
        new_tree = REPOSITORY
        if args.new:
            new_tree = Path(scratch) / "new"
            subprocess.run(["git", "-C", str(REPOSITORY), "worktree", "add", "--detach", "--force", str(new_tree),
                            args.new], check=True, capture_output=True)
        workers = {side: Worker(tree, args.threads, args.keep_freed_memory, Path(scratch) / f"{side}-cache")
                   for side, tree in (("old", old_tree), ("new", new_tree))}
        try:
            for backend, dtype, weights, tokens in points:
                key = f"{backend}-{dtype}-{weights}-{tokens}"
                print(f"{key}: warming up", file=sys.stderr, flush=True)
                for worker in workers.values():
                    worker.ask(do="setup", key=key, preset=args.preset, scale=args.scale, dtype=dtype, weights=weights,
                               tokens=tokens, backend=backend, op=args.op, warmup_s=2.0)
                one = statistics.median(workers["new"].ask(do="time", key=key, reps=5)["times"])
                reps = max(1, int(args.seconds / max(one, 1e-6)))
                for round_ in range(args.rounds):
                    for side in (("old", "new") if round_ % 2 == 0 else ("new", "old")):
                        burst = workers[side].ask(do="time", key=key, reps=reps)["times"]
                        times.setdefault((key, side), []).append(statistics.median(burst))
        finally:
            for worker in workers.values():
                worker.close()
            for tree in (old_tree, new_tree):
                if tree != REPOSITORY:
                    subprocess.run(["git", "-C", str(REPOSITORY), "worktree", "remove", "--force", str(tree)],
                                   capture_output=True)
    title = (f"{args.op}, {args.preset} at scale {args.scale:g}, {args.threads} threads: {args.old} against "
             f"{args.new or 'the working tree'}, median of {args.rounds} alternating bursts")
    table = Table(title=title, title_justify="left")
    for column in ("backend", "dtype", "weights", "tokens", "old ms", "new ms", "old / new"):
        table.add_column(column, justify="left" if column in ("backend", "dtype", "weights") else "right")
    for backend, dtype, weights, tokens in points:
        key = f"{backend}-{dtype}-{weights}-{tokens}"
        old, new = (1e3 * statistics.median(times[(key, side)]) for side in ("old", "new"))
        table.add_row(backend, dtype, weights, str(tokens), f"{old:.3f}", f"{new:.3f}", f"{old / new:.2f}x")
    Console(width=200).print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
