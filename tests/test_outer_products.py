"""The register tiles of moe_dispatch/kernels/numba/outer_products.py and the expert MLP on
them (expert_tiles.py), against float64."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import assert_close, expert_weights, needs_numba, random_weights, register_tiles_everywhere
from reference import naive_moe_mlp

pytestmark = needs_numba


@pytest.mark.nojit
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("accumulate", [False, True])
def test_a_tile_reads_and_writes_its_rows_and_columns_only(dtype, accumulate):
    """Every count of rows, widths of one to all of a strip's vectors and within one, rows of a
    given by offsets (a transposed operand: k_stride > 1), and nothing written past the tile."""
    from moe_dispatch.kernels.numba.outer_products import ROWS, STRIP_BYTES, VECTOR_BYTES, product_tile

    rng = np.random.default_rng(0)
    strip = STRIP_BYTES // np.dtype(dtype).itemsize
    depth, k_stride, b_stride, c_stride = 13, 3, strip + 5, strip + 2
    a = rng.standard_normal(ROWS * 7 + depth * k_stride).astype(dtype)
    b = rng.standard_normal(4 + depth * b_stride).astype(dtype)
    for count in range(1, ROWS + 1):
        lanes = VECTOR_BYTES // np.dtype(dtype).itemsize
        for width in (1, lanes - 1, lanes + 1, strip // 2 + 1, strip):
            rows = tuple(7 * i + (i % 2) for i in range(ROWS))
            c = rng.standard_normal(3 + ROWS * c_stride).astype(dtype)
            before = c.copy()
            product_tile(a, rows, count, k_stride, b, 4, b_stride, depth, c, 3, c_stride, width, accumulate)
            want = before.astype(np.float64)
            for i in range(count):
                values = a[rows[i] + k_stride * np.arange(depth)].astype(np.float64)
                block = b[4 + b_stride * np.arange(depth)[:, None] + np.arange(width)].astype(np.float64)
                target = 3 + i * c_stride + np.arange(width)
                want[target] = (want[target] if accumulate else 0) + values @ block
            tolerance = 1e-5 if dtype == np.float32 else 1e-12
            np.testing.assert_allclose(c, want, rtol=tolerance, atol=tolerance, err_msg=f"{count} rows, {width}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_strip_products_cross_every_block(dtype, gen, monkeypatch):
    """strip_product through grouped_mm's register tiles: K past DEPTH_BLOCK (sums carried from
    block to block), more rows of w than BLOCK_ROWS, several strips of columns; and K=0."""
    import moe_dispatch as md
    from moe_dispatch.backends import get_backend
    from moe_dispatch.kernels.numba.outer_products import BLOCK_ROWS, DEPTH_BLOCK
    from reference import naive_grouped_mm

    E, K, N = 2, DEPTH_BLOCK + 37, 150
    offsets = torch.tensor([0, BLOCK_ROWS + 7, BLOCK_ROWS + 10], dtype=torch.int32)
    a = torch.randn(int(offsets[-1]), K, generator=gen).to(dtype)
    w = (torch.randn(E, K, N, generator=gen) / K ** 0.5).to(dtype)
    bias = torch.randn(E, N, generator=gen).to(dtype)
    backend = get_backend("numba")
    import moe_dispatch.backends.numba_backend as nb

    register_tiles_everywhere(monkeypatch)  # on CPUs without AVX-512 too
    assert nb.product_on_register_tiles(1.0, a, w)
    row_bias = bias.double()[md.plan.expert_of_row(offsets, a.shape[0])]
    assert_close(backend.grouped_mm(a, w, offsets, bias), naive_grouped_mm(a, w, offsets) + row_bias, dtype)
    assert_close(backend.grouped_mm(a[:, :0], w[:, :0].contiguous(), offsets, bias), row_bias, dtype)  # K=0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("activation,interleaved,bias", [("swiglu", False, False), ("clamped_swiglu", True, True),
                                                         ("gelu", False, True)])
def test_expert_mlp_on_register_tiles_across_chunks(dtype, activation, interleaved, bias, gen, monkeypatch):
    """An expert of more rows than a chunk (its weights read once per chunk), one of one row,
    empty ones; forward and gradients against the torch backend."""
    import moe_dispatch as md
    from moe_dispatch.kernels.numba import expert_tiles

    register_tiles_everywhere(monkeypatch)
    chunk = expert_tiles.CHUNK_BYTES // torch.tensor([], dtype=dtype).element_size()
    E, H, I = 5, 21, 13
    ids = torch.tensor([0] * (chunk + 9) + [3] + [1] * 6).reshape(-1, 1)
    T = ids.shape[0]
    leaves = [torch.randn(T, H, generator=gen).to(dtype), random_weights(T, 1, gen).to(dtype),
              *expert_weights(E, H, I, gen, dtype, activation, bias=bias)]
    grads = {}
    for backend in ("numba", "torch"):
        inputs = [t.clone().requires_grad_() if t is not None else None for t in leaves]
        x, weights, w_gate_up, w_down, b_gate_up, b_down = inputs
        experts = md.ExpertWeights(w_gate_up, w_down, b_gate_up, b_down, activation, interleaved)
        out = md.moe_mlp(x, weights, ids, experts, backend=backend)
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype))
        grads[backend] = [out] + [t.grad for t in inputs if t is not None]
    for got, want in zip(grads["numba"], grads["torch"]):
        assert_close(got, want, dtype)
    with torch.no_grad():
        x, weights, w_gate_up, w_down, b_gate_up, b_down = leaves
        expected = naive_moe_mlp(x, weights, ids, w_gate_up, w_down, b_gate_up, b_down, activation, interleaved)
        experts = md.ExpertWeights(w_gate_up, w_down, b_gate_up, b_down, activation, interleaved)
        assert_close(md.moe_mlp(x, weights, ids, experts, backend="numba"), expected, dtype)


def test_small_float_experts_with_many_rows_take_the_register_tiles(gen, monkeypatch):
    """Default thresholds: a decode step stays on the dot-product kernels, a batch of many rows
    per expert of small experts goes to the register tiles where the CPU has AVX-512, and large
    experts never do."""
    import moe_dispatch as md
    import moe_dispatch.backends.numba_backend as nb

    calls, real = [], nb.expert_tiles.expert_mlp
    monkeypatch.setattr(nb.expert_tiles, "expert_mlp", lambda *args: calls.append(1) or real(*args))
    for H, tokens, dtype, tiles in ((64, 2, torch.float32, False), (64, 256, torch.float32, True),
                                    (64, 256, torch.bfloat16, False), (nb.REGISTER_TILES_MAX_DEPTH + 16, 256,
                                                                       torch.float32, False)):
        calls.clear()
        w_gate_up, w_down, _, _ = expert_weights(4, H, 32, gen, dtype)
        x = torch.randn(tokens, H, generator=gen).to(dtype)
        md.moe_mlp(x, random_weights(tokens, 2, gen), torch.randint(0, 4, (tokens, 2), generator=gen), w_gate_up,
                   w_down, backend="numba")
        assert bool(calls) == (tiles and dtype in nb.REGISTER_TILE_DTYPES), (H, tokens, dtype)
