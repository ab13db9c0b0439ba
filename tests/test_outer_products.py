"""The register tiles of moe_dispatch/kernels/numba/outer_products.py and the expert MLP on
them (expert_tiles.py), against float64; bfloat16 pairs compiled for this CPU and for none
(the widened code)."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from conftest import assert_close, expert_weights, needs_numba, random_weights, register_tiles_everywhere
from reference import naive_moe_mlp

pytestmark = needs_numba


@pytest.mark.nojit
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("depth", [1, 12, 13])
@pytest.mark.parametrize("k_stride", [1, 3])
def test_a_tile_reads_and_writes_its_rows_and_columns_only(dtype, accumulate, depth, k_stride):
    """Every count of rows, widths of one to all of a strip's vectors, within one and ending in
    half of one (tile_widths), rows of a given by offsets, contiguous (the stride a constant 1,
    the next tile's rows asked for ahead) or not (a transposed operand), and nothing written
    past the tile; depths odd and even (narrow strips sum even and odd k apart); the vector code
    (where Numba compiles) and the Python definition."""
    from numba import config

    from moe_dispatch.kernels.numba.outer_products import ROWS, STRIP_BYTES, VECTOR_BYTES, product_tile

    rng = np.random.default_rng(0)
    strip = STRIP_BYTES // np.dtype(dtype).itemsize
    b_stride, c_stride, row_step = strip + 5, strip + 2, 7 * k_stride + depth
    a = rng.standard_normal(2 * ROWS * row_step + depth * k_stride).astype(dtype)
    b = rng.standard_normal(4 + depth * b_stride).astype(dtype)
    run = product_tile if config.DISABLE_JIT else compiled_tile(None, k_stride)
    for count in range(1, ROWS + 1):
        lanes = VECTOR_BYTES // np.dtype(dtype).itemsize
        for width in tile_widths(lanes, strip):
            rows = tuple(row_step * i + (i % 2) for i in range(ROWS))
            ahead = tuple(row_step * (ROWS + i) for i in range(ROWS))
            c = rng.standard_normal(3 + ROWS * c_stride).astype(dtype)
            want, defined = c.astype(np.float64), c.copy()
            run(a, rows, count, k_stride, b, 4, b_stride, depth, c, 3, c_stride, width, accumulate, ahead, count - 1)
            product_tile(a, rows, count, k_stride, b, 4, b_stride, depth, defined, 3, c_stride, width, accumulate,
                         ahead, count - 1)
            for i in range(count):
                values = a[rows[i] + k_stride * np.arange(depth)].astype(np.float64)
                block = b[4 + b_stride * np.arange(depth)[:, None] + np.arange(width)].astype(np.float64)
                target = 3 + i * c_stride + np.arange(width)
                want[target] = (want[target] if accumulate else 0) + values @ block
            tolerance = 1e-5 if dtype == np.float32 else 1e-12
            for got in (c, defined):
                np.testing.assert_allclose(got, want, rtol=tolerance, atol=tolerance, err_msg=f"{count} rows, {width}")


def tile_widths(lanes: int, strip: int) -> tuple[int, ...]:
    """Widths of a strip: within one vector, at and past half of one (where a strip ends in a
    half vector), past one, and a whole strip, a half vector short of it or halved and one more."""
    half = lanes // 2
    return 1, half, half + 1, lanes - 1, lanes + 1, lanes + half, strip // 2 + 1, strip - half, strip


def bf16_pairs(t: torch.Tensor) -> np.ndarray:
    """A bfloat16 tensor of even last dimension as uint32 words of two elements, flat."""
    return t.contiguous().view(torch.int16).numpy().view(np.uint32).reshape(-1)


@functools.cache
def compiled_tile(features, k_stride):
    """The tile's vector code for the CPU features given (None: this CPU's), called with
    k_stride a constant 1 as the strips' products call it, or else a variable (compiled once a
    signature for all the tests)."""
    from numba import njit

    from moe_dispatch.kernels.numba.outer_products import _tile_intrinsic

    tile = _tile_intrinsic(features)

    @njit
    def contiguous(a, a_rows, count, k_stride, b, b_start, b_stride, depth, c, c_start, c_stride, width, accumulate,
                   ahead, ahead_count):
        tile(a, a_rows, count, 1, b, b_start, b_stride, depth, c, c_start, c_stride, width, accumulate, ahead,
             ahead_count)

    @njit
    def strided(a, a_rows, count, k_stride, b, b_start, b_stride, depth, c, c_start, c_stride, width, accumulate,
                ahead, ahead_count):
        tile(a, a_rows, count, k_stride, b, b_start, b_stride, depth, c, c_start, c_stride, width, accumulate, ahead,
             ahead_count)

    return contiguous if k_stride == 1 else strided


@pytest.mark.parametrize("features", [pytest.param(None, id="host"), pytest.param("", id="generic")])
def test_a_tile_of_bfloat16_pairs_sums_both_halves_of_every_pair(features, gen):
    """Each k a pair: a's word broadcast against b's words, every count of rows and width of a
    strip, rows of a given by offsets; nothing written past the tile; the Python definition
    (what NUMBA_DISABLE_JIT runs) against float64."""
    from moe_dispatch.kernels.numba.outer_products import ROWS, STRIP_BYTES, VECTOR_BYTES, product_tile

    strip, lanes = STRIP_BYTES // 4, VECTOR_BYTES // 4
    depth, b_stride, c_stride = 21, strip + 3, strip + 2
    a_bits = torch.randn(2 * (ROWS * 9 + depth), generator=gen).bfloat16()
    b_bits = torch.randn(2 * (2 + depth * b_stride), generator=gen).bfloat16()
    a, b = bf16_pairs(a_bits), bf16_pairs(b_bits)
    a_pairs, b_pairs = a_bits.double().view(-1, 2), b_bits.double().view(-1, 2)
    run = compiled_tile(features, 1)
    rows = tuple(9 * i + (i % 3) for i in range(ROWS))
    ahead = tuple(9 * (ROWS - 1) + 1 for _ in range(ROWS))
    for count in range(1, ROWS + 1):
        for width in tile_widths(lanes, strip):
            for accumulate in (False, True):
                c = torch.randn(1 + ROWS * c_stride, generator=gen).numpy()
                want, defined = c.astype(np.float64), c.copy()
                for i in range(count):
                    block = b_pairs[2 + b_stride * torch.arange(depth)[:, None] + torch.arange(width)]
                    total = torch.einsum("kp,kjp->j", a_pairs[rows[i]:rows[i] + depth], block).numpy()
                    target = 1 + i * c_stride + np.arange(width)
                    want[target] = (want[target] if accumulate else 0) + total
                run(a, rows, count, 1, b, 2, b_stride, depth, c, 1, c_stride, width, accumulate, ahead, 1)
                product_tile(a, rows, count, 1, b, 2, b_stride, depth, defined, 1, c_stride, width, accumulate,
                             ahead, 1)
                for got in (c, defined):
                    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4, err_msg=f"{count} rows, {width}")


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


@pytest.mark.nojit
@pytest.mark.parametrize("num_rows,depth,strips", [(128, 512, 1), (2 * 240 + 7, 256 + 37, 1), (13, 700, 3),
                                                   (240, 256, 2), (5, 100, 1)])
def test_each_tile_asks_for_the_rows_of_the_tile_after_it(num_rows, depth, strips):
    """next_tile names the rows and depth that strip_product's next tile reads: the next rows of
    a block, its first rows at the next depth, the next block's at depth 0; nothing before
    another strip of the same rows (in L2 already) nor after the last tile."""
    from moe_dispatch.kernels.numba.outer_products import BLOCK_ROWS, DEPTH_BLOCK, ROWS, next_tile

    tiles = [(i, k0, j == strips - 1, i0, i1)  # strip_product's order
             for i0 in range(0, num_rows, BLOCK_ROWS) for i1 in [min(num_rows, i0 + BLOCK_ROWS)]
             for k0 in range(0, depth, DEPTH_BLOCK) for j in range(strips) for i in range(i0, i1, ROWS)]
    for (i, k0, last_strip, i0, i1), following in zip(tiles, tiles[1:] + [None]):
        row, k, count = next_tile(i, i0, i1, k0, last_strip, depth, num_rows)
        if following is None or not last_strip and following[0] == i0:
            assert count == 0
        else:
            assert (row, k, count) == (following[0], following[1], min(ROWS, following[4] - following[0]))


def test_the_strips_tile_takes_a_constant_depth_stride():
    """strip_product calls its tile with k_stride the constant 1, so that the tile keeps a
    pointer a row and asks for the next tile's rows ahead (llvm.prefetch): a stride that Numba
    typed as a plain integer lost both without a wrong result."""
    from numba import njit

    from moe_dispatch.kernels.numba.outer_products import strip_product

    @njit
    def product(a, b, c):
        strip_product(a, 0, 8, 8, 8, b, 0, 8, c, 0, 8, 8)

    a, b, c = np.ones(64), np.ones(64), np.zeros(64)
    product(a, b, c)
    np.testing.assert_array_equal(c, np.full(64, 8.0))
    assert any("llvm.prefetch" in ir for ir in product.inspect_llvm().values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("activation,interleaved,bias", [("swiglu", False, False), ("clamped_swiglu", True, True),
                                                         ("gelu", False, True)])
def test_expert_mlp_on_register_tiles_across_chunks(dtype, activation, interleaved, bias, gen, monkeypatch):
    """An expert of more rows than a chunk (its weights read once per chunk), one of one row,
    empty ones; forward and gradients against the torch backend. bfloat16 (pairs along K:
    H and I even) with K past a block of the transposes and a tail, I past a block of GEMM1's
    intermediate columns, its gradients against
    float64's: a routing weight's is a sum of H products that may cancel, where two bfloat16
    computations differ by more than an element's tolerance (the torch backend's own by as
    much), so each gradient within 2% of float64's in norm (a bf16 step is 0.4%)."""
    import moe_dispatch as md
    from moe_dispatch.kernels.numba import expert_tiles

    register_tiles_everywhere(monkeypatch)
    pairs = dtype == torch.bfloat16
    chunk = expert_tiles.CHUNK_BYTES // (4 if pairs else torch.tensor([], dtype=dtype).element_size())
    E, H, I = (5, 38, expert_tiles.INTER_BLOCK + 22) if pairs else (5, 21, 13)  # bfloat16: I past a block
    ids = torch.tensor([0] * (chunk + 9) + [3] + [1] * 6).reshape(-1, 1)
    T = ids.shape[0]
    leaves = [torch.randn(T, H, generator=gen).to(dtype), random_weights(T, 1, gen).to(dtype),
              *expert_weights(E, H, I, gen, dtype, activation, bias=bias)]
    grads, calls = {}, []
    real = getattr(expert_tiles, "expert_mlp_bf16" if pairs else "expert_mlp")
    monkeypatch.setattr(expert_tiles, real.__name__, lambda *args: calls.append(1) or real(*args))
    reference = torch.float64 if pairs else dtype
    for backend in ("numba", "torch"):
        kind = reference if backend == "torch" else dtype
        inputs = [t.to(kind, copy=True).requires_grad_() if t is not None else None for t in leaves]
        x, weights, w_gate_up, w_down, b_gate_up, b_down = inputs
        experts = md.ExpertWeights(w_gate_up, w_down, b_gate_up, b_down, activation, interleaved)
        out = md.moe_mlp(x, weights, ids, experts, backend=backend)
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype))
        grads[backend] = [out] + [t.grad for t in inputs if t is not None]
    for got, want in zip(grads["numba"], grads["torch"]):
        if pairs:
            assert (got.double() - want).norm() <= 0.02 * want.norm()
        else:
            assert_close(got, want, dtype)
    assert calls, "the register tiles were not taken"
    with torch.no_grad():
        x, weights, w_gate_up, w_down, b_gate_up, b_down = leaves
        expected = naive_moe_mlp(x, weights, ids, w_gate_up, w_down, b_gate_up, b_down, activation, interleaved)
        experts = md.ExpertWeights(w_gate_up, w_down, b_gate_up, b_down, activation, interleaved)
        assert_close(md.moe_mlp(x, weights, ids, experts, backend="numba"), expected, dtype)


@pytest.mark.nojit
@pytest.mark.parametrize("bias", [False, True])
def test_few_bfloat16_chunks_split_their_intermediate_columns_between_threads(bias, gen, monkeypatch):
    """Two experts of a few rows, I past one block of GEMM1's columns: each chunk's columns in
    parts (intermediate_parts), whose outputs and biases meet once; against float64."""
    import moe_dispatch as md
    from moe_dispatch.kernels.numba import expert_tiles

    register_tiles_everywhere(monkeypatch)
    calls, real = [], expert_tiles.expert_mlp_bf16
    monkeypatch.setattr(expert_tiles, "expert_mlp_bf16", lambda *args: calls.append(1) or real(*args))
    E, H, I = 2, 16, expert_tiles.INTER_BLOCK + 2
    assert expert_tiles.intermediate_parts(E, 1, 2, 3 * H * 4) == 2
    ids = torch.tensor([[0], [1], [0]])
    x, weights = torch.randn(3, H, generator=gen).bfloat16(), random_weights(3, 1, gen).bfloat16()
    w_gate_up, w_down, b_gate_up, b_down = expert_weights(E, H, I, gen, torch.bfloat16, bias=bias)
    out = md.moe_mlp(x, weights, ids, md.ExpertWeights(w_gate_up, w_down, b_gate_up, b_down), backend="numba")
    wide = [t.double() if t is not None else None for t in (x, weights, w_gate_up, w_down, b_gate_up, b_down)]
    assert_close(out, naive_moe_mlp(*wide[:2], ids, *wide[2:], "swiglu", False), torch.bfloat16)
    assert calls, "the register tiles were not taken"


@pytest.mark.nojit
def test_strips_share_the_columns_in_vector_parts():
    """strip_columns: strips of at most a tile's columns covering the width, all but the last
    in whole parts of a vector (halves with AVX-512), as even as those allow (72 float32
    columns as 40 and 32 there, not 64 and 8); strip_parts: what a row of a costs, in parts."""
    from moe_dispatch.kernels.numba.outer_products import HALF_VECTORS, STRIP_BYTES, VECTOR_BYTES, strip_columns, \
        strip_parts

    lanes = VECTOR_BYTES // 4
    part, tile = (lanes // 2 if HALF_VECTORS else lanes), STRIP_BYTES // 4
    for width in range(1, 3 * tile + 2):
        strip = strip_columns(width, lanes)
        sizes = [min(strip, width - j) for j in range(0, width, strip)]
        assert strip % part == 0 and strip <= tile and sum(sizes) == width, (width, strip)
        assert strip - sizes[-1] < part * len(sizes), (width, sizes)  # no strip a part shorter than it could be
        assert strip_parts(width, lanes) == sum(max(2 * lanes // part, -(-size // part)) for size in sizes)
    if HALF_VECTORS:
        assert strip_columns(72, lanes) == 40 and strip_parts(72, lanes) == 9


def test_threads_share_the_chunks_evenly():
    """balanced_ranges: every unit once, in order, each thread's cost within one unit of its
    share (a boundary on the nearer side of the unit that crosses it: 8 experts of 4 or 5
    vectors go 4 and 4, not 5 and 3); intermediate_parts: more parts only where chunks are few."""
    from moe_dispatch.kernels.numba import expert_tiles as et

    assert list(et.balanced_ranges(np.array([4, 4, 5, 4, 5, 5, 4, 5]), 2)) == [0, 4, 8]
    rng = np.random.default_rng(0)
    for slots in (1, 2, 3, 7, 20):
        for size in (0, 1, 5, 29):
            costs = rng.integers(1, 9, size=size)
            bounds = et.balanced_ranges(costs, slots)
            assert bounds[0] == 0 and bounds[-1] == size and (np.diff(bounds) >= 0).all(), (slots, costs, bounds)
            share = costs.sum() / slots
            assert all(costs[bounds[s]:bounds[s + 1]].sum() <= share + 8 for s in range(slots))
    cases = ((8, 2, 56, 1 << 20), (64, 2, 4, 1 << 20), (1, 16, 3, 1 << 20), (0, 2, 4, 1 << 20),
             (8, 16, 56, et.PARTS_BYTES // 5), (8, 2, 56, et.PARTS_BYTES))  # outputs of the parts within PARTS_BYTES
    assert [et.intermediate_parts(*args) for args in cases] == [2, 1, 3, 1, 5, 1]


def test_small_float_experts_with_many_rows_take_the_register_tiles(gen, monkeypatch):
    """Default thresholds: a decode step stays on the dot-product kernels, a batch of many rows
    per expert of small experts goes to the register tiles where the CPU has AVX-512, and large
    experts only where LARGE_FLOAT32_REGISTER_TILES."""
    import moe_dispatch as md
    import moe_dispatch.backends.numba_backend as nb

    calls, real = [], nb.expert_tiles.expert_mlp
    monkeypatch.setattr(nb.expert_tiles, "expert_mlp", lambda *args: calls.append(1) or real(*args))
    large = nb.REGISTER_TILES_MAX_DEPTH + 16
    for H, tokens, dtype, tiles in ((64, 2, torch.float32, False), (64, 256, torch.float32, True),
                                    (64, 256, torch.bfloat16, False), (large, 256, torch.float32,
                                                                       nb.LARGE_FLOAT32_REGISTER_TILES),
                                    (large, 32, torch.float32, False)):
        calls.clear()
        w_gate_up, w_down, _, _ = expert_weights(4, H, 32, gen, dtype)
        x = torch.randn(tokens, H, generator=gen).to(dtype)
        md.moe_mlp(x, random_weights(tokens, 2, gen), torch.randint(0, 4, (tokens, 2), generator=gen), w_gate_up,
                   w_down, backend="numba")
        assert bool(calls) == (tiles and dtype in nb.REGISTER_TILE_DTYPES), (H, tokens, dtype)


def test_bfloat16_experts_take_the_register_tiles_beyond_a_decode_step(gen, monkeypatch):
    """Default thresholds where the CPU multiplies bfloat16 pairs (none elsewhere): a decode
    step on the dot-product kernels, dozens of rows per expert on register tiles, whatever the
    experts' size; never for an odd H or I (no pairs) or where AMX tiles take the blocked path."""
    import moe_dispatch as md
    import moe_dispatch.backends.numba_backend as nb

    calls, real = [], nb.expert_tiles.expert_mlp_bf16
    monkeypatch.setattr(nb.expert_tiles, "expert_mlp_bf16", lambda *args: calls.append(1) or real(*args))
    E, k = 4, 2
    for H, I, tokens, tiles in ((64, 32, 2, False), (64, 32, 256, True), (1024, 512, 128, True),
                                (63, 32, 256, False), (64, 31, 256, False)):
        calls.clear()
        w_gate_up, w_down, _, _ = expert_weights(E, H, I, gen, torch.bfloat16)
        x = torch.randn(tokens, H, generator=gen).bfloat16()
        ids = torch.randint(0, E, (tokens, k), generator=gen)
        md.moe_mlp(x, random_weights(tokens, k, gen), ids, w_gate_up, w_down, backend="numba")
        amx = any(nb.on_tiles(w) for w in (w_gate_up, w_down))
        assert bool(calls) == (tiles and nb.TAKES_BF16_DOTS and not amx), (H, I, tokens)
