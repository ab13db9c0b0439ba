"""DeepSeek-V3's MoE layer at full size, written as its checkpoint ships and read back by
read_deepseek_v3_layer: how long reading takes, the resident memory, and a decode step
(docs/benchmarks.md, "DeepSeek-V3's MoE layer at full size").

    python benchmarks/deepseek_v3_checkpoint.py write /tmp/deepseek-v3   # layer 3: 11.3 GB in five shards
    python benchmarks/deepseek_v3_checkpoint.py read /tmp/deepseek-v3 --threads 1

`write` makes the FP8 experts one at a time as the bench does (quantized_experts: random codes,
block scales like nn.Linear's init), with DeepSeek-V3's names, config.json and index; `read`
runs in a process of its own, so that its memory figures are the layer's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path

import torch

LAYER, SHARD_BYTES = 3, 2.5e9
CONFIG = dict(hidden_size=7168, moe_intermediate_size=2048, n_routed_experts=256, num_experts_per_tok=8, n_group=8,
              topk_group=4, routed_scaling_factor=2.5, norm_topk_prob=True, n_shared_experts=1,
              first_k_dense_replace=3, scoring_func="sigmoid", topk_method="noaux_tc")


def write(directory: Path) -> None:
    from safetensors.torch import save_file

    from moe_dispatch.benchmarking.cases import quantized_experts
    from moe_dispatch.benchmarking.presets import get_preset

    one_expert = dataclasses.replace(get_preset("deepseek-v3"), num_experts=1)
    prefix, hidden, experts = f"model.layers.{LAYER}.mlp", CONFIG["hidden_size"], CONFIG["n_routed_experts"]
    gen = torch.Generator().manual_seed(0)
    shard = {f"{prefix}.gate.weight": (torch.randn(experts, hidden, generator=gen) / math.sqrt(hidden)).bfloat16(),
             f"{prefix}.gate.e_score_correction_bias": torch.rand(experts, generator=gen) / 10}
    weight_map: dict = {}
    directory.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        name = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
        save_file(shard, directory / name)
        weight_map.update(dict.fromkeys(shard, name))
        shard.clear()

    for e in range(experts + 1):  # the last: the shared expert
        base = f"{prefix}.shared_experts" if e == experts else f"{prefix}.experts.{e}"
        w = quantized_experts(one_expert, "fp8", torch.bfloat16, "cpu", seed=e).weights
        half, scale_half = w.w_gate_up.shape[1] // 2, w.w_gate_up.scales.shape[1] // 2
        for proj, codes, scales in (("gate_proj", w.w_gate_up.codes[0, :half], w.w_gate_up.scales[0, :scale_half]),
                                    ("up_proj", w.w_gate_up.codes[0, half:], w.w_gate_up.scales[0, scale_half:]),
                                    ("down_proj", w.w_down.codes[0], w.w_down.scales[0])):
            shard[f"{base}.{proj}.weight"] = codes.clone()
            shard[f"{base}.{proj}.weight_scale_inv"] = scales.clone()
        if sum(t.nbytes for t in shard.values()) > SHARD_BYTES:
            save()
    save()
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps(CONFIG))
    print(f"wrote layer {LAYER} in {len(set(weight_map.values()))} shards to {directory}")


def read(directory: Path) -> None:
    from moe_dispatch.benchmarking.memory import peak_resident_memory, reset_peak_memory, resident_memory
    from moe_dispatch.integrations.checkpoints import read_deepseek_v3_layer

    reset_peak_memory()
    before, start = resident_memory(), time.perf_counter()
    layer = read_deepseek_v3_layer(directory, LAYER)
    seconds, peak = time.perf_counter() - start, peak_resident_memory()
    held = sum(b.nbytes for name, b in layer.named_buffers() if name.startswith(("w_gate_up.", "w_down.")))
    print(f"read in {seconds:.0f} s; the experts hold {held / 1e9:.2f} GB; resident memory {before / 1e9:.2f} GB "
          f"before, at most +{(peak - before) / 1e9:.2f} GB while reading ({(peak - before) / held - 1:+.1%} "
          f"of the experts' bytes)")
    x = torch.randn(1, CONFIG["hidden_size"], dtype=torch.bfloat16)
    with torch.no_grad():
        layer(x)  # the kernels compile
        times = []
        for _ in range(5):
            start = time.perf_counter()
            layer(x)
            times.append(time.perf_counter() - start)
    print(f"a decode step (T=1) of the whole layer: {1e3 * sorted(times)[2]:.0f} ms, the median of 5, "
          f"{torch.get_num_threads()} thread(s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=("write", "read"))
    parser.add_argument("directory", type=Path)
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    (write if args.action == "write" else read)(args.directory)


if __name__ == "__main__":
    main()
