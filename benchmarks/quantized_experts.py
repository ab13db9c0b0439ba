"""Quantized experts against bfloat16 experts, side by side in one run (docs/benchmarks.md).

For each token count, every format's moe_mlp and the bfloat16 experts' are timed in turns
(measure_many), on the same routed batch; each row gives the median, the speed-up over bfloat16,
the format's bandwidth bound (the active experts' stored bytes over the measured read
bandwidth) and the error of the output against the unquantized bfloat16 layer's (relative
Frobenius norm, measured in float64).

    python benchmarks/quantized_experts.py --tokens 1,16,512,4096 --threads 2 --budget 1
"""

from __future__ import annotations

import argparse

import torch

import moe_dispatch as md
from moe_dispatch.benchmarking.cases import make_experts, make_inputs, quantize_experts
from moe_dispatch.benchmarking.presets import get_preset
from moe_dispatch.benchmarking.roofline import get_roofline
from moe_dispatch.benchmarking.timing import measure_many, median
from moe_dispatch.formats.quantized import quantized_formats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="olmoe-1b-7b")
    parser.add_argument("--scale", type=float, default=0.5)
    parser.add_argument("--tokens", default="1,16,512")
    parser.add_argument("--formats", default=",".join(quantized_formats()))
    parser.add_argument("--threads", type=int)
    parser.add_argument("--budget", type=float, default=1.0, help="timed seconds per format and token count")
    parser.add_argument("--backend", default="numba")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    preset = get_preset(args.preset, args.scale)
    roofline = get_roofline(device, fresh_bandwidth=True)  # measured with this run's threads
    bf16 = make_experts(preset, torch.bfloat16, device)
    formats = {"bfloat16": bf16}
    for fmt in args.formats.split(","):
        formats[fmt] = quantize_experts(bf16, fmt)
    print(f"{preset.describe()}, {args.backend}, {torch.get_num_threads()} threads, read {roofline.read_gbps:.1f} GB/s")
    print(f"{'T':>5} {'weights':9} {'bits/w':>6} {'median ms':>10} {'vs bf16':>8} {'bound ms':>9} {'/ bound':>8} "
          f"{'error vs bf16':>13}")
    for num_tokens in (int(t) for t in args.tokens.split(",")):
        inputs = make_inputs(preset, num_tokens, torch.bfloat16, device)
        touched = torch.unique(inputs.ids).numel()
        calls = {name: (lambda e=e: md.moe_mlp(inputs.x, inputs.weights, inputs.ids, e.weights, backend=args.backend))
                 for name, e in formats.items()}
        with torch.no_grad():
            times = measure_many(calls, device, budget_s=args.budget)
            reference = md.moe_mlp(inputs.x.double(), inputs.weights.double(), inputs.ids,
                                   bf16.weights.w_gate_up.double(), bf16.weights.w_down.double(), backend="torch")
            for name, experts in formats.items():
                ms = median(times[name])
                bound = touched * experts.expert_bytes() / (roofline.read_gbps * 1e6)
                error = (calls[name]().double() - reference).norm() / reference.norm()
                bits = 8 * experts.expert_bytes() / (preset.hidden_size * (experts.weights.w_gate_up.shape[1]
                                                                            + preset.intermediate_size))
                print(f"{num_tokens:5d} {name:9} {bits:6.2f} {ms:10.3f} {median(times['bfloat16']) / ms:7.2f}x "
                      f"{bound:9.3f} {ms / bound:7.2f}x {error:13.4f}")


if __name__ == "__main__":
    main()
