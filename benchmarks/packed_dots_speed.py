"""One core's speed at the quantized decode kernels' inner product (kernels/numba/packed_dots.py):
every pair of weight rows of an expert against 1-4 activation rows, in weights per second.

Each format's codes are made by `quantize` from one float weight of E experts [N, K]; the calls
cycle through the experts, so that with E * N * K past the last-level cache the codes come from
memory. A row reads as the weights of one activation row: with more rows per pass, each weight
meets them all, and rows x weights / s is the multiply-add rate. fp8 meets bfloat16 activations
(the kernel a bfloat16 model's step takes where the CPU has AVX512-BF16 and AVX512-VBMI; on
other CPUs it times the generic code, which no step takes there), fp8-float32 float32 ones.
The 4-bit formats meet bfloat16 activations where the CPU has AVX512-BF16 and AVX512-BW
(NIBBLE_BF16_DOTS), else int16 ones; their -int16 entries take int16 ones (a float16 model's
step) anywhere.

    python benchmarks/packed_dots_speed.py                      # every format, 1 and 4 rows
    python benchmarks/packed_dots_speed.py --rows 1,2,3,4 --formats int4,mxfp4
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from numba import njit

import moe_dispatch as md
from moe_dispatch.kernels.numba.packed_dots import (INT_LANES, NIBBLE_BF16_DOTS, dots_intrinsic, lane_sums,
                                                    nibble_depth, sums_zero)

# (the kernel's code format, quantize's format, its options, whether 4-bit codes meet int16 activations)
FORMATS = {"int8": ("int8", "int8", {}, True), "int4": ("int4", "int4", {"group_size": 128}, not NIBBLE_BF16_DOTS),
           "int4-int16": ("int4", "int4", {"group_size": 128}, True),
           "int4-zero-points": ("int4", "int4", {"group_size": 128, "symmetric": False}, not NIBBLE_BF16_DOTS),
           "mxfp4": ("e2m1", "mxfp4", {}, not NIBBLE_BF16_DOTS), "mxfp4-int16": ("e2m1", "mxfp4", {}, True),
           "fp8": ("e4m3", "fp8", {}, False), "fp8-float32": ("e4m3", "fp8", {}, False)}


def timed_kernel(fmt):
    kernel = dots_intrinsic(fmt)

    @njit
    def run(codes, scales, zeros, has_zeros, per_scale, x, x_sums, rows, count, group, out, calls):
        pairs = codes.shape[1] // 2
        for call in range(calls):  # rows 2p and 2p + 1 of expert call % E, as a plain GEMM1 reads them
            kernel(codes, scales, zeros, has_zeros, call % codes.shape[0], 0, 1, 2, pairs, per_scale, x, x_sums, rows,
                   0, count, group, out)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--shape", default="1024,1024", help="N,K of each expert")
    parser.add_argument("--rows", default="1,4", help="activation rows per call")
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--repeats", type=int, default=7, help="timed bursts; the median is reported")
    args = parser.parse_args()
    n, k = (int(v) for v in args.shape.split(","))
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(args.experts, n, k, generator=gen)
    print(f"{args.experts} experts [{n}, {k}], one thread; G weights/s = weight rows x K / s per activation row set")
    print(f"{'format':>17} {'rows':>4} {'G weights/s':>12} {'GB/s codes':>11} {'us/expert':>10}")
    for name in args.formats.split(","):
        fmt, quantize_format, options, int16 = FORMATS[name]
        q = md.quantize(w, quantize_format, **options)
        codes = q.codes.view(torch.uint8).numpy()
        zeros = q.zeros.numpy() if q.zeros is not None else np.zeros((1, 1, 1), np.uint8)
        operands = (codes, q.scales.numpy(), zeros, q.zeros is not None, q.block[0])
        run = timed_kernel(fmt)
        for count in (int(r) for r in args.rows.split(",")):
            if name == "fp8":  # bfloat16 activations: their bits, as a bfloat16 model's decode step passes them
                x = torch.randn(count, k, generator=gen).bfloat16().view(torch.int16).numpy()
            elif name == "fp8-float32":  # float16 or float32 activations, or a CPU without AVX512-BF16 and VBMI
                x = torch.randn(count, k, generator=gen).numpy()
            else:  # the 4-bit formats' rows in whole steps
                width = nibble_depth(k) if fmt in ("int4", "e2m1") else k
                x = torch.randint(-32767, 32768, (count, width), generator=gen, dtype=torch.int16).numpy()
                if not int16:  # bfloat16 bits, as uint16
                    x = torch.randn(count, width, generator=gen).bfloat16().view(torch.int16).numpy().view(np.uint16)
            rows, out = np.arange(count, dtype=np.int32), np.empty((n, count), np.float32)
            # the int16 activations' sums that the 4-bit codes' zero points take off
            zero = sums_zero(fmt, q.zeros is not None) if x.dtype == np.int16 else 0
            x_sums = lane_sums(x, q.block[1], zero) if zero else np.empty((0, 0, INT_LANES), np.int32)
            run(*operands, x, x_sums, rows, count, q.block[1], out, 1)  # compiles
            calls = max(1, int(0.05 / (1e-9 * n * k * count)))  # about 50 ms a burst at 1 G weights/s
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                run(*operands, x, x_sums, rows, count, q.block[1], out, calls)
                times.append((time.perf_counter() - start) / calls)
            t = float(np.median(times))
            print(f"{name:>17} {count:>4} {n * k / t / 1e9:>12.1f} {codes[0].nbytes / t / 1e9:>11.1f} {t * 1e6:>10.1f}")


if __name__ == "__main__":
    main()
