"""grouped_mm and its weight gradient on every backend. The backend-only sections force what
default sizes never reach: numba's small and large groups, layouts and matmul libraries; the
Triton GEMM's tiles, split-K, TMA loads and the fused epilogues that moe_mlp runs through it."""

import itertools
from dataclasses import replace

import pytest
import torch

import moe_dispatch as md
import moe_dispatch.backends.cpu_matmul as cm
from cases import CASES
from conftest import (FLOAT_DTYPES, HAS_CUDA, HAS_NUMBA, HAS_TRITON, NUMBA_DTYPES, TUNED_DTYPES, assert_close,
                      expert_weights, large_groups_everywhere, needs_numba, needs_triton, output_and_grads, randn,
                      random_ids, random_weights, register_tiles_everywhere, skip_if_unsupported,
                      skip_without_onednn, small_groups_everywhere)
from conftest import TRITON_DEVICE as DEVICE
from moe_dispatch.activations import ACTIVATIONS, gate_up_columns
from moe_dispatch.backends import get_backend
from moe_dispatch.plan import expert_of_row
from reference import naive_grouped_mm, naive_permute, naive_unpermute

if HAS_NUMBA:
    import moe_dispatch.backends.numba_backend as nb

if HAS_TRITON:
    import triton
    import triton.language as tl

    from moe_dispatch.backends.torch_backend import TorchBackend
    from moe_dispatch.backends import triton_tuning as configs
    from moe_dispatch.kernels.triton import grouped_gemm as kgemm
    from moe_dispatch.kernels.triton import permute as kmove
    from moe_dispatch.kernels.triton.tiles import TileConfig


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_grouped_mm(backend, case, dtype, layout, gen):
    skip_if_unsupported(backend, dtype)
    plan = md.make_plan(case.ids(gen), case.experts)
    xs = randn(plan.num_rows, case.hidden, gen=gen, dtype=dtype)
    if layout == "contiguous":
        w = randn(case.experts, case.hidden, case.inter, gen=gen, dtype=dtype, scale=case.hidden ** -0.5)
    else:  # nn.Linear layout [E, N, K] passed as a transposed view, never copied
        w = randn(case.experts, case.inter, case.hidden, gen=gen, dtype=dtype, scale=case.hidden ** -0.5)
        w = w.transpose(1, 2)
    ys = md.grouped_mm(xs, w, plan.offsets, backend=backend)
    assert ys.dtype == dtype and ys.shape == (plan.num_rows, case.inter)
    assert_close(ys, naive_grouped_mm(xs, w, plan.offsets.tolist()))


def test_grouped_mm_int64_offsets_and_sliced_weights(backend, gen):
    # offsets as int64 (torch's cumsum default), and w a non-contiguous slice of a bigger tensor
    offsets = torch.tensor([0, 5, 5, 12], dtype=torch.int64)
    xs = randn(12, 16, gen=gen)
    w = randn(3, 16, 40, gen=gen, scale=0.25)[:, :, ::2]
    assert_close(md.grouped_mm(xs, w, offsets, backend=backend), naive_grouped_mm(xs, w, offsets.tolist()))


@pytest.mark.parametrize("case", CASES)
def test_grouped_mm_and_unpermute_gradients(backend, case, gen):
    plan = md.make_plan(case.ids(gen), case.experts)
    xs = randn(plan.num_rows, case.hidden, gen=gen)
    w = randn(case.experts, case.inter, case.hidden, gen=gen, scale=case.hidden ** -0.5)
    weights = random_weights(case.tokens, case.top_k, gen)
    x = randn(case.tokens, case.hidden, gen=gen)
    offsets, rows = plan.offsets.tolist(), plan.row_of_slot.tolist()

    def ours(x, xs, w, weights):
        ys = md.grouped_mm(md.permute(x, plan, backend=backend) + xs, w.transpose(1, 2), plan.offsets, backend=backend)
        return md.unpermute(ys, plan, weights, backend=backend)

    def naive(x, xs, w, weights):
        xs_total = naive_permute(x.double(), plan.token_of_row.tolist()) + xs.double()
        ys = naive_grouped_mm(xs_total, w.transpose(1, 2), offsets)
        return naive_unpermute(ys, rows, weights)

    out, grads = output_and_grads(ours, (x, xs, w, weights))
    ref_out, ref_grads = output_and_grads(naive, (x, xs, w, weights))
    assert_close(out, ref_out)
    for g, ref in zip(grads, ref_grads):
        assert_close(g, ref)


# ---- numba: weight layouts, group sizes and the large groups' libraries ----------------------

LAYOUTS = {
    # nn.Linear storage [E, N, K] passed as w.transpose(1, 2): what the Numba kernel reads
    "nk": lambda w: w.transpose(1, 2).contiguous().transpose(1, 2),
    # [E, K, N] storage: BLAS, whatever the group size
    "kn": lambda w: w,
    # neither K nor N contiguous: BLAS reads the view in place
    "strided": lambda w: torch.stack((w, w), -1)[..., 0],
}


def weights_in(layout, E, K, N, dtype, gen):
    """Random [E, K, N] weights of dtype, scaled for unit outputs, as a view of LAYOUTS[layout]
    (made last: arithmetic on a strided view returns a contiguous tensor)."""
    w = LAYOUTS[layout]((torch.randn(E, K, N, generator=gen) / K**0.5).to(dtype))
    assert w.stride()[-1] == (2 if layout == "strided" else 1 if layout == "kn" else K)
    return w


def offsets_of(ids, E):
    return md.make_plan(ids, E, backend="torch").offsets


def assert_wgrad(out, a, b, offsets, dtype=None):
    """out[e] is a.T @ b over expert e's rows, for every expert."""
    bounds = offsets.tolist()
    for e in range(len(bounds) - 1):
        part = slice(bounds[e], bounds[e + 1])
        assert_close(out[e], a[part].double().T @ b[part].double(), dtype)


# How each group size is forced; register-tiles: float32 and float64 products over weights with
# N contiguous, and weight gradients, on register tiles (the rest as large).
GROUPS = {"small": small_groups_everywhere, "large": large_groups_everywhere,
          "register-tiles": register_tiles_everywhere}


@needs_numba
@pytest.mark.parametrize("groups", list(GROUPS))
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", NUMBA_DTYPES)  # float64 on register tiles: test_outer_products.py
@pytest.mark.parametrize("K", [37, 38], ids=["odd-K", "even-K"])  # even: bfloat16 read as uint32 pairs
def test_grouped_mm_layouts_and_group_sizes(K, dtype, layout, groups, matmul_library, gen, monkeypatch):
    GROUPS[groups](monkeypatch)
    E, N, rows = 5, 19, 41
    offsets = offsets_of(random_ids(rows, 1, E, gen), E)
    xs = torch.randn(rows, K, generator=gen).to(dtype)
    w = weights_in(layout, E, K, N, dtype, gen)
    out = md.grouped_mm(xs, w, offsets, backend="numba")
    assert_close(out, naive_grouped_mm(xs, w, offsets), dtype)


@needs_numba
@pytest.mark.nojit
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_nojit_grouped_mm_bias_and_wgrad(layout, gen, monkeypatch):
    small_groups_everywhere(monkeypatch)
    backend = get_backend("numba")
    E, K, N, rows = 4, 6, 5, 9
    offsets = offsets_of(random_ids(rows, 1, E - 1, gen), E)  # expert E-1 gets no rows
    xs, dy = torch.randn(rows, K, generator=gen), torch.randn(rows, N, generator=gen)
    w, bias = weights_in(layout, E, K, N, torch.float32, gen), torch.randn(E, N, generator=gen)
    expected = naive_grouped_mm(xs, w, offsets) + bias.double()[expert_of_row(offsets, rows)]
    assert_close(backend.grouped_mm(xs, w, offsets, bias), expected)
    assert_wgrad(backend.grouped_mm_wgrad(xs, dy, offsets, E), xs, dy, offsets)


@needs_numba
def test_an_expert_with_as_many_rows_as_the_limit_is_a_small_group(gen, monkeypatch):
    monkeypatch.setattr(nb, "fused_rows_limit", lambda *_: 3)
    offsets = torch.tensor([0, 3, 5, 9], dtype=torch.int32)  # 3 rows, 2 (small) and 4 (large)
    xs, w = torch.randn(9, 8, generator=gen), weights_in("nk", 3, 8, 6, torch.float32, gen)
    assert_close(md.grouped_mm(xs, w, offsets, backend="numba"), naive_grouped_mm(xs, w, offsets))


@needs_numba
def test_large_groups_of_aligned_operands_keep_their_bias(matmul_library, gen, monkeypatch):
    """torch._grouped_mm takes no bias: a grouped_mm with one must not lose it."""
    large_groups_everywhere(monkeypatch)
    offsets = torch.tensor([0, 16, 16, 40], dtype=torch.int32)
    xs, w, bias = (torch.randn(40, 32, generator=gen), weights_in("kn", 3, 32, 16, torch.float32, gen),
                   torch.randn(3, 16, generator=gen))
    expected = naive_grouped_mm(xs, w, offsets) + bias.double()[expert_of_row(offsets, 40)]
    assert_close(get_backend("numba").grouped_mm(xs, w, offsets, bias), expected)


def spy_torch_grouped_mm(monkeypatch) -> list:
    """Record each torch._grouped_mm call."""
    calls, real = [], torch._grouped_mm
    monkeypatch.setattr(torch, "_grouped_mm", lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs))
    return calls


@needs_numba
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", NUMBA_DTYPES)
def test_large_groups_of_aligned_operands_take_torch_grouped_mm(dtype, layout, matmul_library, gen, monkeypatch):
    """One torch._grouped_mm call instead of a loop over experts, where this torch has a CPU
    one and the operands suit it (bfloat16 where it is not computed in float32, or float32
    where BLAS computes it; 16-byte strides) and no AMX tiles take them (bfloat16 weights in
    nn.Linear's layout, on a CPU with AMX-BF16); the loop otherwise."""
    from moe_dispatch.kernels.numba.tile_products import tiles_available

    large_groups_everywhere(monkeypatch)
    # probed before the spy counts
    tiles = dtype == torch.bfloat16 and layout == "nk" and tiles_available()
    grouped = cm._grouped_mm_on_cpu() and not tiles and (
        dtype == torch.bfloat16 and not cm.computes_in_float32(dtype)
        or dtype == torch.float32 and matmul_library == "blas"
    )
    calls = spy_torch_grouped_mm(monkeypatch)
    E, K, N, rows = 6, 32, 16, 40
    offsets = offsets_of(random_ids(rows, 1, E - 1, gen), E)  # the last expert is empty
    xs = torch.randn(rows, K, generator=gen).to(dtype)
    w = weights_in(layout, E, K, N, dtype, gen)
    assert_close(md.grouped_mm(xs, w, offsets, backend="numba"), naive_grouped_mm(xs, w, offsets), dtype)
    assert calls == ([1] if grouped and layout != "strided" else [])  # strided: 8-byte steps


@needs_numba
@pytest.mark.parametrize("shape", [(21, 13), (32, 16)], ids=["odd", "aligned"])  # aligned: torch._grouped_mm
@pytest.mark.parametrize("groups", list(GROUPS))
@pytest.mark.parametrize("dtype", NUMBA_DTYPES)
def test_grouped_mm_wgrad_group_sizes(dtype, groups, shape, matmul_library, gen, monkeypatch):
    GROUPS[groups](monkeypatch)
    (M, N), E, rows = shape, 6, 50
    offsets = offsets_of(random_ids(rows, 1, E - 2, gen), E)  # the last two experts are empty
    a = torch.randn(rows, M, generator=gen).to(dtype)
    b = torch.randn(rows, N, generator=gen).to(dtype)
    assert_wgrad(get_backend("numba").grouped_mm_wgrad(a, b, offsets, E), a, b, offsets, dtype)


@needs_numba
@pytest.mark.parametrize("dtype", NUMBA_DTYPES)
def test_grouped_mm_wgrad_of_large_outputs_goes_expert_by_expert(dtype, gen, monkeypatch):
    """A weight gradient past huge_pages.MIN_BYTES: one library product per expert into an output
    asked for on huge pages, never torch._grouped_mm's own memory, and the experts without rows
    zeroed whatever the new memory held."""
    from moe_dispatch.backends import huge_pages

    large_groups_everywhere(monkeypatch)
    monkeypatch.setattr(huge_pages, "MIN_BYTES", 1)
    monkeypatch.setattr(huge_pages, "new_empty", lambda like, *shape: like.new_full(shape, float("nan")))
    calls = spy_torch_grouped_mm(monkeypatch)
    E, rows = 6, 50
    offsets = offsets_of(random_ids(rows, 1, E - 2, gen), E)  # the last two experts are empty
    a = torch.randn(rows, 32, generator=gen).to(dtype)
    b = torch.randn(rows, 16, generator=gen).to(dtype)
    assert_wgrad(get_backend("numba").grouped_mm_wgrad(a, b, offsets, E), a, b, offsets, dtype)
    assert calls == []


@needs_numba
def test_torch_grouped_mm_is_offered_only_layouts_it_takes():
    """takes_grouped_mm's layout test is torch's own: a unit stride passes nothing by itself (the
    wgrad of an H=1 layer offered a.T of strides (1, 1), which torch refused). Over unit and
    empty sizes, transposed, sliced and expanded operands, every layout it admits runs, and
    the aligned ones are admitted."""
    if not cm._grouped_mm_on_cpu():
        pytest.skip("this torch has no CPU torch._grouped_mm")
    admitted = 0
    for dtype, R, K, N, E in itertools.product((torch.float32, torch.bfloat16), (0, 1, 3, 8), (1, 3, 8), (1, 2, 8),
                                               (1, 3)):
        offs = torch.tensor([R * (e + 1) // E for e in range(E)], dtype=torch.int32)
        activations = [torch.randn(R, K), torch.randn(K, R).T, torch.randn(R + 1, K + 8)[:R, :K]]
        weights = [torch.randn(E, K, N), torch.randn(E, N, K).transpose(1, 2), torch.randn(E, K + 4, N + 4)[:, :K, :N],
                   torch.randn(K, N).expand(E, K, N)]
        for a, w in itertools.product(activations, weights):
            a, w = a.to(dtype), w.to(dtype)
            if cm._grouped_mm_layout(a) and cm._grouped_mm_layout(w):
                torch._grouped_mm(a, w, offs=offs)  # raises if torch refuses it
                admitted += 1
    assert admitted > 200  # 239 with torch 2.13: the aligned ones are not sent to the loop


@needs_numba
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("dtype", [*NUMBA_DTYPES, torch.float64])
def test_matmul_into_any_strides(dtype, bias, matmul_library, gen):
    """Both libraries, operands as the blocked path and the backward pass them: a row block,
    a transposed view (w[e] of nn.Linear storage, a.T of a weight gradient), a strided one."""
    M, K, N = 11, 37, 19
    a = torch.randn(M, K, generator=gen).to(dtype)
    b_bias = torch.randn(N, generator=gen).to(dtype) if bias else None
    operands = {
        "row-major": (a, torch.randn(K, N, generator=gen).to(dtype)),
        "transposed": (torch.randn(K, M, generator=gen).to(dtype).T, torch.randn(N, K, generator=gen).to(dtype).T),
        "strided": (a, torch.randn(K, 2 * N, generator=gen).to(dtype)[:, ::2]),
    }
    for x, w in operands.values():
        inputs = [t.clone() for t in (x, w, b_bias) if t is not None]
        out = torch.full((M, N), float("nan"), dtype=dtype)
        cm.matmul_into(out, x, w, b_bias)
        expected = x.double() @ w.double() + (0 if b_bias is None else b_bias.double())
        assert_close(out, expected, dtype)
        assert all(torch.equal(t, u) for t, u in zip(inputs, (x, w, b_bias)))


@needs_numba
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_only_products_worth_its_call_go_to_onednn(dtype, monkeypatch, gen):
    skip_without_onednn()
    monkeypatch.setenv("MOE_DISPATCH_CPU_MATMUL", "onednn")
    calls, real = [], cm.onednn_linear
    monkeypatch.setattr(cm, "onednn_linear", lambda *args: calls.append(1) or real(*args))
    for m, k, n in ((8, 32, 32), (64, 256, 256)):  # 16 KFLOP, 8.4 MFLOP
        a, b = torch.randn(m, k, generator=gen).to(dtype), torch.randn(k, n, generator=gen).to(dtype)
        out = torch.empty(m, n, dtype=dtype)
        cm.matmul_into(out, a, b, None)
        assert_close(out, a.double() @ b.double(), dtype)
    assert calls == [1]


@needs_numba
@pytest.mark.parametrize("as_fast", [False, True], ids=["onednn-faster", "blas-as-fast"])
def test_float32_into_a_buffer_goes_to_blas_where_it_is_as_fast(as_fast, monkeypatch, gen):
    """Where BLAS multiplies float32 as fast as oneDNN (MKL on Intel) and no library was named,
    a product with an out writes it itself instead of through oneDNN's new memory and a copy;
    one that wants the library's own result keeps oneDNN."""
    skip_without_onednn()
    monkeypatch.delenv("MOE_DISPATCH_CPU_MATMUL", raising=False)
    monkeypatch.setattr(cm, "onednn_float32", lambda: True)
    monkeypatch.setattr(cm, "ONEDNN_MIN_FLOPS", 0)
    monkeypatch.setattr(cm, "blas_is_mkl_on_intel", lambda: as_fast)
    monkeypatch.setattr(cm, "mkl_without_avx512", lambda: False)
    calls, real = [], cm.onednn_linear
    monkeypatch.setattr(cm, "onednn_linear", lambda *args: calls.append(1) or real(*args))
    a, b = torch.randn(16, 32, generator=gen), torch.randn(32, 8, generator=gen)
    out = torch.full((16, 8), float("nan"))
    assert cm.matmul_into(out, a, b, None) is out
    assert_close(out, a.double() @ b.double())
    assert_close(cm.matmul_into(None, a, b, None), a.double() @ b.double())
    assert calls == ([1] if as_fast else [1, 1])


@needs_numba
@pytest.mark.parametrize("setting", ["auto", "onednn"])
def test_float32_goes_to_mkl_without_avx512_but_for_wide_outputs(setting, monkeypatch, gen):
    """On an x86 processor without AVX-512, MKL's float32 products are the faster ones, with or
    without an out, for outputs of up to BLAS_MAX_COLUMNS; wider ones, or any where oneDNN was
    named, go to oneDNN. torch._grouped_mm, which calls BLAS too, still takes none: its loop
    over MKL ran slower than ours there."""
    skip_without_onednn()
    monkeypatch.setenv("MOE_DISPATCH_CPU_MATMUL", setting)
    monkeypatch.setattr(cm, "ONEDNN_MIN_FLOPS", 0)
    monkeypatch.setattr(cm, "BLAS_MAX_COLUMNS", 8)
    monkeypatch.setattr(cm, "blas_is_mkl_on_intel", lambda: False)
    monkeypatch.setattr(cm, "mkl_without_avx512", lambda: True)
    calls, real = [], cm.onednn_linear
    monkeypatch.setattr(cm, "onednn_linear", lambda *args: calls.append(args[1].shape[0]) or real(*args))
    a = torch.randn(16, 32, generator=gen)
    for columns in (8, 9):
        b = torch.randn(32, columns, generator=gen)
        out = torch.full((16, columns), float("nan"))
        assert cm.matmul_into(out, a, b, None) is out
        assert_close(out, a.double() @ b.double())
        assert_close(cm.matmul_into(None, a, b, None), a.double() @ b.double())
    assert calls == ([9, 9] if setting == "auto" else [8, 8, 9, 9])
    assert not cm.takes_grouped_mm(1e9, a, torch.randn(1, 32, 8, generator=gen))


@needs_numba
@pytest.mark.parametrize("onednn_bfloat16", [False, True], ids=["avx2", "avx512"])
def test_bfloat16_goes_through_float32_where_onednn_has_no_bfloat16(onednn_bfloat16, monkeypatch, gen):
    """Without AVX-512 torch's own bfloat16 product ran 100x slower than through float32: the
    library products (and torch._grouped_mm, which calls it) take float32 copies there."""
    real = cm.onednn_available
    monkeypatch.setattr(cm, "onednn_available",
                        lambda dtype=torch.float32: (onednn_bfloat16 if dtype == torch.bfloat16 else real(dtype)))
    monkeypatch.setenv("MOE_DISPATCH_CPU_MATMUL", "blas")
    multiplied, real_mm = [], torch.mm
    monkeypatch.setattr(cm.torch, "mm", lambda a, b, **kw: multiplied.append(a.dtype) or real_mm(a, b, **kw))
    a, b = torch.randn(8, 32, generator=gen).bfloat16(), torch.randn(32, 16, generator=gen).bfloat16()
    out = cm.matmul_into(None, a, b, None)
    assert out.dtype == torch.bfloat16 and multiplied == [torch.bfloat16 if onednn_bfloat16 else torch.float32]
    assert_close(out, a.double() @ b.double(), torch.bfloat16)
    assert cm.computes_in_float32(torch.bfloat16) != onednn_bfloat16
    assert cm.takes_grouped_mm(1.0, a, b.T.contiguous().unsqueeze(0)) == (onednn_bfloat16 and cm._grouped_mm_on_cpu())


@needs_numba
def test_matmul_into_with_nothing_to_sum(matmul_library):
    out = torch.full((3, 4), float("nan"))
    cm.matmul_into(out, torch.empty(3, 0), torch.empty(0, 4), torch.ones(4))
    assert torch.equal(out, torch.ones(3, 4))


@needs_numba
def test_a_torch_whose_onednn_ops_fail_multiplies_with_blas(monkeypatch, gen):
    def broken(*args):
        raise RuntimeError("no such op")

    monkeypatch.delenv("MOE_DISPATCH_CPU_MATMUL", raising=False)
    monkeypatch.setattr(cm, "onednn_linear", broken)
    cm.onednn_available.cache_clear()
    cm._onednn_float32.cache_clear()
    try:
        assert not cm.onednn_available() and not cm.onednn_float32()
        a, b = torch.randn(64, 256, generator=gen), torch.randn(256, 256, generator=gen)
        out = torch.empty(64, 256)
        cm.matmul_into(out, a, b, None)
        assert_close(out, a.double() @ b.double())
    finally:  # answers made with the broken op
        cm.onednn_available.cache_clear()
        cm._onednn_float32.cache_clear()


@needs_numba
def test_matmul_library_setting_is_checked(monkeypatch):
    monkeypatch.setenv("MOE_DISPATCH_CPU_MATMUL", "mkl")
    with pytest.raises(ValueError, match="MOE_DISPATCH_CPU_MATMUL must be one of auto, onednn, blas; got 'mkl'"):
        cm.onednn_float32()
    monkeypatch.setenv("MOE_DISPATCH_CPU_MATMUL", "onednn")
    monkeypatch.setattr(cm, "onednn_available", lambda: False)
    cm._onednn_float32.cache_clear()  # an answer from before the patch; errors are never cached
    with pytest.raises(ValueError, match="MOE_DISPATCH_CPU_MATMUL=onednn, but this torch has no oneDNN"):
        cm.onednn_float32()


# ---- triton: the grouped GEMM's tiles, split-K, TMA and fused epilogues ----------------------

if HAS_TRITON:
    GEMM_CONFIGS = [
        pytest.param(TileConfig(16, 16, 16), id="16x16x16"),
        # the decode variant: K split over 3 programs, partials summed by a second kernel
        pytest.param(TileConfig(16, 16, 16, split_k=3), id="split-k=3"),
        # taller tiles than any expert's rows, wider than N
        pytest.param(TileConfig(32, 32, 32, split_k=2), id="32x32x32-split-k=2"),
    ]
    TMA_CONFIGS = [pytest.param(TileConfig(16, 16, 16, tma=True), id="tma"),
                   pytest.param(TileConfig(16, 16, 16, split_k=3, tma=True), id="tma-split-k=3")]
else:  # TileConfig needs Triton; the tests below skip
    GEMM_CONFIGS = TMA_CONFIGS = []


def _fused_reference(x, weights, plan, w_gate_up, w_down, b_gate_up, b_down, activation, interleaved=False):
    """The unfused composition on the torch backend: (h, act, per-slot outputs)."""
    ref = TorchBackend()
    xs = ref.permute(x.cpu(), plan.token_of_row.cpu())
    h = ref.grouped_mm(xs, w_gate_up.cpu().transpose(1, 2), plan.offsets.cpu(), b_gate_up.cpu())
    act = md.activations.activate(h, activation, interleaved).to(x.dtype)
    o = ref.grouped_mm(act, w_down.cpu().transpose(1, 2), plan.offsets.cpu(), b_down.cpu())
    slots = o.float()[plan.row_of_slot.cpu().reshape(-1).long()] * weights.cpu().reshape(-1, 1)
    return h, act, slots


def _check_epilogues(config, activation, dtype, gen, sizes=(13, 3, 5, 37, 19), interleaved=False, down_config=None):
    # GEMM1: gathered rows, bias, activation, h stored (in the weight's column order); GEMM2
    # (down_config, else config): bias, routing weight, scatter to slots
    tokens, top_k, experts, hidden, inter = sizes
    ids = random_ids(tokens, top_k, experts, gen).to(DEVICE)
    plan = md.make_plan(ids, experts, backend="triton")
    x = randn(tokens, hidden, gen=gen, dtype=dtype, device=DEVICE)
    weights = random_weights(tokens, top_k, gen).to(DEVICE)
    w_gate_up, w_down, b_gate_up, b_down = expert_weights(experts, hidden, inter, gen, dtype, activation, bias=True,
                                                          bias_scale=0.5, device=DEVICE)
    slot_of_row, weight_of_row = kmove.invert_rows(plan.row_of_slot, weights)

    act, h = kgemm.grouped_gemm(x, w_gate_up.transpose(1, 2), plan.offsets, config, bias=b_gate_up,
                                a_rows=plan.token_of_row, activation=ACTIVATIONS[activation],
                                gate_columns=gate_up_columns(activation, interleaved, inter), store_h=True)
    slots, _ = kgemm.grouped_gemm(act, w_down.transpose(1, 2), plan.offsets, down_config or config, bias=b_down,
                                  slot_of_row=slot_of_row, weight_of_row=weight_of_row)
    ref_h, ref_act, ref_slots = _fused_reference(x, weights, plan, w_gate_up, w_down, b_gate_up, b_down, activation,
                                                 interleaved)
    # h: gate columns, then up columns, whatever the weights' order
    gate, up = md.activations.gate_and_up(ref_h, activation, interleaved)
    assert_close(h, ref_h if up is None else torch.cat((gate, up), dim=-1))
    assert_close(act, ref_act)
    assert_close(slots, ref_slots, dtype=dtype)


@needs_triton
@pytest.mark.parametrize("activation,interleaved", [
    pytest.param("swiglu", False, id="swiglu"),
    pytest.param("relu", False, id="relu"),
    # gpt-oss's: gate and up columns alternate, the gate clamped from above, up + 1
    pytest.param("clamped_swiglu", True, id="clamped_swiglu-interleaved"),
])
@pytest.mark.parametrize("config", GEMM_CONFIGS)
def test_gemm_epilogues_match_the_unfused_composition(config, activation, interleaved, gen):
    _check_epilogues(config, activation, torch.float32, gen, interleaved=interleaved)


@needs_triton
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)  # bf16 through the interpreter's float32 path
@pytest.mark.parametrize("config", TMA_CONFIGS)
def test_tma_weight_tiles_match_the_unfused_composition(config, dtype, gen):
    # H = 40 and I = 24 make 16-byte weight rows, so both GEMMs load W through a TMA descriptor;
    # N = 24 leaves a partial last N-tile whose rows run into the next expert's (gated: the up half)
    for shape in ((5, 48, 40), (5, 40, 24)):  # w_gate_up and w_down as the GEMMs see them
        assert kgemm.weight_descriptor(torch.empty(shape, dtype=dtype).transpose(1, 2), config) is not None
    _check_epilogues(config, "swiglu", dtype, gen, sizes=(13, 3, 5, 40, 24))


@needs_triton
def test_weights_tma_cannot_read_go_through_pointers():
    config = TileConfig(16, 16, 16, tma=True)
    assert kgemm.weight_descriptor(torch.empty(5, 48, 37).transpose(1, 2), config) is None  # rows of 148 bytes
    assert kgemm.weight_descriptor(torch.empty(5, 40, 48), config) is None  # N contiguous, not K
    assert kgemm.weight_descriptor(torch.empty(5, 48, 40).transpose(1, 2), TileConfig(16, 16, 16)) is None


# K = 45 masks the last K-block; K = 48 is whole blocks, loaded without a K mask; K = 64 is four
# whole blocks of 16, which three K-splits share unevenly
@needs_triton
@pytest.mark.parametrize("k_dim", [45, 48, 64])
@pytest.mark.parametrize("config", GEMM_CONFIGS)
def test_split_k_grouped_mm_with_empty_experts(config, k_dim, gen):
    # strided (transposed) weights, experts 0, 2 and 4 without rows, int64 offsets
    offsets = torch.tensor([0, 0, 7, 7, 18, 18], dtype=torch.int64, device=DEVICE)
    a = randn(18, k_dim, gen=gen, device=DEVICE)
    w = randn(5, 21, k_dim, gen=gen, scale=0.2, device=DEVICE).transpose(1, 2)
    out, _ = kgemm.grouped_gemm(a, w, offsets, config)
    assert_close(out, naive_grouped_mm(a.cpu(), w.cpu(), offsets.tolist()))


if HAS_TRITON:

    @triton.jit
    def _tile_coords_kernel(out_ptr, num_m_tiles, num_n_tiles, GROUP_M: tl.constexpr):
        pid_m, pid_n = kgemm.tile_coords(tl.program_id(0), num_m_tiles, num_n_tiles, GROUP_M)
        tl.store(out_ptr + 2 * tl.program_id(0), pid_m)
        tl.store(out_ptr + 2 * tl.program_id(0) + 1, pid_n)


# a last group shorter than GROUP_M, fewer M-tiles than one group, one N-tile
@needs_triton
@pytest.mark.parametrize("m_tiles,n_tiles,group_m", [(19, 5, 8), (3, 7, 8), (16, 1, 8), (5, 4, 1)])
def test_tile_order_takes_every_tile_once_a_group_of_m_tiles_at_a_time(m_tiles, n_tiles, group_m):
    coords = torch.full((m_tiles * n_tiles, 2), -1, dtype=torch.int32, device=DEVICE)
    _tile_coords_kernel[(m_tiles * n_tiles,)](coords, m_tiles, n_tiles, GROUP_M=group_m)
    coords = [tuple(c) for c in coords.tolist()]
    assert sorted(coords) == [(m, n) for m in range(m_tiles) for n in range(n_tiles)]
    # program order: the M-tiles of a group sweep every N-tile before the next group starts
    groups = [m // group_m for m, _ in coords]
    assert groups == sorted(groups)
    first_group = [c for c in coords if c[0] < group_m]
    assert [n for _, n in first_group] == sorted(n for _, n in first_group)


@needs_triton
@pytest.mark.parametrize("config", GEMM_CONFIGS[:2])
def test_gemm_writes_into_an_output_whose_rows_are_strided(config, gen):
    offsets = torch.tensor([0, 5, 5, 12], dtype=torch.int32, device=DEVICE)
    a = randn(12, 20, gen=gen, device=DEVICE)
    w = randn(3, 20, 24, gen=gen, scale=0.2, device=DEVICE)
    guard = torch.full((12, 31), 7.0, device=DEVICE)
    kgemm.grouped_gemm(a, w, offsets, config, out=guard[:, 3:27])
    assert_close(guard[:, 3:27], naive_grouped_mm(a.cpu(), w.cpu(), offsets.tolist()))
    assert (guard[:, :3] == 7).all() and (guard[:, 27:] == 7).all()


@needs_triton
def test_gemm_never_writes_outside_its_output_even_with_inconsistent_offsets(gen):
    # Offsets are not checked on CUDA (it would sync): decreasing ones, and ones past the
    # rows, must still keep every store inside the output, here a slice of a guarded buffer.
    a = randn(10, 20, gen=gen, device=DEVICE)
    w = randn(3, 20, 24, gen=gen, device=DEVICE)
    for offsets in ([0, 50, 3, 1000], [7, 2, 2, 10], [-5, 4, 4, 9]):
        for config in (TileConfig(16, 16, 16), TileConfig(16, 16, 16, split_k=2)):
            guard = torch.full((30, 24), 7.0, device=DEVICE)
            kgemm.grouped_gemm(a, w, torch.tensor(offsets, device=DEVICE), config, out=guard[10:20])
            assert (guard[:10] == 7).all() and (guard[20:] == 7).all(), (offsets, config)


# ---- triton on a GPU: bf16 and every tuning candidate -----------------------------------------

@needs_triton
@pytest.mark.parametrize("config", GEMM_CONFIGS)
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_gpu_bf16_epilogues_and_split_k(config, gen):
    _check_epilogues(config, "swiglu", torch.bfloat16, gen)


@needs_triton
@pytest.mark.parametrize("rows_per_expert", [1, 32, 1024])
@pytest.mark.parametrize("dtype", TUNED_DTYPES)
@pytest.mark.usefixtures("pinned_configs")
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_gpu_every_tuning_candidate_matches(dtype, rows_per_expert, gen, request):
    # Autotuning keeps the fastest candidate unchecked, so every one must compute the same: the
    # decode tiles (with split-K) and the large ones (up to 128x256 and 16 warps on sm_90), over
    # several M-tiles per expert and a partial last N-tile.
    if dtype == torch.float32:
        request.getfixturevalue("fma_float32")
    # Each GEMM meets the candidates of its own kind: the gated one's hold two weight tiles.
    budget = configs.shared_memory_budget(DEVICE)
    fma = configs.uses_fma(dtype, DEVICE)
    up, down = (configs.gemm_tiles(rows_per_expert, gated, dtype.itemsize, budget, fma) for gated in (True, False))
    if rows_per_expert == 1:
        up, down = ([*tiles, *(replace(c, split_k=3) for c in tiles)] for tiles in (up, down))
    for up_config, down_config in itertools.zip_longest(up, down):
        up_config, down_config = up_config or up[0], down_config or down[0]
        try:
            _check_epilogues(up_config, "swiglu", dtype, gen, sizes=(300, 2, 3, 256, 200), down_config=down_config)
        except AssertionError as exc:
            raise AssertionError(f"{up_config}, {down_config}: {exc}") from exc
