"""Where an eager call's time goes on a GPU: the host's share, the kernels it launches, the
Python functions its host time is spent in.

    python benchmarks/host_overhead.py --preset qwen3-30b-a3b --tokens 1,128,1024 --op moe_mlp,permute

Per point, in one table: the eager call's median time with the GPU waited for; the median time
for the call to return without waiting (the host's share; a call that syncs with the host
shows its GPU time here too); the kernels launched per call (torch.profiler); a CUDA graph
replay of the same call (the GPU's share, where it can be captured). Then, for the first point,
cProfile's functions by own time. An eager call costs at least its launches: where the host's
share is close to the eager time, fewer launches or less Python per call is the way down.
"""

from __future__ import annotations

import argparse
import cProfile
import collections
import io
import pstats
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table

from moe_dispatch.benchmarking.bench import BenchSpec, backend_call, build_experts, prepare
from moe_dispatch.benchmarking.presets import get_preset
from moe_dispatch.benchmarking.timing import capture_cuda_graphs, measure, synchronize

CALLS = 50


def _returns_ms(fn, device) -> float:
    """The median time for fn() to return, the GPU idle when each call starts."""
    times = []
    for _ in range(CALLS):
        synchronize(device)
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    synchronize(device)
    return statistics.median(times)


def _kernels(fn, device) -> collections.Counter:
    """The kernels one call of fn launches on a GPU, by name."""
    if device.type != "cuda":
        return collections.Counter()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize(device)
    return collections.Counter(e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def _top_functions(fn, device, count: int) -> str:
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(CALLS):
        fn()
    synchronize(device)
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(count)
    return text.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="qwen3-30b-a3b")
    parser.add_argument("--tokens", default="1,16,128,1024")
    parser.add_argument("--op", default="moe_mlp", help="ops, comma separated: moe_mlp, grouped_mm, permute, unpermute")
    parser.add_argument("--backend", default="triton")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--weights", default=None, help="a quantized format, as bench --weights")
    parser.add_argument("--functions", type=int, default=20, help="cProfile's top functions for the first point")
    parser.add_argument("--device", default="cuda", help="cuda; cpu only tries the script out (all is host there)")
    args = parser.parse_args()
    device = torch.device(args.device)
    preset, ops = get_preset(args.preset), args.op.split(",")
    spec = BenchSpec([preset], [int(t) for t in args.tokens.split(",")], getattr(torch, args.dtype), [args.backend],
                     [], device, ops=tuple(ops), weights=args.weights)
    experts, _ = build_experts(spec, preset)
    table = Table(title=f"{preset.name}, {args.dtype}{', ' + args.weights if args.weights else ''}, {args.backend}:"
                        " one eager call")
    for column in ("op", "T", "eager ms", "returns ms", "graph ms", "kernels", "kernels launched (count)"):
        table.add_column(column, justify="left" if column.startswith("kernels launched") or column == "op" else "right")
    first = None
    for op in ops:
        for tokens in spec.tokens:
            fn = backend_call(spec, prepare(spec, experts, tokens, op), args.backend)
            eager = statistics.median(measure(fn, device, warmup=3, budget_s=0.2))
            returns = _returns_ms(fn, device)
            replays = capture_cuda_graphs({"call": fn}, device) if device.type == "cuda" else {}
            graph = f"{statistics.median(measure(replays['call'], device, budget_s=0.2)):.3f}" if replays else "-"
            kernels = _kernels(fn, device)
            launched = ", ".join(f"{name[:40]} ({n})" for name, n in kernels.most_common())
            table.add_row(op, str(tokens), f"{eager:.3f}", f"{returns:.3f}", graph, str(sum(kernels.values())),
                          launched)
            first = first or (op, tokens, fn)
    console = Console(width=200)
    op, tokens, fn = first
    console.print(f"cProfile, {op} at T={tokens}, {CALLS} calls, by own time:")
    console.print(_top_functions(fn, device, args.functions), markup=False, highlight=False)
    console.print(table)


if __name__ == "__main__":
    main()
