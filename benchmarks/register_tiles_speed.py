"""One core's speed at the register tiles' product (kernels/numba/outer_products.py): each of E
experts' weights [N, K] against a chunk of R activation columns, float32 and bfloat16 pairs, in
GFLOP/s.

The calls cycle through the experts: with one expert its weights stay in cache, with many
(E * N * K past the last-level cache) they come from memory, as in a prefill step.

    python benchmarks/register_tiles_speed.py                    # N = K = 1024, R = 64, E = 1 and 64
    python benchmarks/register_tiles_speed.py --rows 16,64,128 --experts 1,32
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from moe_dispatch.kernels.numba.caching import njit
from moe_dispatch.kernels.numba.outer_products import strip_product


@njit(cache=True)
def _products(a, b, c, experts, rows_of_a, depth, lead, width, calls):
    for call in range(calls):
        strip_product(a, (call % experts) * rows_of_a * depth, depth, rows_of_a, depth, b, 0, lead, c, 0, lead, width)


def operands(dtype: str, experts: int, n: int, k: int, rows: int):
    """(a, b, c, depth): flat weights of every expert, the chunk's columns, the sums, and the
    depth in the tile's elements (pairs for bfloat16)."""
    lead = rows + 16
    if dtype == "float32":
        a = torch.randn(experts * n * k).numpy()
        return a, torch.randn(k * lead).numpy(), np.zeros(n * lead, np.float32), k, lead
    words = lambda t: t.view(torch.int16).numpy().view(np.uint32)  # noqa: E731 (two bfloat16 a word)
    a = words(torch.randn(experts * n * k).bfloat16())
    return a, words(torch.randn(k * lead).bfloat16()), np.zeros(n * lead, np.float32), k // 2, lead


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1024, help="weight rows (output columns)")
    parser.add_argument("--k", type=int, default=1024, help="depth (even)")
    parser.add_argument("--rows", default="64", help="activation columns per chunk, comma-separated")
    parser.add_argument("--experts", default="1,64", help="experts cycled through, comma-separated")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--seconds", type=float, default=1.0, help="about how long each point runs")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"one core, weights [{args.n}, {args.k}], GFLOP/s (median of 5 bursts)")
    for dtype in args.dtypes.split(","):
        for experts in (int(e) for e in args.experts.split(",")):
            for rows in (int(r) for r in args.rows.split(",")):
                a, b, c, depth, lead = operands(dtype, experts, args.n, args.k, rows)
                _products(a, b, c, experts, args.n, depth, lead, rows, experts)  # compile, warm
                start = time.perf_counter()
                _products(a, b, c, experts, args.n, depth, lead, rows, experts)
                calls = max(experts, int(args.seconds / 5 / (time.perf_counter() - start) * experts))
                rates = []
                for _ in range(5):
                    start = time.perf_counter()
                    _products(a, b, c, experts, args.n, depth, lead, rows, calls)
                    rates.append(2 * args.n * args.k * rows * calls / (time.perf_counter() - start) / 1e9)
                print(f"{dtype:9s} experts {experts:4d} rows {rows:4d}: {np.median(rates):6.0f}")


if __name__ == "__main__":
    main()
