"""The `moe-dispatch` command: info | bench | profile | tune."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import platform
import signal
import sys
import threading
import time
from typing import Optional

import torch

from .benchmarking.presets import DEFAULT_PRESET, DEFAULT_SCALE, DEFAULT_TOKENS, DTYPES
from .formats.quantized import PRECISIONS, quantized_formats

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class UsageError(Exception):
    """Bad command-line input: printed as one line, exit code 2."""


class Parser(argparse.ArgumentParser):
    """argparse with every error on one line (no usage block), exit code 2."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _version(module: str) -> str:
    try:
        return importlib.import_module(module).__version__
    except ImportError:
        return "not installed"


def _devices() -> list:
    return [torch.device("cpu")] + [torch.device("cuda", i) for i in range(torch.cuda.device_count())]


def _roofline_line(roofline) -> str:
    peaks = ", ".join(f"{name} {tflops:.3g}" for name, tflops in roofline.peak_tflops.items())
    return (f"read {roofline.read_gbps:.0f} GB/s, copy {roofline.copy_gbps:.0f} GB/s, "
            f"matmul TFLOP/s: {peaks}")


def cmd_info(args: argparse.Namespace) -> int:
    from . import __version__, available_backends
    from .backends import BACKEND_NAMES, get_backend, unavailable_reason
    from .benchmarking.roofline import cache_path, get_roofline

    set_threads(args.threads)
    measured = [parse_device(args.device)] if args.device else _devices()
    print(f"moe-dispatch {__version__}")
    print(f"python {platform.python_version()} on {platform.machine()} ({platform.system()})")
    for module in ("torch", "triton", "numba", "numpy"):
        print(f"{module:8s} {_version(module)}")
    devices = _devices()
    print(f"cpu      {torch.get_num_threads()} threads")
    for d in devices[1:]:
        print(f"{str(d):8s} {torch.cuda.get_device_name(d)}")
    print(f"backends available: {', '.join(available_backends())}")
    for name in BACKEND_NAMES:
        for d in devices[:2]:
            reason = unavailable_reason(name, d)
            print(f"  {name:7s} on {d.type:4s}: {'ok' if reason is None else reason}")
    print("quantized expert weights (moe_mlp, MoE.quantize_, bench --weights):")
    for name in BACKEND_NAMES:
        native = get_backend(name).native_formats
        dequantized = [f for f in quantized_formats() if f not in native]
        print(f"  {name:7s} reads packed: {', '.join(native) or 'none'}"
              + (f"; dequantizes: {', '.join(dequantized)}" if dequantized else ""))
    print(f"roofline (cached in {cache_path()}; --remeasure to measure again):")
    for d in measured:
        roofline = get_roofline(d, remeasure=args.remeasure)
        print(f"  {roofline.device}: {_roofline_line(roofline)}")
    return 0


# ---- argument parsing helpers: each raises UsageError with the valid choices --------------


def set_threads(threads: Optional[int]) -> None:
    if threads is None:
        return
    if threads < 1:
        raise UsageError(f"--threads must be at least 1, got {threads}")
    torch.set_num_threads(threads)


def parse_device(text: Optional[str]) -> torch.device:
    if text is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    valid = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if text not in valid:
        raise UsageError(f"device {text!r} is not available here; choose from {', '.join(valid)}")
    return torch.device(text)


def parse_tokens(text: Optional[str], device: torch.device) -> list:
    if text is None:
        return list(DEFAULT_TOKENS[device.type])
    try:
        tokens = [int(part) for part in text.split(",")]
    except ValueError:
        tokens = []
    if not tokens or any(t < 1 for t in tokens):
        raise UsageError(f"malformed --tokens {text!r}: expected positive integers separated by commas, "
                         f"e.g. 1,16,128")
    return sorted(set(tokens))


def parse_presets(names: Optional[list], scale: Optional[float], device: torch.device) -> list:
    from .benchmarking.presets import PRESETS, scaled

    if scale is not None and not scale > 0:
        raise UsageError(f"--scale must be positive, got {scale}")
    scale = DEFAULT_SCALE[device.type] if scale is None else scale
    wanted = [n for name in (names or [DEFAULT_PRESET]) for n in name.split(",") if n]
    if "all" in wanted:
        wanted = list(PRESETS)
    unknown = [n for n in wanted if n not in PRESETS]
    if unknown or not wanted:
        raise UsageError(f"unknown preset {', '.join(map(repr, unknown)) or '(none)'}; "
                         f"choose from {', '.join(PRESETS)}, all")
    return [scaled(PRESETS[n], scale) for n in dict.fromkeys(wanted)]


def parse_backends(text: str, device: torch.device) -> list:
    from .backends import BACKEND_NAMES, resolve_backend, unavailable_reason

    here = [n for n in BACKEND_NAMES if unavailable_reason(n, device) is None]
    if device.type == "cpu" and "triton" in here:
        here.remove("triton")  # the interpreter runs Triton on the CPU for tests, not for speed
    if text == "all":
        return here
    names = [n for n in text.split(",") if n]
    valid = ("auto",) + BACKEND_NAMES + ("all",)
    for name in names:
        if name not in valid:
            raise UsageError(f"unknown backend {name!r}; choose from {', '.join(valid)}")
        if name != "auto" and unavailable_reason(name, device) is not None:
            raise UsageError(f"backend {name!r} is not available on {device.type}: "
                             f"{unavailable_reason(name, device)}; available here: {', '.join(here)}, auto, all")
    if not names:
        raise UsageError(f"no backend given; choose from {', '.join(valid)}")
    return list(dict.fromkeys(resolve_backend(device, n) for n in names))


def parse_ops(text: str) -> list:
    from .benchmarking.bench import OPS

    return _listed(text, OPS, "--op", f"{', '.join(OPS)} (several separated by commas)")


def parse_peers(text: Optional[str], ops: list) -> list:
    from .benchmarking.peers import OP_PEERS

    valid = list(dict.fromkeys(p for op in ops for p in OP_PEERS[op]))
    if text is None:
        return valid
    if text == "none":
        return []
    return _listed(text, valid, "peer", f"{', '.join(valid)}, none (the peers of --op {','.join(ops)})")


def _listed(text: str, valid, what: str, choices: str) -> list:
    """The comma-separated names of text, each once, all in valid; else a UsageError listing the choices."""
    names = [n for n in text.split(",") if n]
    unknown = [n for n in names if n not in valid]
    if unknown or not names:
        raise UsageError(f"unknown {what} {', '.join(map(repr, unknown)) or '(none)'}; choose from {choices}")
    return list(dict.fromkeys(names))


def _console():
    """(stdout, stderr) consoles; tables keep their width when the output is not a terminal."""
    from rich.console import Console

    out = Console()
    if not out.is_terminal:
        out = Console(width=200)
    return out, Console(stderr=True)


def _progress(err_console):
    from rich.progress import (
        BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn,
    )

    return Progress(TextColumn("{task.description:<36}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("eta"), TimeRemainingColumn(), console=err_console, transient=True)


def _roofline(device: torch.device, err):
    from .benchmarking.roofline import cached_roofline, get_roofline

    if cached_roofline(device) is None:
        err.print(f"measuring the roofline of {device.type} once (cached for later runs)...")
    return get_roofline(device, fresh_bandwidth=True)


def _machine_line(device: torch.device) -> str:
    from .benchmarking.roofline import device_key

    return f"{time.strftime('%Y-%m-%d %H:%M %Z')}, {device_key(device)}"


# ---- bench ---------------------------------------------------------------------------------


def cmd_bench(args: argparse.Namespace) -> int:
    from .benchmarking.bench import BenchSpec, run_bench
    from .benchmarking.report import print_tables

    device = parse_device(args.device)
    set_threads(args.threads)
    ops = parse_ops(args.op)
    if args.backward and ops != ["moe_mlp"]:
        raise UsageError(f"--backward times moe_mlp only, not --op {args.op}")
    others = [op for op in ops if op not in ("moe_mlp", "layer")]
    if args.precision != "weight-only" and args.weights != "fp8":
        raise UsageError(f"--precision {args.precision} takes --weights fp8 (DeepSeek-V3's recipe), not "
                         f"{args.weights or 'float weights'}")
    if args.weights and others:
        raise UsageError(f"--weights {args.weights} quantizes the experts of moe_mlp and layer, not --op "
                         f"{','.join(others)}'s operands")
    if args.cuda_graph and (device.type != "cuda" or args.backward):
        raise UsageError("--cuda-graph times forward calls on a CUDA device: "
                         + ("drop --backward" if device.type == "cuda" else f"not on {device.type}"))
    spec = BenchSpec(
        presets=parse_presets(args.preset, args.scale, device), tokens=parse_tokens(args.tokens, device),
        dtype=DTYPES[args.dtype], backends=parse_backends(args.backend, device),
        peers=parse_peers(args.compare, ops), device=device, routing=args.routing, backward=args.backward,
        ops=tuple(ops), budget_s=args.budget, cuda_graph=args.cuda_graph, weights=args.weights,
        precision=args.precision,
    )
    if not args.weights:
        _check_float_experts_fit(spec.presets, spec.dtype, spec.device)
    out, err = _console()
    malloc = "default"
    if args.keep_freed_memory:
        from .benchmarking.timing import keep_freed_memory

        if keep_freed_memory():
            malloc = "keeps freed memory"
        else:
            err.print("--keep-freed-memory: this C library's malloc is not glibc's; it runs as configured",
                      style="yellow")
    records, interrupted = [], False
    start = time.perf_counter()
    try:
        roofline = _roofline(device, err)
        out.print(f"moe-dispatch bench: {_machine_line(device)}; malloc: {malloc}")
        out.print(f"roofline: {_roofline_line(roofline)}")
        for preset in spec.presets:
            out.print(f"preset {preset.describe()}")
        precision = f" {args.precision}" if args.precision != "weight-only" else ""
        weights = f" activations, {args.weights} weights{precision} (the peers: dequantized)" if args.weights else ""
        out.print(f"{', '.join(spec.ops)}, {args.dtype}{weights}, {spec.routing} routing, tokens {','.join(map(str, spec.tokens))}, "
                  f"backends {', '.join(spec.backends)}, peers {', '.join(spec.peers) or 'none'}")
        with _progress(err) as progress:
            task = progress.add_task("starting", total=spec.steps())

            def advance(label: str) -> None:  # called as each measurement starts
                progress.update(task, description=label, advance=1)

            for record in run_bench(spec, roofline, advance=advance, warn=lambda m: err.print(m, style="yellow")):
                records.append(dict(record, malloc=malloc))
    except KeyboardInterrupt:
        interrupted = True
    print_tables(records, out)
    out.print(f"{len(records)} results in {time.perf_counter() - start:.0f} s; {_memory_line(records)}")
    if interrupted:
        err.print(f"interrupted: showing the {len(records)} results so far")
    _write_outputs(args, records, out)
    return EXIT_INTERRUPTED if interrupted else 0


def _check_float_experts_fit(presets: list, dtype: torch.dtype, device: torch.device) -> None:
    from .benchmarking.costs import dense_bytes
    from .benchmarking.memory import fits_in_memory

    for preset in presets:
        short = fits_in_memory(dense_bytes(preset, dtype), device)
        if short:
            raise UsageError(f"{preset.label}'s experts in {str(dtype).removeprefix('torch.')} do not fit: "
                             f"{short}; --weights fp8 or int8 holds them in half the bytes, int4 or mxfp4 in a "
                             f"quarter")


def _memory_line(records: list) -> str:
    """The process's resident memory before the last preset's experts were made, its peak while
    they were made and over the run, and what the experts hold."""
    last = records[-1] if records else {}
    before, made, peak, held = (last.get(name) for name in ("memory_before_bytes", "peak_memory_made_bytes",
                                                            "peak_memory_bytes", "stored_bytes"))
    if peak is None:
        return "peak resident memory unknown here"
    if before is None:
        return f"peak resident memory {_bytes(peak)}"
    return (f"resident memory {_bytes(before)} before the experts were made, at most +{_bytes(made - before)} while "
            f"making them (they hold {_bytes(held)}) and +{_bytes(peak - before)} over the run (the peers' weights "
            f"and the kernels' buffers included)")


def _bytes(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


def _write_outputs(args, records: list, out) -> None:
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
        out.print(f"wrote {len(records)} records to {args.json}")
    if args.plot and records:
        from .benchmarking.report import plot

        plot(records, args.plot)
        out.print(f"wrote the plot to {args.plot}")


# ---- profile -------------------------------------------------------------------------------


def cmd_profile(args: argparse.Namespace) -> int:
    from .benchmarking.profile import build_stages, fused_ms, stage_rows, time_stages, trace
    from .benchmarking.report import print_stages

    device = parse_device(args.device)
    set_threads(args.threads)
    presets = parse_presets(args.preset, args.scale, device)
    tokens = parse_tokens(args.tokens, device)
    backend = parse_backends(args.backend, device)
    if len(backend) != 1:
        raise UsageError(f"profile takes one backend, got {', '.join(backend)}")
    backend, dtype = backend[0], DTYPES[args.dtype]
    out, err = _console()
    roofline = _roofline(device, err)
    out.print(f"moe-dispatch profile: {_machine_line(device)}")
    out.print(f"roofline: {_roofline_line(roofline)}")
    report, interrupted = [], False
    try:
        for preset in presets:
            for t in tokens:
                stages, experts, batch, plan = build_stages(preset, t, dtype, device, backend, args.routing,
                                                            args.backward)
                rows = stage_rows(time_stages(stages, device, args.backward, args.budget), roofline, dtype)
                fused = fused_ms(experts, batch, plan, backend, device, args.backward, args.budget)
                report.append({"preset": preset.name, "scale": preset.scale, "tokens": t, "backend": backend,
                               "dtype": args.dtype, "routing": args.routing, "stages": rows, "fused_moe_mlp_ms": fused})
                print_stages(out, preset, t, backend, args.dtype, args.routing, args.backward, rows, fused)
                if args.trace:
                    path = _trace_path(args.trace, preset, t, len(presets) * len(tokens) > 1)
                    trace(stages, path, device, args.backward)
                    out.print(f"wrote a Chrome trace to {path} (open it in chrome://tracing or ui.perfetto.dev)")
                del stages, experts, batch, plan
    except KeyboardInterrupt:
        interrupted = True
        err.print(f"interrupted: showing the {len(report)} profiles so far")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
        out.print(f"wrote {len(report)} profiles to {args.json}")
    return EXIT_INTERRUPTED if interrupted else 0


def _trace_path(path: str, preset, tokens: int, several: bool) -> str:
    if not several:
        return path
    root, ext = os.path.splitext(path)
    return f"{root}.{preset.name}.T{tokens}{ext or '.json'}"


# ---- tune ----------------------------------------------------------------------------------


def cmd_tune(args: argparse.Namespace) -> int:
    from .backends import unavailable_reason
    from .benchmarking.tune import DEFAULT_BUCKETS, tune_preset

    if not torch.cuda.is_available():
        print("nothing to tune: this machine has no CUDA GPU. Only the triton backend autotunes, on a GPU; "
              "the CPU backends (numba, torch) have no tuning step; `moe-dispatch warm-up` compiles their kernels.")
        return 0
    device = parse_device(args.device or "cuda")
    if device.type != "cuda":
        print("nothing to tune on the CPU: only the triton backend autotunes, on a GPU; "
              "`moe-dispatch warm-up` compiles the CPU kernels.")
        return 0
    reason = unavailable_reason("triton", device)
    if reason is not None:
        raise UsageError(f"the triton backend cannot run on {device}: {reason}")
    from .backends.triton_tuning import tuning_asked_for  # triton imports: only once it can run

    presets = parse_presets(args.preset or ["all"], 1.0 if args.scale is None else args.scale, device)
    tokens = parse_tokens(args.tokens, device) if args.tokens else list(DEFAULT_BUCKETS)
    out, err = _console()
    out.print(f"moe-dispatch tune: {_machine_line(device)}; {len(presets)} presets x {len(tokens)} token buckets, "
              f"{args.dtype}{', forward and backward' if args.backward else ''}")
    results = []
    total = len(presets) * len(tokens)
    try:
        with _progress(err) as progress, tuning_asked_for():
            task = progress.add_task("starting", total=total)
            for preset in presets:
                tune_preset(preset, tokens, DTYPES[args.dtype], device, args.backward,
                            step=lambda label: progress.update(task, description=label),
                            done=lambda r: (results.append(r), progress.advance(task)))
    except KeyboardInterrupt:
        err.print(f"interrupted after {len(results)} of {total} shapes; what was tuned so far is saved")
    for r in results:
        out.print(f"  {r.preset:28s} T={r.tokens:<6d} {r.seconds:6.1f} s  {r.status}")
    out.print(f"tuned configs are saved in {_tuning_location(device)}; the triton backend reads them from there")
    return EXIT_INTERRUPTED if len(results) < total else 0


def _tuning_location(device: torch.device) -> str:
    from .backends.triton_tuning import cache_path

    return str(cache_path(device))


# ---- warm-up -------------------------------------------------------------------------------


def cmd_warm_up(args: argparse.Namespace) -> int:
    from .backends import unavailable_reason
    from .benchmarking.cases import make_experts, make_layer, quantized_experts
    from .warm_up import warm_up

    device = parse_device(args.device)
    set_threads(args.threads)
    presets = parse_presets(args.preset, 1.0 if args.scale is None else args.scale, device)
    dtype = DTYPES[args.dtype]
    if args.max_tokens < 1:
        raise UsageError(f"--max-tokens must be positive, got {args.max_tokens}")
    if not args.weights:
        _check_float_experts_fit(presets, dtype, device)
    out, _ = _console()
    weights = f", {args.weights} weights" if args.weights else ""
    out.print(f"moe-dispatch warm-up: {_machine_line(device)}; {args.dtype}{weights}, 1 to {args.max_tokens} tokens"
              f"{', forward and backward' if args.backward else ''}")
    for preset in presets:
        experts = (quantized_experts(preset, args.weights, dtype, device) if args.weights
                   else make_experts(preset, dtype, device))
        layer = make_layer(experts).requires_grad_(args.backward)  # the weights' gradients: kernels of their own
        seconds = sum(warm_up(layer, max_tokens=args.max_tokens, backward=args.backward).values())
        out.print(f"  {preset.label:36s} {seconds:7.1f} s")
    if unavailable_reason("numba", device) is None:
        out.print(f"the Numba kernels are cached in {_numba_cache_location()}, for this processor model")
    return 0


def _numba_cache_location() -> str:
    import numba

    from .kernels import numba as kernels

    return numba.config.CACHE_DIR or os.path.join(os.path.dirname(kernels.__file__), "__pycache__")


# ---- the parser ----------------------------------------------------------------------------


def _seconds(text: str) -> float:
    """argparse type of --budget: a positive number of seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _add_shape_args(p: argparse.ArgumentParser, tokens_help: Optional[str], preset_default: str = DEFAULT_PRESET,
                    scale_default: str = f"1 on a GPU, {DEFAULT_SCALE['cpu']} on the CPU") -> None:
    p.add_argument("--preset", nargs="+", metavar="NAME",
                   help=f"model presets (space or comma separated, or all); default {preset_default}")
    if tokens_help is not None:
        p.add_argument("--tokens", metavar="T,T,...", help=tokens_help)
    p.add_argument("--dtype", choices=list(DTYPES), default="bfloat16", help="default bfloat16")
    p.add_argument("--scale", type=float, metavar="F",
                   help=f"multiply H and I by F (rounded to multiples of 16); default {scale_default}")
    p.add_argument("--device", metavar="cpu|cuda", help="default cuda when there is a GPU, else cpu")
    p.add_argument("--threads", type=int, metavar="N", help="CPU threads for torch and numba (default: torch's)")


def build_parser() -> argparse.ArgumentParser:
    from .benchmarking.bench import OPS
    from .benchmarking.cases import ROUTINGS
    from .benchmarking.peers import OP_PEERS
    from .benchmarking.tune import DEFAULT_BUCKETS

    parser = Parser(prog="moe-dispatch", description="Fast Mixture-of-Experts dispatch.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    info = sub.add_parser("info", help="versions, devices, backends and this machine's roofline")
    info.add_argument("--remeasure", action="store_true", help="measure the roofline again")
    info.add_argument("--threads", type=int, metavar="N", help="CPU threads to measure the CPU roofline with")
    info.add_argument("--device", metavar="cpu|cuda", help="the roofline of this device only (default: every device)")
    info.set_defaults(func=cmd_info)

    cpu_tokens = ",".join(map(str, DEFAULT_TOKENS["cpu"]))
    gpu_tokens = ",".join(map(str, DEFAULT_TOKENS["cuda"]))
    bench = sub.add_parser("bench", help="time the MoE layer's experts on each backend against its peers")
    _add_shape_args(bench, f"token counts; default {gpu_tokens} on a GPU, {cpu_tokens} on the CPU")
    bench.add_argument("--backend", default="auto", metavar="auto|torch|numba|triton|all",
                       help="default auto: the best backend here")
    bench.add_argument("--weights", choices=quantized_formats(), metavar="FORMAT",
                       help=f"quantize the experts' weights: {', '.join(quantized_formats())} (default: float "
                            "weights of --dtype); the peers run the dequantized values")
    bench.add_argument("--precision", choices=PRECISIONS, default="weight-only",
                       help="how quantized experts multiply: weight-only (default), or w8a8 for --weights fp8 (the "
                            "activations quantized per token per 128 columns too, DeepSeek-V3's recipe)")
    bench.add_argument("--compare", metavar="PEER,...",
                       help=f"peers (default all): {', '.join(OP_PEERS['moe_mlp'])}; none for no peers")
    bench.add_argument("--routing", choices=ROUTINGS, default="uniform",
                       help="uniform; skewed: half the tokens on one expert; zipf: popular experts")
    bench.add_argument("--backward", action="store_true", help="time forward and backward")
    bench.add_argument("--op", default="moe_mlp", metavar="OP,...",
                       help="the fused experts, moe_mlp (default); layer, the whole MoE layer (router, routing, "
                            "routed and shared experts); or one op; several separated by commas: "
                            f"{', '.join(OPS)}. Peers: "
                            + "; ".join(f"{op}: {', '.join(p)}" for op, p in OP_PEERS.items() if op != "moe_mlp"))
    bench.add_argument("--cuda-graph", action="store_true",
                       help="time replays of a CUDA graph of each call, as servers run decode (CUDA, forward); "
                            "a peer that syncs with the host is left out")
    bench.add_argument("--budget", type=_seconds, default=0.3, metavar="S", help="timed seconds per point (default 0.3)")
    bench.add_argument("--keep-freed-memory", action="store_true",
                       help="glibc's malloc keeps freed memory for reuse, as jemalloc and tcmalloc do: times that "
                            "do not depend on which earlier call returned memory to the system")
    bench.add_argument("--json", metavar="PATH", help="write one record per result")
    bench.add_argument("--plot", metavar="PATH.png", help="plot time against tokens, log-log")
    bench.set_defaults(func=cmd_bench)

    profile = sub.add_parser("profile", help="break one forward (and backward) into stages")
    _add_shape_args(profile, "token counts; default as bench")
    profile.add_argument("--backend", default="auto", metavar="auto|torch|numba|triton")
    profile.add_argument("--routing", choices=ROUTINGS, default="uniform")
    profile.add_argument("--backward", action="store_true", help="time each stage's backward too")
    profile.add_argument("--budget", type=_seconds, default=0.3, metavar="S", help="timed seconds per stage")
    profile.add_argument("--trace", metavar="OUT.json", help="save a torch.profiler Chrome trace")
    profile.add_argument("--json", metavar="PATH", help="write the stage table")
    profile.set_defaults(func=cmd_profile)

    tune = sub.add_parser("tune", help="run the triton backend's autotuning ahead of time (GPU)")
    _add_shape_args(tune, "token buckets; default " + ",".join(map(str, DEFAULT_BUCKETS)),
                    preset_default="all", scale_default="1: the tuned shapes must be the real ones")
    tune.add_argument("--backward", action="store_true", help="tune the backward kernels too")
    tune.set_defaults(func=cmd_tune)

    warm = sub.add_parser("warm-up", help="compile the kernels a layer may call, before it serves (warm_up)")
    _add_shape_args(warm, None, scale_default="1: the layer's paths follow its real shapes")
    warm.add_argument("--weights", choices=quantized_formats(), metavar="FORMAT",
                      help=f"the experts' format: {', '.join(quantized_formats())} "
                           "(default: float weights of --dtype)")
    warm.add_argument("--max-tokens", type=int, default=8192, metavar="N",
                      help="the most tokens a call will take (default 8192)")
    warm.add_argument("--backward", action="store_true", help="the backward's kernels too (training)")
    warm.set_defaults(func=cmd_warm_up)
    return parser


@contextlib.contextmanager
def _interrupt_on_signals():
    """Ctrl-C and SIGTERM (a job's time limit, `timeout`) both stop a run the same way, with
    the results so far printed, even when the process was started with SIGINT ignored (a
    background job of a non-interactive shell). The previous handlers come back afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, signal.default_int_handler), signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous[0])
        signal.signal(signal.SIGTERM, previous[1])


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error already printed (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        with _interrupt_on_signals():
            return args.func(args)
    except UsageError as exc:
        print(f"{parser.prog} {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:  # before any result (setting up, measuring the roofline)
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
