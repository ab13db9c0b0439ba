"""The main loops of the Triton kernels that read expert weights, compiled without a GPU: how many
instructions one warp issues per 1024 weights, per weight format, kernel and GPU generation.

    python benchmarks/kernel_loops.py                      # sm_80, 89, 90; the decode kernels and GEMM1
    python benchmarks/kernel_loops.py --arch 90 --k 2880   # gpt-oss's K: a partial last K-block
    python benchmarks/kernel_loops.py --arch 90 --block-k 64   # another K-step

Where a kernel is bound by its instructions rather than its bytes (a quantized decode step: each
weight is decoded once and multiplied with a few rows), this is its cost up to the GPU's issue
rate; a change to the decoding shows here first. Columns: the default tile for the shape, shared
memory, registers a thread, the loop's warp instructions per 1024 weights, its int-to-float
conversions (I2F: 16 a clock per SM on sm_90, against 128 float adds) and its byte-wide global
loads (LDG.E.U8: loads that did not vectorize), and how many cp.async groups stay in flight.
Needs Triton with its NVIDIA backend (ptxas, cuobjdump); TRITON_INTERPRET must be unset.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import replace

if os.environ.get("TRITON_INTERPRET") == "1":
    raise SystemExit("kernel_loops.py compiles for a GPU: unset TRITON_INTERPRET")

from moe_dispatch.activations import ACTIVATIONS  # noqa: E402
from moe_dispatch.backends import triton_tuning as configs  # noqa: E402
from moe_dispatch.benchmarking.machine_code import (  # noqa: E402
    BF16_POINTERS, QUANTIZED_FORMATS, compile_kernel, machine_code, quantized_weight)
from moe_dispatch.kernels.triton import decode, grouped_gemm  # noqa: E402
from moe_dispatch.kernels.triton.grouped_gemm import activation_args  # noqa: E402

FORMATS = ("bf16", *QUANTIZED_FORMATS)
KERNELS = ("decode_up", "decode_down", "gemm1")


def tile(kernel: str, arch: int) -> configs.TileConfig:
    """The default tile: decode kernels as for DeepSeek-V3 at T=16 (GEMM1's 2048 columns shared
    by 8 programs, GEMM2's 7168), GEMM1 of a prefill (1024 rows an expert)."""
    budget = configs.LARGE_SMEM if arch in (90, 100) else configs.SMALL_SMEM
    if kernel == "decode_up":
        return configs.decode_tiles(2048, 8, True, 2, budget, 132)[0]
    if kernel == "decode_down":
        return configs.decode_tiles(7168, 1, False, 2, budget, 132)[0]
    return configs.gemm_tiles(1024, True, 2, budget)[0]


def compile_loop(kernel: str, weights: str, arch: int, k_dim: int, block_k: int = 0):
    config = tile(kernel, arch)
    if block_k:
        config = replace(config, block_k=block_k)
    constants = dict(PRECISION="ieee", UPCAST=False, EVEN_K=k_dim % config.block_k == 0, BLOCK_N=config.block_n,
                     BLOCK_K=config.block_k)
    pointers = dict(BF16_POINTERS)
    if weights != "bf16":
        weight_constants, weight_types = quantized_weight(weights, arch)
        constants.update(weight_constants, Q_T=True)
        pointers.update(weight_types)
    if kernel == "gemm1":
        fn = grouped_gemm.grouped_gemm_kernel
        constants.update(BLOCK_M=config.block_m, E_PAD=64, GROUP_M=grouped_gemm.GROUP_M, SPLIT_K=1, ws_ptr=None,
                         slot_of_row_ptr=None, weight_of_row_ptr=None, **activation_args(ACTIVATIONS["swiglu"]))
    else:
        constants.update(BLOCK_T=decode.MAX_TOKENS, S_PAD=128)
        if kernel == "decode_up":
            fn = decode.decode_up_kernel
            constants.update(K_PAD=8, **activation_args(ACTIVATIONS["swiglu"]))
        else:
            fn = decode.decode_down_kernel
    code = machine_code(compile_kernel(fn, arch, pointers, constants, config.num_warps, config.num_stages))
    # a pass of the gated kernels decodes a tile of gate columns and one of up columns
    per_pass = config.block_n * config.block_k * (1 if kernel == "decode_down" else 2)
    return config, code, sum(code.loop_ops.values()) * config.num_warps / per_pass * 1024


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="80,89,90", help="compute capabilities, e.g. 80,86,89,90,120")
    parser.add_argument("--kernels", default=",".join(KERNELS), help=f"of {', '.join(KERNELS)}")
    parser.add_argument("--weights", default=",".join(FORMATS), help=f"of {', '.join(FORMATS)}")
    parser.add_argument("--k", type=int, default=2048, help="the products' K (where the K-step does not divide it, "
                        "the last K-block is partial: every load along K masked)")
    parser.add_argument("--block-k", type=int, default=0, help="this K-step instead of the default tile's")
    args = parser.parse_args(argv)
    print("| arch | kernel | weights | tile (M, N, K, warps, stages) | shared KB | registers | loop instructions "
          "/ 1K weights | I2F | LDG.E.U8 | cp.async ahead |")
    print("| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for arch in (int(a) for a in args.arch.split(",")):
        for kernel in args.kernels.split(","):
            for weights in args.weights.split(","):
                config, code, per_1k = compile_loop(kernel, weights, arch, args.k, args.block_k)
                shape = f"{config.block_m}, {config.block_n}, {config.block_k}, {config.num_warps}, {config.num_stages}"
                byte_loads = sum(n for op, n in code.loop_ops.items() if op.startswith("LDG.E.U8"))
                print(f"| sm_{arch} | {kernel} | {weights} | {shape} | {code.shared / 1024:.1f} | {code.registers} | "
                      f"{per_1k:.0f} | {code.loop_converts} | {byte_loads} | "
                      f"{code.ahead} |", flush=True)


if __name__ == "__main__":
    main()
