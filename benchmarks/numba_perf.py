"""Where a numba step's time goes, by compiled function: `perf` samples of moe_mlp on one preset,
with the kernels' machine code named.

    python benchmarks/numba_perf.py --weights int4 --tokens 16 --threads 1 --seconds 10

Numba's compiled code has no symbols that perf can read, so the step is compiled afresh (in a
new NUMBA_CACHE_DIR: code loaded from the cache keeps no list of its functions), every function
of every kernel module is written into /tmp/perf-<pid>.map, the file perf reads for code made at
run time, and perf records this process while it repeats the step. The table gives each
function's share of the samples (both threads' with --threads 2: a thread waiting in the
OpenMP runtime shows as libgomp). A function's extent is taken to run to the next one's start,
at most 256 KB. Needs Linux's perf; the first step compiles for a minute or so.
"""

from __future__ import annotations

import os
import tempfile

# before numba is imported: a fresh cache, so that every kernel is compiled in this process
os.environ["NUMBA_CACHE_DIR"] = tempfile.mkdtemp(prefix="moe_dispatch_perf_")

import argparse  # noqa: E402
import importlib  # noqa: E402
import pkgutil  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import numba  # noqa: E402
import torch  # noqa: E402
from numba.core.registry import CPUDispatcher  # noqa: E402

import moe_dispatch as md  # noqa: E402
import moe_dispatch.kernels.numba as kernels  # noqa: E402
from moe_dispatch.benchmarking.cases import make_experts, make_inputs, quantize_experts  # noqa: E402
from moe_dispatch.benchmarking.presets import get_preset  # noqa: E402

LONGEST = 256 * 1024  # bytes a function may span in the map


def readable(symbol: str) -> str:
    """Numba's mangled name as module.function ("_ZN12moe_dispatch7kernels5numba9quantized11
    expert_dotsB3v92..." -> quantized.expert_dots); a parfor's body as such."""
    if "numba_parfor_gufunc" in symbol:
        return "(a prange loop's body)"
    parts, rest = [], symbol[3:] if symbol.startswith("_ZN") else symbol
    while (match := re.match(r"(\d+)", rest)) is not None:
        length = int(match.group(1))
        start = match.end()
        parts.append(rest[start:start + length])
        rest = rest[start + length:]
    return ".".join(parts[-2:]) if parts else symbol


def compiled_functions() -> list[tuple[int, str]]:
    """(address, name) of every function compiled for the kernel modules' dispatchers."""
    found = set()
    for info in pkgutil.iter_modules(kernels.__path__):
        module = importlib.import_module(f"{kernels.__name__}.{info.name}")
        for dispatcher in vars(module).values():
            if not isinstance(dispatcher, CPUDispatcher):
                continue
            for result in dispatcher.overloads.values():
                library = result.library
                for function in library._final_module.functions:
                    if not function.is_declaration:
                        found.add((library.get_pointer_to_function(function.name), readable(function.name)))
    return sorted(found)


def write_perf_map(functions: list[tuple[int, str]]) -> str:
    path = f"/tmp/perf-{os.getpid()}.map"
    with open(path, "w") as f:
        for i, (address, name) in enumerate(functions):
            end = functions[i + 1][0] if i + 1 < len(functions) else address + LONGEST
            f.write(f"{address:x} {min(end - address, LONGEST):x} {name}\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="olmoe-1b-7b")
    parser.add_argument("--scale", type=float, default=0.5)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--weights", default="dense", help="dense, or a quantized format: int8, int4, fp8, mxfp4")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--seconds", type=float, default=10.0, help="how long perf records")
    parser.add_argument("--rows", type=int, default=25, help="functions listed")
    args = parser.parse_args()
    if shutil.which("perf") is None:
        raise SystemExit("numba_perf.py needs Linux's perf on the PATH")
    torch.set_num_threads(args.threads)
    numba.set_num_threads(args.threads)
    preset = get_preset(args.preset, args.scale)
    experts = make_experts(preset, getattr(torch, args.dtype), "cpu")
    if args.weights != "dense":
        experts = quantize_experts(experts, args.weights)
    inputs = make_inputs(preset, args.tokens, getattr(torch, args.dtype), "cpu")

    def step():
        md.moe_mlp(inputs.x, inputs.weights, inputs.ids, experts.weights, backend="numba")

    start = time.perf_counter()
    step()
    print(f"first step (compiles): {time.perf_counter() - start:.1f} s")
    perf_map = write_perf_map(compiled_functions())
    data = os.path.join(os.environ["NUMBA_CACHE_DIR"], "perf.data")
    recorder = subprocess.Popen(["perf", "record", "-q", "-p", str(os.getpid()), "-o", data, "--", "sleep",
                                 str(args.seconds)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done, steps = threading.Event(), 0
    threading.Thread(target=lambda: (recorder.wait(), done.set()), daemon=True).start()
    start = time.perf_counter()
    while not done.is_set():
        step()
        steps += 1
    print(f"{args.preset} x{args.scale}, {args.weights} weights, {args.dtype}, T={args.tokens}, {args.threads} "
          f"threads: {(time.perf_counter() - start) / steps * 1e3:.3f} ms a step over {steps} steps")
    report = subprocess.run(["perf", "report", "-i", data, "--no-children", "--sort", "dso,sym", "--stdio"],
                            capture_output=True, text=True).stdout
    rows = [line for line in report.splitlines() if line.strip() and not line.startswith("#")]
    for line in rows[:args.rows]:
        print(re.sub(r"\s+", " ", line.strip())[:150])
    os.remove(perf_map)
    shutil.rmtree(os.environ["NUMBA_CACHE_DIR"], ignore_errors=True)


if __name__ == "__main__":
    main()
