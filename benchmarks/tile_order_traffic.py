"""Memory traffic of the grouped GEMM's launch order, from an LRU model of the GPU's L2.

    python benchmarks/tile_order_traffic.py [--l2-mb 60]

Programs are taken one at a time in launch order; each touches one BLOCK_M-row tile of A and
the expert's BLOCK_N weight columns (two blocks for the gated GEMM1). A block not in the
modelled L2 is read from memory. Printed per shape: the least traffic (A and W read once),
the traffic with M-tiles running fastest (a plain 2-D grid) and with the grouped order the
kernels use (GROUP_M M-tiles sweep every N-tile together). Uniform routing, bf16, 128x128
tiles. No GPU needed; docs/gpu.md quotes its figures.
"""

from __future__ import annotations

import argparse
from collections import OrderedDict

from moe_dispatch.kernels.triton.grouped_gemm import GROUP_M

# (name, tokens, experts, top_k, K, N, gated)
SHAPES = [
    ("DeepSeek-V3 GEMM1, T=8192", 8192, 256, 8, 7168, 2048, True),
    ("DeepSeek-V3 GEMM2, T=8192", 8192, 256, 8, 2048, 7168, False),
    ("Mixtral-8x7B GEMM1, T=8192", 8192, 8, 2, 4096, 14336, True),
    ("Mixtral-8x7B GEMM2, T=8192", 8192, 8, 2, 14336, 4096, False),
    ("Qwen3-30B-A3B GEMM1, T=8192", 8192, 128, 8, 2048, 768, True),
]
BLOCK_M = BLOCK_N = 128
ELEMENT_BYTES = 2


def traffic(order, expert_of_tile, k_dim: int, gated: bool, l2_bytes: float) -> float:
    """Bytes read from memory when the programs (m, n) run in this order."""
    cache: OrderedDict = OrderedDict()
    held = missed = 0

    def touch(block, nbytes: int) -> None:
        nonlocal held, missed
        if block in cache:
            cache.move_to_end(block)
            return
        missed += nbytes
        cache[block] = nbytes
        held += nbytes
        while held > l2_bytes:
            held -= cache.popitem(last=False)[1]

    for m, n in order:
        touch(("A", m), BLOCK_M * k_dim * ELEMENT_BYTES)
        touch(("W", expert_of_tile[m], n), k_dim * BLOCK_N * ELEMENT_BYTES * (2 if gated else 1))
    return missed


def grouped(m_tiles: int, n_tiles: int, group: int) -> list:
    order = []
    for first in range(0, m_tiles, group):
        size = min(group, m_tiles - first)
        order += [(first + i % size, i // size) for i in range(size * n_tiles)]
    return order


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--l2-mb", type=float, default=60.0, help="L2 size in MB (H200: 60)")
    l2_bytes = parser.parse_args().l2_mb * 1e6
    print(f"{'shape':<30} {'least GB':>9} {'M fastest':>10} {'grouped':>8}")
    for name, tokens, experts, top_k, k_dim, n_cols, gated in SHAPES:
        rows_per_expert = tokens * top_k // experts
        expert_of_tile = [e for e in range(experts) for _ in range(-(-rows_per_expert // BLOCK_M))]
        m_tiles, n_tiles = len(expert_of_tile), -(-n_cols // BLOCK_N)
        least = (tokens * top_k * k_dim + experts * k_dim * n_cols * (2 if gated else 1)) * ELEMENT_BYTES
        m_fastest = [(m, n) for n in range(n_tiles) for m in range(m_tiles)]
        plain, ours = (traffic(order, expert_of_tile, k_dim, gated, l2_bytes) / 1e9
                       for order in (m_fastest, grouped(m_tiles, n_tiles, GROUP_M)))
        print(f"{name:<30} {least / 1e9:>9.1f} {plain:>10.1f} {ours:>8.1f}")


if __name__ == "__main__":
    main()
