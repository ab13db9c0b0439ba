"""What only the numba backend has: its two moe_mlp paths, its grouped_mm weight layouts and
group sizes, the 16-bit conversions, its kernels under bounds checking, its thread settings.

The backend-generic suite covers the public contract on default settings; here each path
is forced and compared with tests/reference.py. Tests marked `nojit` are the small subset
CI also runs with NUMBA_DISABLE_JIT=1, so coverage sees the kernels' Python source:
    NUMBA_DISABLE_JIT=1 python -m pytest tests/test_numba.py -m nojit -q
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from cases import CASES, Case
from conftest import CPU, assert_close, random_ids, random_weights
from moe_dispatch import grouped_mm, make_plan, moe_mlp
from moe_dispatch.activations import ACTIVATIONS, is_gated
from moe_dispatch.backends import get_backend, unavailable_reason
from moe_dispatch.backends.base import Backend, expert_of_row
from reference import naive_grouped_mm, naive_moe_mlp

if unavailable_reason("numba", CPU) is not None:
    pytest.skip(f"numba backend unavailable: {unavailable_reason('numba', CPU)}", allow_module_level=True)

import numba  # noqa: E402

import moe_dispatch.backends.cpu_matmul as cm  # noqa: E402
import moe_dispatch.backends.cpu_packing as packing  # noqa: E402
import moe_dispatch.backends.numba_backend as nb  # noqa: E402
from moe_dispatch.kernels.numba.scalars import narrow, widen  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
JIT = not numba.config.DISABLE_JIT
nojit = pytest.mark.nojit


def small_groups_everywhere(monkeypatch):
    """Every expert counts as small: Numba kernels for all groups, decode for moe_mlp."""
    monkeypatch.setattr(nb, "fused_rows_limit", lambda dtype, flops_per_row: 10**9)


def large_groups_everywhere(monkeypatch):
    """Every expert with rows counts as large: BLAS for all groups, the blocked moe_mlp."""
    monkeypatch.setattr(nb, "fused_rows_limit", lambda dtype, flops_per_row: 0)


@pytest.fixture(params=["onednn", "blas"])
def matmul_library(request, monkeypatch):
    """The library of the large groups' float32 and float16 products (cpu_matmul), for
    products of any size (the tests' are far below ONEDNN_MIN_FLOPS)."""
    if request.param == "onednn" and not cm.onednn_available():
        pytest.skip("this torch has no oneDNN linear op")
    monkeypatch.setenv("MOE_DISPATCH_CPU_MATMUL", request.param)
    monkeypatch.setattr(cm, "ONEDNN_MIN_FLOPS", 0)
    return request.param


def count_decode_calls(monkeypatch) -> list:
    """Record each fused decode step that ran, from a plan or from the ids (still calling the
    kernels), so a test can see which path ran; a step from the ids that declined (too many
    rows per expert) does not count."""
    calls = []

    def spy(name, original):
        def call(*args):
            status = original(*args)
            if status != nb.mlp.NOT_DECODE:
                calls.append(name)
            return status

        return call

    for name in ("moe_mlp_decode", "moe_mlp_decode_ids"):
        monkeypatch.setattr(nb.mlp, name, spy(name, getattr(nb.mlp, name)))
    return calls


def expert_weights(E, H, I, gated, dtype, gen, layout="contiguous", bias=False):
    """(w_gate_up [E, W, H], w_down [E, H, I], b_gate_up, b_down); "transposed" gives views of
    [E, H, W] / [E, I, H] storage, as a model storing in_features first would pass them."""
    width = 2 * I if gated else I
    w_gate_up = torch.randn(E, width, H, generator=gen) / H**0.5
    w_down = torch.randn(E, H, I, generator=gen) / I**0.5
    if layout == "transposed":
        w_gate_up = w_gate_up.transpose(1, 2).contiguous().transpose(1, 2)
        w_down = w_down.transpose(1, 2).contiguous().transpose(1, 2)
    biases = (torch.randn(E, width, generator=gen), torch.randn(E, H, generator=gen)) if bias else (None, None)
    return w_gate_up.to(dtype), w_down.to(dtype), *biases


# ---- moe_mlp: each path against the reference --------------------------------------------

PATHS = ["decode", "decode-quad", "blas", "strided"]


def force_path(path, monkeypatch):
    """decode: the fused kernels; decode-quad: the same with GEMM1 taking gated columns two
    at a time on packed bfloat16 weights (what many rows per expert get); blas: BLAS per
    expert; strided: transposed weight views, which the Numba kernels do not read: the
    blocked path, BLAS reading the views in place."""
    if path == "decode-quad":
        monkeypatch.setattr(nb, "QUAD_ROWS", 0)
    if path == "blas":
        large_groups_everywhere(monkeypatch)
    else:
        small_groups_everywhere(monkeypatch)
    return "transposed" if path == "strided" else "contiguous"


def check_moe_mlp(case, dtype, path, activation, bias, gen, monkeypatch):
    layout = force_path(path, monkeypatch)
    decode_calls = count_decode_calls(monkeypatch)
    x = torch.randn(case.tokens, case.hidden, generator=gen).to(dtype)
    ids = case.ids(gen)
    weights = random_weights(case.tokens, case.top_k, gen)
    w_gate_up, w_down, b_gate_up, b_down = expert_weights(
        case.experts, case.hidden, case.inter, activation in ("swiglu", "geglu"), dtype, gen, layout, bias
    )
    out = moe_mlp(x, weights, ids, w_gate_up, w_down, activation=activation,
                  b_gate_up=b_gate_up, b_down=b_down, backend="numba")
    expected = naive_moe_mlp(x, weights, ids, w_gate_up, w_down, b_gate_up, b_down, activation)
    assert out.dtype == dtype
    assert_close(out, expected, dtype)
    assert bool(decode_calls) == (path.startswith("decode") and case.tokens > 0)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_moe_mlp_paths_match_reference(case, dtype, path, gen, monkeypatch):
    check_moe_mlp(case, dtype, path, "swiglu", False, gen, monkeypatch)


@pytest.mark.parametrize("path", ["decode", "decode-quad"])
def test_bf16_decode_with_packed_gate_up_and_an_odd_intermediate_size(path, gen, monkeypatch):
    """H even: w_gate_up is read as bf16 pairs (and, quad, its gated columns two at a time);
    I odd: w_down is not, and the last gated column has no partner."""
    check_moe_mlp(Case(tokens=17, top_k=2, experts=4, hidden=24, inter=19), torch.bfloat16, path, "swiglu",
                  False, gen, monkeypatch)


def test_decode_reads_bf16_weights_at_an_odd_storage_offset(gen, monkeypatch):
    """A contiguous view one element into a flat buffer cannot be read as bf16 pairs."""
    small_groups_everywhere(monkeypatch)
    E, H, I = 4, 24, 20
    flat = (torch.randn(1 + E * 2 * I * H, generator=gen) / H**0.5).bfloat16()
    w_gate_up = flat[1:].view(E, 2 * I, H)
    _, w_down, _, _ = expert_weights(E, H, I, True, torch.bfloat16, gen)
    x, weights, ids = torch.randn(5, H, generator=gen).bfloat16(), random_weights(5, 2, gen), random_ids(5, 2, E, gen)
    assert_close(moe_mlp(x, weights, ids, w_gate_up, w_down, backend="numba"),
                 naive_moe_mlp(x, weights, ids, w_gate_up, w_down), torch.bfloat16)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("activation", ["swiglu", "geglu", "gelu", "relu", "silu"])
def test_moe_mlp_paths_activations_and_biases(activation, bias, path, gen, monkeypatch):
    case = CASES[1].values[0]  # odd sizes
    check_moe_mlp(case, torch.float32, path, activation, bias, gen, monkeypatch)


@nojit
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_nojit_moe_mlp_paths(dtype, path, gen, monkeypatch):
    # Tiny: under NUMBA_DISABLE_JIT the kernels run as Python.
    case = CASES[0].values[0]  # T < block
    check_moe_mlp(case, dtype, path, "swiglu", True, gen, monkeypatch)


def test_decode_is_chosen_by_rows_per_expert(gen, monkeypatch):
    """Default thresholds: a decode step is fused, a long prefill goes blocked."""
    decode_calls = count_decode_calls(monkeypatch)
    E, H, I = 4, 256, 128
    w_gate_up, w_down, _, _ = expert_weights(E, H, I, True, torch.float32, gen)
    limit = nb.fused_rows_limit(torch.float32, nb.mlp_flops_per_row(w_gate_up, w_down))
    for tokens, fused in ((1, True), (int(2 * limit * E), False)):  # 4x the limit's rows per expert
        decode_calls.clear()
        ids = random_ids(tokens, 2, E, gen)
        moe_mlp(torch.randn(tokens, H, generator=gen), random_weights(tokens, 2, gen), ids, w_gate_up, w_down,
                backend="numba")
        assert bool(decode_calls) == fused


def test_fused_rows_limit_grows_for_small_experts(matmul_library):
    """Small experts feel the blocked path's fixed cost per expert: the fused kernels keep
    them longer, never fewer rows than SMALL_GROUP_ROWS."""
    limits = nb.FUSED_LIMITS[matmul_library]
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        small = nb.fused_rows_limit(dtype, 2 * 512 * (384 + 192))
        large = nb.fused_rows_limit(dtype, 2 * 4096 * (2 * 14336 + 14336))
        assert small >= large >= limits[dtype][0]
        if limits[dtype][1]:
            assert small > limits[dtype][0]


def test_onednn_serves_float32_from_fewer_rows_than_blas():
    for dtype in (torch.float32, torch.float16):
        assert nb.FUSED_LIMITS["onednn"][dtype][0] < nb.FUSED_LIMITS["blas"][dtype][0]


def test_small_batch_plans_inside_the_decode_step(gen, monkeypatch):
    """Without autograd a small batch runs plan and experts in one Numba call; a call that
    needs gradients, or brings its own plan, takes the plan's arrays."""
    calls = count_decode_calls(monkeypatch)
    E, H, I, T = 8, 16, 8, 3
    w_gate_up, w_down, _, _ = expert_weights(E, H, I, True, torch.float32, gen)
    x, weights, ids = torch.randn(T, H, generator=gen), random_weights(T, 2, gen), random_ids(T, 2, E, gen)
    expected = naive_moe_mlp(x, weights, ids, w_gate_up, w_down, None, None, "swiglu")
    for inputs, plan, entry in (
        ((x, weights), None, "moe_mlp_decode_ids"),
        ((x, weights), make_plan(ids, E, backend="numba"), "moe_mlp_decode"),
        ((x.clone().requires_grad_(), weights), None, "moe_mlp_decode"),
    ):
        calls.clear()
        out = moe_mlp(*inputs, ids, w_gate_up, w_down, plan=plan, backend="numba")
        assert calls == [entry]
        assert_close(out, expected, torch.float32)


@pytest.mark.parametrize("path", ["decode", "blas"])
def test_gradients_after_each_forward_path(path, matmul_library, gen, monkeypatch):
    """The h the decode kernel saves serves the backward as the blocked path's does."""
    force_path(path, monkeypatch)
    case = CASES[1].values[0]
    ids = case.ids(gen)
    inputs = [
        torch.randn(case.tokens, case.hidden, generator=gen),
        random_weights(case.tokens, case.top_k, gen),
        *expert_weights(case.experts, case.hidden, case.inter, True, torch.float32, gen, bias=True),
    ]
    grads = {}
    for backend in ("numba", "torch"):
        leaves = [t.clone().requires_grad_() for t in inputs]
        x, weights, w_gate_up, w_down, b_gate_up, b_down = leaves
        out = moe_mlp(x, weights, ids, w_gate_up, w_down, b_gate_up=b_gate_up, b_down=b_down, backend=backend)
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)))
        grads[backend] = [t.grad for t in leaves]
    for got, want in zip(grads["numba"], grads["torch"]):
        assert_close(got, want, torch.float32)


@nojit
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [*DTYPES, torch.float64])
def test_backward_rows_match_the_composition_in_float64(dtype, activation, gen):
    """The one-pass kernel between the backward's GEMMs against the base backend's torch
    composition of the same, in float64."""
    R, H, I = 37, 19, 11
    h = (3 * torch.randn(R, 2 * I if is_gated(activation) else I, generator=gen)).to(dtype)
    g, dyp = torch.randn(R, I, generator=gen).to(dtype), torch.randn(R, H, generator=gen).to(dtype)
    w_row = torch.rand(R, generator=gen).to(nb.acc_dtype(dtype))
    got = get_backend("numba").moe_mlp_backward_rows(h, g, dyp, w_row, activation)
    want = Backend().moe_mlp_backward_rows(h.double(), g.double(), dyp.double(), w_row.double(), activation)
    for name, out, ref in zip(("a", "d_row", "dh", "do"), got, want):
        assert out.dtype == (w_row.dtype if name == "d_row" else dtype), name
        assert_close(out, ref, dtype)


def test_backward_rows_refuse_disagreeing_shapes(gen):
    h, g, dyp, w_row = torch.randn(6, 8), torch.randn(6, 4), torch.randn(6, 5), torch.rand(6)
    backend = get_backend("numba")
    for args in ((h[:5], g, dyp, w_row), (h, g, dyp[:5], w_row), (h, g, dyp, w_row[:5]), (h[:, :6], g, dyp, w_row)):
        with pytest.raises(ValueError, match="must agree"):
            backend.moe_mlp_backward_rows(*args, "swiglu")


# ---- grouped_mm: weight layouts and group sizes ------------------------------------------

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
    return make_plan(ids, E, backend="torch").offsets


@pytest.mark.parametrize("groups", ["small", "large"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K", [37, 38], ids=["odd-K", "even-K"])  # even: bfloat16 read as uint32 pairs
def test_grouped_mm_layouts_and_group_sizes(K, dtype, layout, groups, matmul_library, gen, monkeypatch):
    (small_groups_everywhere if groups == "small" else large_groups_everywhere)(monkeypatch)
    E, N, rows = 5, 19, 41
    offsets = offsets_of(random_ids(rows, 1, E, gen), E)
    xs = torch.randn(rows, K, generator=gen).to(dtype)
    w = weights_in(layout, E, K, N, dtype, gen)
    out = grouped_mm(xs, w, offsets, backend="numba")
    assert_close(out, naive_grouped_mm(xs, w, offsets), dtype)


@nojit
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
    wgrad = backend.grouped_mm_wgrad(xs, dy, offsets, E)
    bounds = offsets.tolist()
    for e in range(E):
        part = slice(bounds[e], bounds[e + 1])
        assert_close(wgrad[e], xs[part].double().T @ dy[part].double())


def test_an_expert_with_as_many_rows_as_the_limit_is_a_small_group(gen, monkeypatch):
    monkeypatch.setattr(nb, "fused_rows_limit", lambda dtype, flops_per_row: 3)
    offsets = torch.tensor([0, 3, 5, 9], dtype=torch.int32)  # 3 rows, 2 (small) and 4 (large)
    xs, w = torch.randn(9, 8, generator=gen), weights_in("nk", 3, 8, 6, torch.float32, gen)
    assert_close(grouped_mm(xs, w, offsets, backend="numba"), naive_grouped_mm(xs, w, offsets))


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


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_large_groups_of_aligned_operands_take_torch_grouped_mm(dtype, layout, matmul_library, gen, monkeypatch):
    """One torch._grouped_mm call instead of a loop over experts, where this torch has a CPU
    one and the operands suit it (bfloat16, or float32 where BLAS computes it; 16-byte
    strides); the loop otherwise."""
    large_groups_everywhere(monkeypatch)
    # probed before the spy counts
    grouped = cm._grouped_mm_on_cpu() and (
        dtype == torch.bfloat16 or dtype == torch.float32 and matmul_library == "blas"
    )
    calls = spy_torch_grouped_mm(monkeypatch)
    E, K, N, rows = 6, 32, 16, 40
    offsets = offsets_of(random_ids(rows, 1, E - 1, gen), E)  # the last expert is empty
    xs = torch.randn(rows, K, generator=gen).to(dtype)
    w = weights_in(layout, E, K, N, dtype, gen)
    assert_close(grouped_mm(xs, w, offsets, backend="numba"), naive_grouped_mm(xs, w, offsets), dtype)
    assert calls == ([1] if grouped and layout != "strided" else [])  # strided: 8-byte steps


@pytest.mark.parametrize("shape", [(21, 13), (32, 16)], ids=["odd", "aligned"])  # aligned: torch._grouped_mm
@pytest.mark.parametrize("groups", ["small", "large"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_grouped_mm_wgrad_group_sizes(dtype, groups, shape, matmul_library, gen, monkeypatch):
    (small_groups_everywhere if groups == "small" else large_groups_everywhere)(monkeypatch)
    (M, N), E, rows = shape, 6, 50
    offsets = offsets_of(random_ids(rows, 1, E - 2, gen), E)  # the last two experts are empty
    a = torch.randn(rows, M, generator=gen).to(dtype)
    b = torch.randn(rows, N, generator=gen).to(dtype)
    out = get_backend("numba").grouped_mm_wgrad(a, b, offsets, E)
    bounds = offsets.tolist()
    for e in range(E):
        part = slice(bounds[e], bounds[e + 1])
        assert_close(out[e], a[part].double().T @ b[part].double(), dtype)


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("dtype", [*DTYPES, torch.float64])
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_only_products_worth_its_call_go_to_onednn(dtype, monkeypatch, gen):
    if not cm.onednn_available():
        pytest.skip("this torch has no oneDNN linear op")
    monkeypatch.setenv("MOE_DISPATCH_CPU_MATMUL", "onednn")
    calls, real = [], cm.onednn_linear
    monkeypatch.setattr(cm, "onednn_linear", lambda *args: calls.append(1) or real(*args))
    for m, k, n in ((8, 32, 32), (64, 256, 256)):  # 16 KFLOP, 8.4 MFLOP
        a, b = torch.randn(m, k, generator=gen).to(dtype), torch.randn(k, n, generator=gen).to(dtype)
        out = torch.empty(m, n, dtype=dtype)
        cm.matmul_into(out, a, b, None)
        assert_close(out, a.double() @ b.double(), dtype)
    assert calls == [1]


def test_matmul_into_with_nothing_to_sum(matmul_library):
    out = torch.full((3, 4), float("nan"))
    cm.matmul_into(out, torch.empty(3, 0), torch.empty(0, 4), torch.ones(4))
    assert torch.equal(out, torch.ones(3, 4))


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


def test_matmul_library_setting_is_checked(monkeypatch):
    monkeypatch.setenv("MOE_DISPATCH_CPU_MATMUL", "mkl")
    with pytest.raises(ValueError, match="MOE_DISPATCH_CPU_MATMUL must be one of auto, onednn, blas; got 'mkl'"):
        cm.onednn_float32()
    monkeypatch.setenv("MOE_DISPATCH_CPU_MATMUL", "onednn")
    monkeypatch.setattr(cm, "onednn_available", lambda: False)
    cm._onednn_float32.cache_clear()  # an answer from before the patch; errors are never cached
    with pytest.raises(ValueError, match="MOE_DISPATCH_CPU_MATMUL=onednn, but this torch has no oneDNN"):
        cm.onednn_float32()


# ---- weights packed for oneDNN (MOE_DISPATCH_PACK_WEIGHTS=1) ----------------------------


@pytest.fixture
def packing_on(monkeypatch):
    if not cm.onednn_available():
        pytest.skip("this torch has no oneDNN linear op")
    monkeypatch.setenv("MOE_DISPATCH_PACK_WEIGHTS", "1")
    large_groups_everywhere(monkeypatch)
    packing.clear_packed_weights()
    reorders, real = [], torch.ops.mkldnn._reorder_linear_weight
    monkeypatch.setattr(packing.torch.ops.mkldnn, "_reorder_linear_weight",
                        lambda w: reorders.append(1) or real(w), raising=False)
    yield reorders
    packing.clear_packed_weights()


def moe_mlp_case(gen, dtype, bias=True):
    case = CASES[1].values[0]  # odd sizes
    ids = case.ids(gen)
    x = torch.randn(case.tokens, case.hidden, generator=gen).to(dtype)
    weights = random_weights(case.tokens, case.top_k, gen)
    return x, weights, ids, *expert_weights(case.experts, case.hidden, case.inter, True, dtype, gen, bias=bias)


def check_against_reference(x, weights, ids, w_gate_up, w_down, b_gate_up, b_down):
    out = moe_mlp(x, weights, ids, w_gate_up, w_down, b_gate_up=b_gate_up, b_down=b_down, backend="numba")
    assert_close(out, naive_moe_mlp(x, weights, ids, w_gate_up, w_down, b_gate_up, b_down, "swiglu"), x.dtype)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_packed_weights_match_reference_and_follow_changes(dtype, packing_on, monkeypatch, gen):
    monkeypatch.setenv("MOE_DISPATCH_CPU_MATMUL", "onednn")
    x, weights, ids, w_gate_up, w_down, b_gate_up, b_down = moe_mlp_case(gen, dtype)
    active = len(ids.unique())
    check_against_reference(x, weights, ids, w_gate_up, w_down, b_gate_up, b_down)
    assert len(packing_on) == 2 * active  # each active expert's two weights, once
    check_against_reference(x, weights, ids, w_gate_up, w_down, b_gate_up, b_down)
    assert len(packing_on) == 2 * active  # reused
    w_gate_up.mul_(-1)  # in place: the version counter moves
    check_against_reference(x, weights, ids, w_gate_up, w_down, b_gate_up, b_down)
    w_down.data = w_down.flip(2).contiguous()  # new storage
    check_against_reference(x, weights, ids, w_gate_up, w_down, b_gate_up, b_down)
    assert len(packing_on) == 4 * active


def test_views_made_per_call_share_their_parameter_s_packed_copies(packing_on, gen):
    """A model storing [E, H, W] passes a fresh transposed view on every call."""
    x, weights, ids, w_gate_up, w_down, _, _ = moe_mlp_case(gen, torch.bfloat16, bias=False)
    stored = torch.nn.Parameter(w_gate_up.transpose(1, 2).contiguous(), requires_grad=False)
    with torch.no_grad():
        for _ in range(3):
            check_against_reference(x, weights, ids, stored.transpose(1, 2), w_down, None, None)
    assert len(packing_on) == 2 * len(ids.unique())
    del stored
    assert len(packing._CACHE) == 1  # w_down's; the parameter's went with it


def test_no_packing_for_weights_being_trained(packing_on, gen):
    x, weights, ids, w_gate_up, w_down, b_gate_up, b_down = moe_mlp_case(gen, torch.bfloat16)
    w_gate_up.requires_grad_()
    x.requires_grad_()
    check_against_reference(x, weights, ids, w_gate_up, w_down, b_gate_up, b_down).float().sum().backward()
    assert len(packing_on) == len(ids.unique())  # w_down only: frozen
    assert w_gate_up.grad is not None and x.grad is not None
    with torch.no_grad():
        check_against_reference(x, weights, ids, w_gate_up, w_down, b_gate_up, b_down)
    assert len(packing_on) == 2 * len(ids.unique())  # inference packs both


def test_weights_made_in_inference_mode_are_not_packed(packing_on, gen):
    """They carry no version counter that could tell a packed copy it is stale."""
    x, weights, ids, w_gate_up, w_down, _, _ = moe_mlp_case(gen, torch.bfloat16, bias=False)
    with torch.inference_mode():
        w_gate_up, w_down = w_gate_up.clone(), w_down.clone()
        check_against_reference(x, weights, ids, w_gate_up, w_down, None, None)
        w_gate_up.mul_(-1)
        check_against_reference(x, weights, ids, w_gate_up, w_down, None, None)
    assert packing_on == []


def test_packing_is_off_by_default_and_its_setting_is_checked(packing_on, monkeypatch, gen):
    monkeypatch.delenv("MOE_DISPATCH_PACK_WEIGHTS")
    check_against_reference(*moe_mlp_case(gen, torch.bfloat16))
    assert packing_on == []
    monkeypatch.setenv("MOE_DISPATCH_PACK_WEIGHTS", "yes")
    with pytest.raises(ValueError, match="MOE_DISPATCH_PACK_WEIGHTS must be 0 or 1; got 'yes'"):
        moe_mlp(*moe_mlp_case(gen, torch.bfloat16)[:5], backend="numba")


# ---- plan and data movement without the validating front end -----------------------------


@nojit
def test_nojit_plan_permute_combine(gen):
    backend = get_backend("numba")
    ids = random_ids(7, 3, 5, gen)
    counts, offsets, token_of_row, row_of_slot = backend.make_plan(ids, 5)
    want = get_backend("torch").make_plan(ids, 5)
    for got, expected in zip((counts, offsets, token_of_row, row_of_slot), want):
        assert got.dtype == torch.int32 and torch.equal(got, expected)
    x = torch.randn(7, 4, generator=gen).to(torch.bfloat16)
    xs = backend.permute(x, token_of_row)
    assert torch.equal(xs, x[token_of_row.long()])
    weights = random_weights(7, 3, gen)
    y = backend.unpermute(xs, row_of_slot, weights)
    assert_close(y, x.double() * weights.double().sum(1, keepdim=True), torch.bfloat16)
    dy = torch.randn(7, 4, generator=gen).to(torch.bfloat16)
    dxs, dweights = backend.unpermute_backward(dy, xs, token_of_row, row_of_slot, weights)
    assert_close(dxs, dy.double()[token_of_row.long()] * weights.double().view(-1)[slot_of_row(row_of_slot)][:, None],
                 torch.bfloat16)
    assert_close(dweights, (dy.double()[:, None, :] * xs.double()[row_of_slot.long()]).sum(-1), torch.bfloat16)


def slot_of_row(row_of_slot):
    """The inverse of row_of_slot, as flat slot indices [R]."""
    inverse = torch.empty(row_of_slot.numel(), dtype=torch.long)
    inverse[row_of_slot.reshape(-1).long()] = torch.arange(row_of_slot.numel())
    return inverse


# 1200 slots share the chunks evenly; 903 leave the last chunk a slot more or less
@pytest.mark.parametrize("tokens,top_k", [(300, 4), (301, 3)])
def test_parallel_plan_matches_torch(tokens, top_k, gen, monkeypatch):
    """Enough slots for several chunks: the parallel histogram and scatter stay stable."""
    from moe_dispatch.kernels.numba import plan as plan_kernels

    monkeypatch.setattr(plan_kernels, "MIN_SLOTS_PER_CHUNK", 64)
    ids = random_ids(tokens, top_k, 7, gen)
    ids[:150, 0] = 2  # one expert's rows span every chunk
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        got = get_backend("numba").make_plan(ids, 7)
    finally:
        torch.set_num_threads(before)
    for actual, expected in zip(got, get_backend("torch").make_plan(ids, 7)):
        assert torch.equal(actual, expected)


@pytest.mark.parametrize("bad", [-1, 5], ids=["negative", "E"])
def test_kernel_refuses_out_of_range_ids(bad, gen):
    """The front end validates ids; the kernel must still never index with a bad one."""
    ids = random_ids(6, 2, 5, gen)
    ids[3, 1] = bad
    before = ids.clone()
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 5\)"):
        get_backend("numba").make_plan(ids, 5)
    assert torch.equal(ids, before)


def test_kernels_refuse_bad_plans(gen):
    backend = get_backend("numba")
    x = torch.randn(4, 3, generator=gen)
    with pytest.raises(ValueError, match="token_of_row"):
        backend.permute(x, torch.tensor([0, 4, 1], dtype=torch.int32))
    with pytest.raises(ValueError, match="row_of_slot"):
        backend.unpermute(x, torch.tensor([[0, -1]], dtype=torch.int32), None)
    with pytest.raises(ValueError, match="exactly once"):
        backend.unpermute_backward(x, x, torch.zeros(4, dtype=torch.int32),
                                   torch.tensor([[0, 0], [1, 2]], dtype=torch.int32), torch.ones(2, 2))
    with pytest.raises(ValueError, match="exactly once"):  # fewer slots than rows: one row never written
        backend.unpermute_backward(x[:1], x[:3], torch.zeros(3, dtype=torch.int32),
                                   torch.tensor([[0, 1]], dtype=torch.int32), torch.ones(1, 2))
    for offsets in ([0, 3, 2], [0, 3, 1, 4]):  # short of the rows; falling, yet from 0 to the rows
        with pytest.raises(ValueError, match="offsets"):
            backend.grouped_mm(x, torch.randn(len(offsets) - 1, 3, 5), torch.tensor(offsets, dtype=torch.int32))
    # The fused decode step checks both index arrays before its kernels read through them,
    # at their limits too: T for a token, R for a row.
    plan = backend.make_plan(torch.tensor([[0], [1]], dtype=torch.int32), 2)
    for name, index, bad in (("token_of_row", 2, [0, 5]), ("row_of_slot", 3, [[0], [-1]]),
                             ("token_of_row", 2, [0, 2]), ("row_of_slot", 3, [[0], [2]])):
        bad_plan = list(plan)
        bad_plan[index] = torch.tensor(bad, dtype=torch.int32)
        with pytest.raises(ValueError, match=name):
            backend.moe_mlp(x[:2], torch.ones(2, 1), tuple(bad_plan), torch.randn(2, 4, 3), torch.randn(2, 3, 2),
                            None, None, "swiglu", False)


# ---- 16-bit conversions ------------------------------------------------------------------


def bits_view(t):
    return nb.as_array(t)


def conversion_inputs(count):
    """float32 values that stress rounding: every 16-bit pattern's neighbours, ties, specials."""
    patterns = torch.arange(0, 65536, max(1, 65536 // count), dtype=torch.int32)
    as_bf16 = (patterns << 16).view(torch.float32)
    ties = ((patterns << 16) | 0x8000).view(torch.float32)  # exactly halfway for bfloat16
    near = as_bf16 * (1 + 2.0**-12)
    specials = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 65504.0, 65520.0, 6e-8, 1e-40])
    return torch.cat([as_bf16, ties, near, specials])


@numba.njit
def _round_trip(values, out16, back32):
    for i in range(values.shape[0]):
        out16[i] = narrow(values[i], out16.dtype)
        back32[i] = widen(out16[i])


def check_conversions(dtype, count):
    values = conversion_inputs(count)
    expected = values.to(dtype)
    out16 = torch.empty_like(expected)
    back = torch.empty_like(values)
    _round_trip(values.numpy(), bits_view(out16), back.numpy())
    nan = expected.isnan()
    assert torch.equal(out16.isnan(), nan)
    assert torch.equal(out16.view(torch.int16)[~nan], expected.view(torch.int16)[~nan])
    assert torch.equal(back.isnan(), nan)
    assert torch.equal(back[~nan], expected.float()[~nan])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_16_bit_conversions_match_torch_bit_for_bit(dtype):
    check_conversions(dtype, 65536)


@nojit
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_nojit_16_bit_conversions(dtype):
    check_conversions(dtype, 512)


# ---- threads -----------------------------------------------------------------------------


def tiny_call(gen):
    E = 4
    ids = random_ids(3, 2, E, gen)
    w_gate_up, w_down, _, _ = expert_weights(E, 8, 4, True, torch.float32, gen)
    moe_mlp(torch.randn(3, 8, generator=gen), random_weights(3, 2, gen), ids, w_gate_up, w_down, backend="numba")


@pytest.mark.skipif(not JIT or numba.config.NUMBA_NUM_THREADS < 2, reason="needs two Numba threads")
def test_threads_follow_torch(gen, monkeypatch):
    monkeypatch.delenv("NUMBA_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    try:
        for wanted in (1, 2):
            torch.set_num_threads(wanted)
            tiny_call(gen)
            assert numba.get_num_threads() == wanted
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(not JIT or numba.config.NUMBA_NUM_THREADS < 2, reason="needs two Numba threads")
def test_numba_num_threads_env_wins(gen, monkeypatch):
    monkeypatch.setenv("NUMBA_NUM_THREADS", "2")
    before = (torch.get_num_threads(), numba.get_num_threads())
    try:
        numba.set_num_threads(1)
        torch.set_num_threads(2)
        tiny_call(gen)
        assert numba.get_num_threads() == 1
    finally:
        torch.set_num_threads(before[0])
        numba.set_num_threads(before[1])


def run_python(code: str, **env) -> str:
    """Run code in a fresh interpreter from the tests folder, with env added; return its stdout."""
    env = {**os.environ, **env}
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=600,
        cwd=os.path.dirname(__file__), env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.skipif(not JIT, reason="threading layers exist only under the JIT")
@pytest.mark.parametrize("layer", ["workqueue", "omp"])
def test_threading_layer_kept_and_concurrent_callers(layer):
    """The user's threading layer stands, the first launch leaves torch's thread count alone
    (Numba's OpenMP layer resets it), and calls from several Python threads work: on
    workqueue they take turns (it aborts the process on a concurrent launch)."""
    if layer == "omp" and importlib.util.find_spec("numba.np.ufunc.omppool") is None:
        pytest.skip("this Numba build has no OpenMP layer")
    code = """
        import threading, numba, torch
        from moe_dispatch import moe_mlp
        E = 4
        w_gate_up, w_down = torch.randn(E, 8, 16), torch.randn(E, 16, 4)
        torch.set_num_threads(1)
        x = torch.randn(64, 16)
        moe_mlp(x, torch.rand(64, 2), torch.rand(64, E).topk(2, -1).indices, w_gate_up, w_down, backend="numba")
        print(torch.get_num_threads())
        def work():
            for _ in range(20):
                x = torch.randn(64, 16)
                ids = torch.rand(64, E).topk(2, -1).indices
                moe_mlp(x, torch.rand(64, 2), ids, w_gate_up, w_down, backend="numba")
        threads = [threading.Thread(target=work) for _ in range(3)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        print(numba.threading_layer())
    """
    assert run_python(code, NUMBA_THREADING_LAYER=layer).split() == ["1", layer]


# ---- bounds checking ---------------------------------------------------------------------


@pytest.mark.skipif(not JIT, reason="bounds checking is a JIT option")
def test_kernels_under_boundscheck(tmp_path):
    """Every kernel, both moe_mlp paths and the backward, compiled with NUMBA_BOUNDSCHECK=1
    (a fresh cache, so nothing compiled without it is reused): an out-of-bounds access raises
    IndexError there instead of reading past an array."""
    code = """
        import torch
        import moe_dispatch.backends.numba_backend as nb
        from conftest import assert_close
        from moe_dispatch import grouped_mm, make_plan, moe_mlp, permute, unpermute
        g = torch.Generator().manual_seed(0)
        E, T, k, H, I = 5, 13, 3, 12, 7
        ids = torch.rand(T, E, generator=g).topk(k, -1).indices

        def run(backend, x, weights, wgu, wd, bgu, bd):
            leaves = [t.detach().requires_grad_() for t in (x, weights, wgu, wd, bgu, bd)]
            x, weights, wgu, wd, bgu, bd = leaves
            out = moe_mlp(x, weights, ids, wgu, wd, b_gate_up=bgu, b_down=bd, backend=backend)
            grads = torch.autograd.grad(out.sum(), leaves)
            plan = make_plan(ids, E, backend=backend)
            xs = permute(x, plan, backend=backend)
            h = grouped_mm(xs, wgu.transpose(1, 2), plan.offsets, backend=backend)
            o = grouped_mm(h[:, :I].contiguous(), wd.transpose(1, 2).contiguous(), plan.offsets, backend=backend)
            return (out, unpermute(o, plan, weights, backend=backend), *grads)

        for small in (10**9, 0):
            nb.fused_rows_limit = lambda dtype, flops_per_row, small=small: small
            for dtype in (torch.float32, torch.bfloat16):
                inputs = (torch.randn(T, H, generator=g), torch.rand(T, k, generator=g).softmax(-1),
                          torch.randn(E, 2 * I, H, generator=g) / H**0.5, torch.randn(E, H, I, generator=g) / I**0.5,
                          torch.randn(E, 2 * I, generator=g), torch.randn(E, H, generator=g))
                inputs = [t.to(dtype) if i in (0, 2, 3) else t for i, t in enumerate(inputs)]
                got = run("numba", *inputs)
                want = run("torch", *[t.double() for t in inputs])
                # bfloat16 gradients round too many intermediates for the table's tolerance
                # (the torch backend's too): there the backward only has to run.
                checked = len(got) if dtype == torch.float32 else 2
                for a, b in zip(got[:checked], want[:checked]):
                    assert_close(a, b, dtype)
        print("ok")
    """
    assert run_python(code, NUMBA_BOUNDSCHECK="1", NUMBA_CACHE_DIR=str(tmp_path)).split() == ["ok"]
