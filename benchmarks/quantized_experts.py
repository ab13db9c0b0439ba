"""Quantized experts against bfloat16 experts, side by side in one run (docs/benchmarks.md).

For each token count, every format's moe_mlp and the bfloat16 experts' are timed twice:
warm, the same routed batch on the same experts every call, one format at a time, so that its
experts after the first call come from the cache wherever they fit there; and cold, in turns
(measure_many) with the other formats and a read of 256 MB, each call on the next of several
copies of the layer with the next of several routings, about --cold-mb of weights in all, so
that its experts come from memory as they do in a model whose layers together exceed the
cache. (Warm calls timed in turns with the others found their experts evicted by them: warm
ran slower than cold.) Each row gives the medians, the speed-ups over bfloat16, the
format's bandwidth bound (the active experts' stored bytes, averaged over the routings, over
the read bandwidth: the median of a 256 MB reduction timed in turns with the calls, as this
machine's bandwidth moves by the minute) and the error of the output against the unquantized
bfloat16 layer's (relative Frobenius norm, measured in float64).

    python benchmarks/quantized_experts.py --tokens 1,16,512,4096 --threads 2 --budget 1
"""

from __future__ import annotations

import argparse
import itertools
import math

import torch

import moe_dispatch as md
from moe_dispatch.benchmarking.cases import distinct_experts, make_experts, make_inputs, quantize_experts
from moe_dispatch.benchmarking.presets import get_preset
from moe_dispatch.benchmarking.timing import measure_many, median
from moe_dispatch.formats.quantized import quantized_formats

ROUTINGS = 7  # routed batches the cold calls take in turns


def layer_copies(bf16, fmt, preset, device, cold_bytes):
    """Copies of the layer's experts in format fmt (bfloat16: bf16 first, then layers of other
    weights), enough to hold about cold_bytes in all."""
    first = bf16 if fmt == "bfloat16" else quantize_experts(bf16, fmt)
    count = max(1, math.ceil(cold_bytes / (first.expert_bytes() * preset.num_experts)))
    return [first] + [make_experts(preset, torch.bfloat16, device, seed=c) if fmt == "bfloat16"
                      else quantize_experts(bf16, fmt) for c in range(1, count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="olmoe-1b-7b")
    parser.add_argument("--scale", type=float, default=0.5)
    parser.add_argument("--tokens", default="1,16,512")
    parser.add_argument("--formats", default=",".join(quantized_formats()))
    parser.add_argument("--threads", type=int)
    parser.add_argument("--budget", type=float, default=1.0, help="timed seconds per format, token count and kind")
    parser.add_argument("--cold-mb", type=float, default=512.0,
                        help="the weights the cold calls cycle through, per format (well past the last-level cache)")
    parser.add_argument("--backend", default="numba")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    preset = get_preset(args.preset, args.scale)
    stream = torch.ones(64 << 20)  # 256 MB of float32 to read, past any last-level cache
    bf16 = make_experts(preset, torch.bfloat16, device)
    layers = {fmt: layer_copies(bf16, fmt, preset, device, args.cold_mb * 1e6)
              for fmt in ["bfloat16", *args.formats.split(",")]}
    first = make_inputs(preset, 1, torch.bfloat16, device)
    with torch.no_grad():  # what a call derives from a layer's experts once, made outside the timings
        for experts in itertools.chain(*layers.values()):
            md.moe_mlp(first.x, first.weights, first.ids, experts.weights, backend=args.backend)
    print(f"{preset.describe()}, {args.backend}, {torch.get_num_threads()} threads; cold: {ROUTINGS} routings over "
          + ", ".join(f"{len(c)} {fmt}" for fmt, c in layers.items()) + " layers")
    print(f"{'T':>5} {'weights':9} {'bits/w':>6} {'warm ms':>8} {'vs bf16':>8} {'cold ms':>8} {'vs bf16':>8} "
          f"{'bound ms':>9} {'cold/bound':>10} {'error vs bf16':>13} {'read GB/s':>9}")
    for num_tokens in (int(t) for t in args.tokens.split(",")):
        routings = [make_inputs(preset, num_tokens, torch.bfloat16, device, seed=s) for s in range(ROUTINGS)]
        inputs = routings[0]

        def call(copies, cold):
            turns = itertools.count()

            def run():
                turn = next(turns) if cold else 0
                batch, experts = routings[turn % ROUTINGS], copies[turn % len(copies)]
                return md.moe_mlp(batch.x, batch.weights, batch.ids, experts.weights, backend=args.backend)

            return run

        warm_calls = {fmt: call(copies, False) for fmt, copies in layers.items()}
        cold_calls = {fmt: call(copies, True) for fmt, copies in layers.items()}
        with torch.no_grad():
            warm_times = {fmt: median(measure_many({fmt: fn}, device, budget_s=args.budget)[fmt])  # one at a time
                          for fmt, fn in warm_calls.items()}
            times = {key: median(t) for key, t in measure_many({**cold_calls, "read": stream.sum}, device,
                                                                 budget_s=args.budget).items()}
            read_gbps = stream.nbytes / (times["read"] * 1e6)
            reference = md.moe_mlp(inputs.x.double(), inputs.weights.double(), inputs.ids,
                                   bf16.weights.w_gate_up.double(), bf16.weights.w_down.double(), backend="torch")
            touched = sum(distinct_experts(batch.ids) for batch in routings) / ROUTINGS
            for fmt, copies in layers.items():
                experts = copies[0]
                warm, cold = warm_times[fmt], times[fmt]
                bound = touched * experts.expert_bytes() / (read_gbps * 1e6)
                error = (warm_calls[fmt]().double() - reference).norm() / reference.norm()
                bits = 8 * experts.expert_bytes() / (preset.hidden_size * (experts.weights.w_gate_up.shape[1]
                                                                            + preset.intermediate_size))
                print(f"{num_tokens:5d} {fmt:9} {bits:6.2f} {warm:8.3f} {warm_times['bfloat16'] / warm:7.2f}x "
                      f"{cold:8.3f} {times['bfloat16'] / cold:7.2f}x {bound:9.3f} {cold / bound:9.2f}x "
                      f"{error:13.4f} {read_gbps:9.1f}")


if __name__ == "__main__":
    main()
