"""moe_mlp forward and backward on every backend. The backend-only sections force each path the
default thresholds pick on their own: numba's decode and blocked paths, backward rows and packed
weights; Triton's plan-free decode kernels, and bf16 and fp16 through the interpreter."""

import contextlib

import pytest
import torch

import moe_dispatch as md
from cases import CASES, Case
from conftest import (FLOAT_DTYPES, HAS_CUDA, HAS_NUMBA, HAS_TRITON, NUMBA_DTYPES, TUNED_DTYPES, assert_close,
                      count_decode_steps, expert_weights, large_groups_everywhere, needs_numba, needs_triton,
                      output_and_grads, randn, random_ids, random_weights, register_tiles_everywhere,
                      skip_if_unsupported, skip_without_onednn, small_groups_everywhere)
from conftest import TRITON_DEVICE as DEVICE
from moe_dispatch import ops
from moe_dispatch.activations import ACTIVATIONS
from moe_dispatch.backends import get_backend
from moe_dispatch.backends.base import Backend
from reference import naive_moe_mlp

if HAS_NUMBA:
    import moe_dispatch.backends.numba_backend as nb
    import moe_dispatch.formats.onednn as packing

if HAS_TRITON:
    from moe_dispatch.backends import triton_tuning as configs
    from moe_dispatch.kernels.triton import decode as kdecode
    from moe_dispatch.kernels.triton import grouped_gemm as kgemm
    from moe_dispatch.kernels.triton import permute as kmove
    from moe_dispatch.kernels.triton import plan as kplan
    from moe_dispatch.kernels.triton.tiles import TileConfig

SWIGLU = ACTIVATIONS["swiglu"]


def _activations_and_layouts():
    """Each registered activation; the gated ones also with gate and up columns interleaved."""
    return [pytest.param(name, interleaved, id=name + ("-interleaved" if interleaved else ""))
            for name, entry in ACTIVATIONS.items() for interleaved in ((False, True) if entry.gated else (False,))]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_moe_mlp_forward(backend, case, dtype, gen):
    skip_if_unsupported(backend, dtype)
    ids = case.ids(gen)
    x = randn(case.tokens, case.hidden, gen=gen, dtype=dtype)
    weights = random_weights(case.tokens, case.top_k, gen)
    w_gate_up, w_down, _, _ = expert_weights(case.experts, case.hidden, case.inter, gen, dtype)
    inputs = (x, weights, ids, w_gate_up, w_down)
    before = [t.clone() for t in inputs]
    out = md.moe_mlp(*inputs, backend=backend)
    assert out.dtype == dtype and out.shape == x.shape
    assert_close(out, naive_moe_mlp(*inputs))
    assert all(torch.equal(a, b) for a, b in zip(inputs, before))


def _check_moe_mlp_grads(backend, case, activation, bias, gen, interleaved=False):
    ids = case.ids(gen)
    x = randn(case.tokens, case.hidden, gen=gen)
    weights = random_weights(case.tokens, case.top_k, gen)
    w_gate_up, w_down, b_gate_up, b_down = expert_weights(case.experts, case.hidden, case.inter, gen,
                                                          activation=activation, bias=bias)
    tensors = (x, weights, w_gate_up, w_down, b_gate_up, b_down)

    def ours(x, weights, w_gate_up, w_down, b_gate_up, b_down):
        experts = md.ExpertWeights(w_gate_up, w_down, b_gate_up, b_down, activation, interleaved)
        return md.moe_mlp(x, weights, ids, experts, backend=backend)

    def naive(x, weights, w_gate_up, w_down, b_gate_up, b_down):
        return naive_moe_mlp(x, weights, ids, w_gate_up, w_down, b_gate_up, b_down, activation, interleaved)

    out, grads = output_and_grads(ours, tensors)
    ref_out, ref_grads = output_and_grads(naive, tensors)
    assert_close(out, ref_out)
    for name, g, ref in zip(("x", "weights", "w_gate_up", "w_down", "b_gate_up", "b_down"), grads, ref_grads):
        if ref is None:
            assert g is None, name
            continue
        assert g.dtype == torch.float32, name
        assert_close(g, ref)


@pytest.mark.parametrize("case", CASES)
def test_moe_mlp_gradients(backend, case, gen):
    _check_moe_mlp_grads(backend, case, "swiglu", False, gen)


class _PassThrough(torch.overrides.TorchFunctionMode):
    """An active torch function mode: moe_mlp then goes through its custom op, as under
    torch.compile, instead of the eager autograd.Function."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def test_moe_mlp_autograd_skips_the_custom_op_only_in_plain_eager_mode(gen, monkeypatch):
    """One autograd.Function either way: over the backend in plain eager mode, over the custom
    ops (forward and backward) under a mode, as under torch.compile."""
    calls = []
    for name in ("_moe_mlp", "_moe_mlp_backward"):
        op = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *args, _op=op, _name=name: calls.append(_name) or _op(*args))
    case = CASES[1].values[0]
    x = randn(case.tokens, case.hidden, gen=gen).requires_grad_()
    w_gate_up, w_down, _, _ = expert_weights(case.experts, case.hidden, case.inter, gen)
    args = (x, random_weights(case.tokens, case.top_k, gen), case.ids(gen), w_gate_up, w_down)
    out = md.moe_mlp(*args)
    out.sum().backward()
    assert type(out.grad_fn).__name__ == "_MoEMLPBackward" and calls == []
    with _PassThrough():
        out = md.moe_mlp(*args)
        out.sum().backward()
    assert type(out.grad_fn).__name__ == "_MoEMLPBackward" and calls == ["_moe_mlp", "_moe_mlp_backward"]


# Through the custom ops (as under torch.compile) with the biases given: their optional inputs
# left out take that route in test_compile.py.
@pytest.mark.parametrize("bias,route", [(False, "eager"), (True, "eager"), (True, "custom-op")],
                         ids=["no-bias-eager", "bias-eager", "bias-custom-op"])
@pytest.mark.parametrize("activation,interleaved", _activations_and_layouts())
def test_moe_mlp_activations_and_biases(backend, activation, interleaved, bias, route, gen):
    case = CASES[1].values[0]  # odd sizes
    with _PassThrough() if route == "custom-op" else contextlib.nullcontext():
        _check_moe_mlp_grads(backend, case, activation, bias, gen, interleaved)


def test_gradcheck_float64(gen):
    # The reference backend's gradients, checked numerically; the fast backends are checked
    # against the naive loop's autograd above.
    case = CASES[1].values[0]
    ids = case.ids(gen)[:5]
    plan = md.make_plan(ids, case.experts)
    f64 = dict(dtype=torch.float64)
    x = torch.randn(5, 6, generator=gen, **f64)
    weights = random_weights(5, case.top_k, gen).double()
    w_gate_up = torch.randn(case.experts, 8, 6, generator=gen, **f64) * 0.4
    w_down = torch.randn(case.experts, 6, 4, generator=gen, **f64) * 0.4
    b_gate_up = torch.randn(case.experts, 8, generator=gen, **f64)
    b_down = torch.randn(case.experts, 6, generator=gen, **f64)
    tensors = [t.requires_grad_() for t in (x, weights, w_gate_up, w_down, b_gate_up, b_down)]

    def mlp(x, weights, w_gate_up, w_down, b_gate_up, b_down):
        return md.moe_mlp(x, weights, ids, w_gate_up, w_down, b_gate_up=b_gate_up, b_down=b_down,
                          activation="geglu", backend="torch")

    assert torch.autograd.gradcheck(mlp, tensors)
    xs = md.permute(x, plan, backend="torch").detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, w: md.grouped_mm(a, w, plan.offsets, backend="torch"),
                                    (xs, torch.randn(case.experts, 6, 3, **f64, requires_grad=True)))
    assert torch.autograd.gradcheck(lambda a, wt: md.unpermute(a, plan, wt, backend="torch"), (xs, weights))
    assert torch.autograd.gradcheck(lambda v: md.permute(v, plan, backend="torch"), (x,))


def test_relu_has_no_gradient_at_zero(backend, gen):
    """A zero (padding) token through experts without biases has h = 0 exactly; torch's relu'(0)
    is 0, so no gradient reaches it."""
    x = torch.randn(5, 8, generator=gen)
    x[0] = 0
    x.requires_grad_()
    w_gate_up, w_down = randn(4, 6, 8, gen=gen), randn(4, 8, 6, gen=gen)
    out = md.moe_mlp(x, random_weights(5, 2, gen), torch.randint(0, 4, (5, 2), generator=gen), w_gate_up, w_down,
                     activation="relu", backend=backend)
    (dx,) = torch.autograd.grad(out, x, torch.randn(5, 8, generator=gen))
    assert torch.equal(dx[0], torch.zeros(8)) and dx[1:].abs().sum() > 0


# ---- numba: each path against the reference ------------------------------------------------


PATHS = ["decode", "decode-quad", "blas", "strided", "register-tiles"]


def force_path(path, monkeypatch):
    """decode: the fused kernels; decode-quad: the same with both GEMMs reading four weight
    rows a pass (what many rows per expert get); blas: BLAS per
    expert; strided: transposed weight views, which the Numba kernels do not read: the
    blocked path, BLAS reading the views in place; register-tiles: the expert MLP on
    register tiles (float32, float64 and bfloat16 of even H and I; the others blocked)."""
    if path == "decode-quad":
        monkeypatch.setattr(nb, "QUAD_ROWS", 0)
    if path == "blas":
        large_groups_everywhere(monkeypatch)
    elif path == "register-tiles":
        register_tiles_everywhere(monkeypatch)
    else:
        small_groups_everywhere(monkeypatch)
    return "transposed" if path == "strided" else "contiguous"


def count_register_tile_steps(monkeypatch) -> list:
    """Record each call of the expert MLP on register tiles, float or bfloat16."""
    calls = []
    for name in ("expert_mlp", "expert_mlp_bf16"):
        real = getattr(nb.expert_tiles, name)
        monkeypatch.setattr(nb.expert_tiles, name, lambda *args, real=real: calls.append(1) or real(*args))
    return calls


def takes_register_tiles(dtype, w_gate_up, w_down) -> bool:
    """Whether register_tiles_everywhere sends these experts to the register tiles: float32
    and float64, and bfloat16 read as pairs where the blocked path has no AMX tiles."""
    if dtype == torch.bfloat16:
        return all(nb.is_packed(w) and not nb.on_tiles(w) for w in (w_gate_up, w_down))
    return dtype in nb.REGISTER_TILE_DTYPES


def check_moe_mlp(case, dtype, path, activation, bias, gen, monkeypatch, interleaved=False):
    layout = force_path(path, monkeypatch)
    decode_calls = count_decode_steps(monkeypatch)
    tile_calls = count_register_tile_steps(monkeypatch)
    x = torch.randn(case.tokens, case.hidden, generator=gen).to(dtype)
    ids = case.ids(gen)
    weights = random_weights(case.tokens, case.top_k, gen)
    w_gate_up, w_down, b_gate_up, b_down = expert_weights(case.experts, case.hidden, case.inter, gen, dtype, activation,
                                                          bias=bias, bias_dtype=torch.float32)
    if layout == "transposed":  # what a model storing in_features first passes: views of [E, H, W] / [E, I, H]
        w_gate_up, w_down = (w.transpose(1, 2).contiguous().transpose(1, 2) for w in (w_gate_up, w_down))
    out = md.moe_mlp(x, weights, ids, md.ExpertWeights(w_gate_up, w_down, b_gate_up, b_down, activation, interleaved),
                     backend="numba")
    expected = naive_moe_mlp(x, weights, ids, w_gate_up, w_down, b_gate_up, b_down, activation, interleaved)
    assert out.dtype == dtype
    assert_close(out, expected, dtype)
    # a transposed view of a unit dimension (H=1) is contiguous, and the fused kernels read it
    strided = layout == "transposed" and not (w_gate_up.is_contiguous() and w_down.is_contiguous())
    assert bool(decode_calls) == (path not in ("blas", "register-tiles") and not strided and case.tokens > 0)
    assert bool(tile_calls) == (path == "register-tiles" and takes_register_tiles(dtype, w_gate_up, w_down)
                                and case.tokens > 0)


@needs_numba
# the register tiles take float32 and bfloat16 (float64: test_outer_products.py); float16 goes
# blocked there
@pytest.mark.parametrize("path,dtype", [(path, dtype) for path in PATHS for dtype in NUMBA_DTYPES
                                        if path != "register-tiles" or dtype in (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("case", CASES)
def test_moe_mlp_paths_match_reference(case, dtype, path, gen, monkeypatch):
    check_moe_mlp(case, dtype, path, "swiglu", False, gen, monkeypatch)


@needs_numba
@pytest.mark.parametrize("path", ["decode", "decode-quad"])
def test_bf16_decode_with_packed_gate_up_and_an_odd_intermediate_size(path, gen, monkeypatch):
    """H even: w_gate_up is read as bf16 pairs (and, quad, its gated columns two at a time);
    I odd: w_down is not, and the last gated column has no partner."""
    check_moe_mlp(Case(tokens=17, top_k=2, experts=4, hidden=24, inter=19), torch.bfloat16, path, "swiglu",
                  False, gen, monkeypatch)


@needs_numba
def test_decode_reads_bf16_weights_at_an_odd_storage_offset(gen, monkeypatch):
    """A contiguous view one element into a flat buffer cannot be read as bf16 pairs."""
    small_groups_everywhere(monkeypatch)
    E, H, I = 4, 24, 20
    flat = (torch.randn(1 + E * 2 * I * H, generator=gen) / H**0.5).bfloat16()
    w_gate_up = flat[1:].view(E, 2 * I, H)
    _, w_down, _, _ = expert_weights(E, H, I, gen, torch.bfloat16)
    x, weights, ids = torch.randn(5, H, generator=gen).bfloat16(), random_weights(5, 2, gen), random_ids(5, 2, E, gen)
    assert_close(md.moe_mlp(x, weights, ids, w_gate_up, w_down, backend="numba"),
                 naive_moe_mlp(x, weights, ids, w_gate_up, w_down), torch.bfloat16)


@needs_numba
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("activation,interleaved", _activations_and_layouts())
def test_moe_mlp_paths_activations_and_biases(activation, interleaved, bias, path, gen, monkeypatch):
    case = CASES[1].values[0]  # odd sizes
    check_moe_mlp(case, torch.float32, path, activation, bias, gen, monkeypatch, interleaved)


@needs_numba
@pytest.mark.nojit
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_nojit_moe_mlp_paths(dtype, path, gen, monkeypatch):
    # Tiny: under NUMBA_DISABLE_JIT the kernels run as Python.
    case = CASES[0].values[0]  # T < block
    check_moe_mlp(case, dtype, path, "swiglu", True, gen, monkeypatch)


@needs_numba
def test_decode_is_chosen_by_rows_per_expert(gen, monkeypatch):
    """Default thresholds: a decode step is fused, a long prefill goes blocked."""
    decode_calls = count_decode_steps(monkeypatch)
    E, H, I = 4, 256, 128
    w_gate_up, w_down, _, _ = expert_weights(E, H, I, gen)
    limit = nb.fused_rows_limit(torch.float32, nb.mlp_flops_per_row(w_gate_up, w_down))
    for tokens, fused in ((1, True), (int(2 * limit * E), False)):  # 4x the limit's rows per expert
        decode_calls.clear()
        ids = random_ids(tokens, 2, E, gen)
        md.moe_mlp(torch.randn(tokens, H, generator=gen), random_weights(tokens, 2, gen), ids, w_gate_up, w_down,
                   backend="numba")
        assert bool(decode_calls) == fused


@needs_numba
def test_a_step_of_more_rows_than_every_expert_takes_skips_the_decode_kernel(gen, monkeypatch):
    """Beyond the fused kernels' rows per expert with all E active, the ids never reach the
    decode kernel (whose first call compiles it), and the rows just within still do."""
    E, H, I = 4, 32, 16
    w_gate_up, w_down, _, _ = expert_weights(E, H, I, gen)
    experts = md.ExpertWeights(w_gate_up, w_down)
    monkeypatch.setattr(nb, "fused_rows_limit", lambda *_, **__: 3)
    limit = nb.decode_setup(torch.empty(0, H), experts).rows_limit
    calls = []
    monkeypatch.setattr(nb.mlp, "moe_mlp_decode_ids", lambda *args: calls.append(args) or nb.mlp.NOT_DECODE)
    backend = get_backend("numba")
    for rows, reaches in ((int(limit * E), True), (int(limit * E) + 1, False)):
        calls.clear()
        ids = torch.arange(rows).remainder(E).reshape(-1, 1)
        x, weights = torch.randn(rows, H, generator=gen), torch.ones(rows, 1)
        assert backend.moe_mlp_from_ids(x, weights, ids, experts) is None and bool(calls) == reaches


@needs_numba
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


@needs_numba
@pytest.mark.parametrize("rule", [8, 8.5], ids=["int", "float"])
def test_the_decode_kernels_take_the_rows_limit_as_one_type(rule, gen, monkeypatch):
    """fused_rows_limit's constants are ints and its ratios floats; the decode kernels take
    the limit as an argument, and each type would compile them once more."""
    monkeypatch.setattr(nb, "fused_rows_limit", lambda *args: rule)
    w_gate_up, w_down, _, _ = expert_weights(4, 32, 16, gen)
    limit = nb.mlp_rows_limit(torch.randn(3, 32, generator=gen), md.ExpertWeights(w_gate_up, w_down))
    assert type(limit) is float and limit == rule


@needs_numba
def test_bfloat16_experts_widened_for_their_products_stay_fused_longer(monkeypatch):
    """Where bfloat16 products go through float32, the blocked path converts each expert's
    weights on every call: large experts too stay in the kernels up to WIDENED_BF16_LIMITS."""
    for widened in (False, True):
        monkeypatch.setattr(nb, "computes_in_float32", lambda dtype, w=widened: w or dtype == torch.float16)
        large = nb.fused_rows_limit(torch.bfloat16, 2 * 4096 * (2 * 14336 + 14336))
        assert (large == nb.WIDENED_BF16_LIMITS[0]) == widened


@needs_numba
def test_onednn_serves_float32_from_fewer_rows_than_blas():
    for dtype in (torch.float32, torch.float16):
        assert nb.FUSED_LIMITS["onednn"][dtype][0] < nb.FUSED_LIMITS["blas"][dtype][0]


@needs_numba
def test_small_batch_plans_inside_the_decode_step(gen, monkeypatch):
    """Without autograd a small batch runs plan and experts in one Numba call; a call that
    needs gradients, or brings its own plan, takes the plan's arrays."""
    calls = count_decode_steps(monkeypatch)
    E, H, I, T = 8, 16, 8, 3
    w_gate_up, w_down, _, _ = expert_weights(E, H, I, gen)
    x, weights, ids = torch.randn(T, H, generator=gen), random_weights(T, 2, gen), random_ids(T, 2, E, gen)
    expected = naive_moe_mlp(x, weights, ids, w_gate_up, w_down, None, None, "swiglu")
    for inputs, plan, entry in (
        ((x, weights), None, "moe_mlp_decode_ids"),
        ((x, weights), md.make_plan(ids, E, backend="numba"), "moe_mlp_decode"),
        ((x.clone().requires_grad_(), weights), None, "moe_mlp_decode"),
    ):
        calls.clear()
        out = md.moe_mlp(*inputs, ids, w_gate_up, w_down, plan=plan, backend="numba")
        assert calls == [entry]
        assert_close(out, expected, torch.float32)


@needs_numba
@pytest.mark.parametrize("path", ["decode", "blas", "register-tiles"])
def test_gradients_after_each_forward_path(path, matmul_library, gen, monkeypatch):
    """The h the decode kernel and the register tiles save serve the backward as the blocked
    path's does."""
    force_path(path, monkeypatch)
    case = CASES[1].values[0]
    ids = case.ids(gen)
    inputs = [
        torch.randn(case.tokens, case.hidden, generator=gen),
        random_weights(case.tokens, case.top_k, gen),
        *expert_weights(case.experts, case.hidden, case.inter, gen, bias=True),
    ]
    grads = {}
    for backend in ("numba", "torch"):
        leaves = [t.clone().requires_grad_() for t in inputs]
        x, weights, w_gate_up, w_down, b_gate_up, b_down = leaves
        out = md.moe_mlp(x, weights, ids, w_gate_up, w_down, b_gate_up=b_gate_up, b_down=b_down, backend=backend)
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)))
        grads[backend] = [t.grad for t in leaves]
    for got, want in zip(grads["numba"], grads["torch"]):
        assert_close(got, want, torch.float32)


def _backward_rows_cases():
    """Every activation and layout in float32 and in float64 (whose math is its own); the
    16-bit types, which differ only in the conversions around float32's math, with a gated
    and a plain activation (each pair is a compile of its own, about 12 s)."""
    return [pytest.param(dtype, *case.values, id=f"{str(dtype)[6:]}-{case.id}")
            for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16)
            for case in _activations_and_layouts()
            if dtype.itemsize > 2 or case.id in ("swiglu-interleaved", "gelu")]


@needs_numba
@pytest.mark.nojit
@pytest.mark.parametrize("dtype,activation,interleaved", _backward_rows_cases())
def test_backward_rows_match_the_composition_in_float64(dtype, activation, interleaved, gen):
    """The one-pass kernel between the backward's GEMMs against the base backend's torch
    composition of the same, in float64."""
    R, H, I = 37, 19, 11
    h = (3 * torch.randn(R, ACTIVATIONS[activation].width(I), generator=gen)).to(dtype)
    g, dyp = torch.randn(R, I, generator=gen).to(dtype), torch.randn(R, H, generator=gen).to(dtype)
    w_row = torch.rand(R, generator=gen).to(nb.acc_dtype(dtype))
    got = get_backend("numba").moe_mlp_backward_rows(h, g, dyp, w_row, activation, interleaved)
    want = Backend().moe_mlp_backward_rows(h.double(), g.double(), dyp.double(), w_row.double(), activation,
                                           interleaved)
    for name, out, ref in zip(("a", "d_row", "dh", "do"), got, want):
        assert out.dtype == (w_row.dtype if name == "d_row" else dtype), name
        assert_close(out, ref, dtype)


@needs_numba
def test_backward_rows_refuse_disagreeing_shapes(gen):
    h, g, dyp, w_row = torch.randn(6, 8), torch.randn(6, 4), torch.randn(6, 5), torch.rand(6)
    backend = get_backend("numba")
    for args in ((h[:5], g, dyp, w_row), (h, g, dyp[:5], w_row), (h, g, dyp, w_row[:5]), (h[:, :6], g, dyp, w_row)):
        with pytest.raises(ValueError, match="must agree"):
            backend.moe_mlp_backward_rows(*args, "swiglu")


# ---- numba: weights packed for oneDNN (MOE_DISPATCH_PACK_WEIGHTS=1) ---------------------------


@pytest.fixture
def packing_on(monkeypatch):
    skip_without_onednn()
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
    return x, weights, ids, *expert_weights(case.experts, case.hidden, case.inter, gen, dtype, bias=bias,
                                            bias_dtype=torch.float32)


def check_against_reference(x, weights, ids, w_gate_up, w_down, b_gate_up, b_down):
    out = md.moe_mlp(x, weights, ids, w_gate_up, w_down, b_gate_up=b_gate_up, b_down=b_down, backend="numba")
    assert_close(out, naive_moe_mlp(x, weights, ids, w_gate_up, w_down, b_gate_up, b_down, "swiglu"), x.dtype)
    return out


@needs_numba
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_packed_weights_match_reference_and_follow_changes(dtype, packing_on, monkeypatch, gen):
    skip_without_onednn(dtype)
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


@needs_numba
def test_float32_weights_mkl_multiplies_are_not_packed(packing_on, monkeypatch, gen):
    """Without AVX-512 MKL takes float32 products of up to BLAS_MAX_COLUMNS from oneDNN, packed
    or not: a packed copy of those weights would only cost memory."""
    import moe_dispatch.backends.cpu_matmul as cm

    monkeypatch.setenv("MOE_DISPATCH_CPU_MATMUL", "auto")
    monkeypatch.setattr(cm, "onednn_float32", lambda: True)
    monkeypatch.setattr(packing, "onednn_float32", lambda: True)
    monkeypatch.setattr(cm, "mkl_without_avx512", lambda: True)
    monkeypatch.setattr(cm, "BLAS_MAX_COLUMNS", 8)
    narrow, wide = torch.randn(2, 8, 4, generator=gen), torch.randn(2, 9, 4, generator=gen)
    assert packing.packed_experts(narrow, saving_for_backward=False) is None
    assert packing.packed_experts(wide, saving_for_backward=False) is not None


@needs_numba
def test_views_made_per_call_share_their_parameter_s_packed_copies(packing_on, gen):
    """A model storing [E, H, W] passes a fresh transposed view on every call."""
    skip_without_onednn(torch.bfloat16)
    x, weights, ids, w_gate_up, w_down, _, _ = moe_mlp_case(gen, torch.bfloat16, bias=False)
    stored = torch.nn.Parameter(w_gate_up.transpose(1, 2).contiguous(), requires_grad=False)
    with torch.no_grad():
        for _ in range(3):
            check_against_reference(x, weights, ids, stored.transpose(1, 2), w_down, None, None)
    assert len(packing_on) == 2 * len(ids.unique())
    del stored
    assert len(packing._CACHE) == 1  # w_down's; the parameter's went with it


@needs_numba
def test_no_packing_for_weights_being_trained(packing_on, gen):
    skip_without_onednn(torch.bfloat16)
    x, weights, ids, w_gate_up, w_down, b_gate_up, b_down = moe_mlp_case(gen, torch.bfloat16)
    w_gate_up.requires_grad_()
    x.requires_grad_()
    check_against_reference(x, weights, ids, w_gate_up, w_down, b_gate_up, b_down).float().sum().backward()
    assert len(packing_on) == len(ids.unique())  # w_down only: frozen
    assert w_gate_up.grad is not None and x.grad is not None
    with torch.no_grad():
        check_against_reference(x, weights, ids, w_gate_up, w_down, b_gate_up, b_down)
    assert len(packing_on) == 2 * len(ids.unique())  # inference packs both


@needs_numba
def test_weights_made_in_inference_mode_are_not_packed(packing_on, gen):
    """They carry no version counter that could tell a packed copy it is stale."""
    x, weights, ids, w_gate_up, w_down, _, _ = moe_mlp_case(gen, torch.bfloat16, bias=False)
    with torch.inference_mode():
        w_gate_up, w_down = w_gate_up.clone(), w_down.clone()
        check_against_reference(x, weights, ids, w_gate_up, w_down, None, None)
        w_gate_up.mul_(-1)
        check_against_reference(x, weights, ids, w_gate_up, w_down, None, None)
    assert packing_on == []


@needs_numba
def test_packing_is_off_by_default_and_its_setting_is_checked(packing_on, monkeypatch, gen):
    monkeypatch.delenv("MOE_DISPATCH_PACK_WEIGHTS")
    check_against_reference(*moe_mlp_case(gen, torch.bfloat16))
    assert packing_on == []
    monkeypatch.setenv("MOE_DISPATCH_PACK_WEIGHTS", "yes")
    with pytest.raises(ValueError, match="MOE_DISPATCH_PACK_WEIGHTS must be 0 or 1; got 'yes'"):
        md.moe_mlp(*moe_mlp_case(gen, torch.bfloat16)[:5], backend="numba")


# ---- triton: the decode forward, two kernels and no plan -------------------------------------

DECODE_CASES = [
    # one token, one choice
    pytest.param(1, 1, 3, "swiglu", False, id="T=1-k=1"),
    # a full tile of tokens, sizes that are multiples of nothing, more experts than slots
    pytest.param(16, 3, 61, "swiglu", True, id="T=16-odd"),
    # every expert chosen by many tokens
    pytest.param(11, 4, 4, "gelu", True, id="k=E"),
    pytest.param(5, 2, 7, "relu", False, id="relu"),
]


# K-steps longer than K, partial column tiles, tiles wider than N
DECODE_TILES = [TileConfig(16, 16, 16), TileConfig(16, 32, 32), TileConfig(16, 16, 64)] if HAS_TRITON else []


@pytest.fixture
def only_decode_kernels(monkeypatch):
    """The plan, grouped GEMM and combine launchers raise: what runs is the decode path."""
    def refuse(*args, **kwargs):
        raise AssertionError("the decode forward took the planned path")

    for module, name in ((kplan, "make_plan"), (kgemm, "grouped_gemm"), (kmove, "combine")):
        monkeypatch.setattr(module, name, refuse)


def _decode_inputs(tokens, top_k, experts, activation, bias, dtype, gen, hidden=37, inter=21):
    ids = random_ids(tokens, top_k, experts, gen)
    if tokens > 2:
        ids[2, -1] = ids[2, 0]  # a token that chose one expert twice: both weights count
    w_gate_up, w_down, *b = expert_weights(experts, hidden, inter, gen, dtype, activation, bias=True, bias_scale=0.5,
                                           device=DEVICE)
    # strided weights: every other expert of a twice-as-long stack, rows padded
    w_gate_up = torch.cat([w_gate_up, w_gate_up], 2).repeat_interleave(2, 0)[::2, :, :hidden]
    assert not w_gate_up.is_contiguous()
    return (randn(tokens, hidden, gen=gen, dtype=dtype, device=DEVICE), random_weights(tokens, top_k, gen).to(DEVICE),
            ids.to(torch.int32).to(DEVICE), w_gate_up, w_down, *(b if bias else [None, None]))


@needs_triton
@pytest.mark.usefixtures("garbage_memory", "only_decode_kernels")
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)  # bf16 through the interpreter's float32 path
@pytest.mark.parametrize("tokens,top_k,experts,activation,bias", DECODE_CASES)
def test_decode_forward_matches_the_reference(tokens, top_k, experts, activation, bias, dtype, gen):
    x, weights, ids, w_gate_up, w_down, b_gate_up, b_down = inputs = _decode_inputs(
        tokens, top_k, experts, activation, bias, dtype, gen)
    copies = [t.clone() for t in inputs if t is not None]
    out = md.moe_mlp(x, weights, ids, w_gate_up, w_down, activation=activation, b_gate_up=b_gate_up,
                     b_down=b_down, backend="triton")
    assert out.dtype == dtype and out.shape == x.shape
    assert_close(out, naive_moe_mlp(*(t.cpu() if t is not None else None for t in inputs), activation))
    assert all(torch.equal(a, b) for a, b in zip(copies, (t for t in inputs if t is not None)))


# H and I of odd sizes; and multiples of 16 and 32, which some K-steps divide (no K mask, the
# down kernel's last K-block ending at K)
@needs_triton
@pytest.mark.parametrize("hidden,inter", [(37, 21), (32, 48)])
@pytest.mark.parametrize("config", DECODE_TILES)
def test_decode_kernels_with_every_tile_shape(config, hidden, inter, gen):
    x, weights, ids, w_gate_up, w_down, b_gate_up, b_down = inputs = _decode_inputs(
        9, 2, 5, "swiglu", True, torch.float32, gen, hidden, inter)
    act, routes, ok = kdecode.decode_up(x, ids, weights, w_gate_up.transpose(1, 2), b_gate_up, SWIGLU,
                                          (1, w_down.shape[2]), config)
    out = kdecode.decode_down(act, ids, routes, w_down.transpose(1, 2), b_down, config)
    assert ok.tolist() == [True]
    assert_close(out, naive_moe_mlp(*(t.cpu() for t in inputs)))


@needs_triton
def test_decode_kernels_skip_and_report_bad_ids(gen):
    # the kernels' own guard (the ops raise before them on CPU): a bad id's slot adds nothing
    x, weights, ids, w_gate_up, w_down, _, _ = _decode_inputs(4, 2, 5, "swiglu", False, torch.float32, gen)
    bad = ids.clone()
    bad[1, 0], bad[3, 1] = 5, -1
    config = TileConfig(16, 16, 16)
    act, routes, ok = kdecode.decode_up(x, bad, weights, w_gate_up.transpose(1, 2), None, SWIGLU,
                                          (1, w_down.shape[2]), config)
    out = kdecode.decode_down(act, bad, routes, w_down.transpose(1, 2), None, config)
    kept = weights.clone()
    kept[1, 0] = kept[3, 1] = 0
    assert ok.tolist() == [False]
    assert_close(out, naive_moe_mlp(*(t.cpu() for t in (x, kept, ids, w_gate_up, w_down))))


@needs_triton
def test_decode_up_writes_each_experts_tile_once(gen):
    # the owners (first slots of valid ids) flagged; each owner's tile of act holds its expert's
    # activations for the tokens that chose it; the routing weights of a token on the expert
    # summed, 0 for the tokens that did not choose it
    x, weights, ids, w_gate_up, w_down, _, _ = _decode_inputs(7, 3, 5, "swiglu", False, torch.float32, gen)
    ids[4, 1] = 9  # a bad id owns nothing
    x = torch.cat([x, torch.full_like(x, float("nan"))])[:7]  # NaNs past x: a read of them shows
    act, routes, ok = kdecode.decode_up(x, ids, weights, w_gate_up.transpose(1, 2), None, SWIGLU,
                                        (1, w_down.shape[2]), TileConfig(16, 16, 16))
    flat = ids.reshape(-1).tolist()
    owners = [s for s, e in enumerate(flat) if 0 <= e < 5 and e not in flat[:s]]
    assert ok.tolist() == [False]
    assert routes.owner.tolist() == [int(s in owners) for s in range(len(flat))]
    tile = act.view(len(flat), kdecode.MAX_TOKENS, -1)
    for slot in owners:
        gate, up = (x.double() @ w_gate_up[flat[slot]].double().T).chunk(2, dim=-1)
        chose = (ids == flat[slot]).to(torch.float64)  # [T, k]
        tokens = chose.sum(1).nonzero().squeeze(1)
        assert_close(tile[slot, tokens], (torch.nn.functional.silu(gate) * up)[tokens])
        assert tile[slot].isfinite().all()
        expected_weights = torch.zeros(kdecode.MAX_TOKENS, dtype=torch.float64)
        expected_weights[:7] = (weights.double() * chose).sum(1)
        assert_close(routes.weights[slot], expected_weights)


@needs_triton
def test_decode_down_stays_inside_its_inputs_whatever_the_routes_say(gen):
    # routes that are not the up kernel's: any nonzero flag an owner, bad experts. act and
    # w_down are views into NaN-filled memory, and the flags sit before entries that would
    # count: any read outside them shows.
    slots, tokens, experts, inter, hidden = 6, 3, 4, 20, 24
    rows = slots * kdecode.MAX_TOKENS
    act = torch.full((rows + 32, inter), float("nan"), device=DEVICE)[16:16 + rows]
    act.copy_(randn(rows, inter, gen=gen, device=DEVICE))
    w_down = torch.full((experts + 3, hidden, inter), float("nan"), device=DEVICE)[1:1 + experts]
    w_down.copy_(randn(experts, hidden, inter, gen=gen, device=DEVICE))
    ids = torch.tensor([[0, 3], [5, 1], [2, -1]], device=DEVICE)
    owner = torch.tensor([1, 7, 1, 0, -3, 1] + [1] * 10, dtype=torch.int32, device=DEVICE)[:slots]
    weights = torch.rand(slots, kdecode.MAX_TOKENS, generator=gen).to(DEVICE)
    out = kdecode.decode_down(act, ids, kdecode.Routes(owner, weights), w_down.transpose(1, 2), None,
                              TileConfig(16, 16, 16))
    expected = torch.zeros(tokens, hidden, dtype=torch.float64)
    for slot, expert in enumerate(ids.reshape(-1).tolist()):
        if owner[slot] != 0 and 0 <= expert < experts:
            for token in range(tokens):
                row = act[slot * kdecode.MAX_TOKENS + token].double()
                expected[token] += weights[slot, token].double() * (row @ w_down[expert].double().T)
    assert_close(out, expected)


@needs_triton
@pytest.mark.usefixtures("only_decode_kernels")
def test_decode_forward_raises_on_bad_ids_before_any_kernel_on_cpu():
    if HAS_CUDA:
        pytest.skip("CPU tensors only")
    x, w_gate_up, w_down = torch.randn(2, 8), torch.randn(4, 16, 8), torch.randn(4, 8, 8)
    with pytest.raises(ValueError, match="expert id 4"):
        md.moe_mlp(x, torch.ones(2, 2), torch.tensor([[0, 4], [1, 2]]), w_gate_up, w_down, backend="triton")


@needs_triton
def test_more_tokens_than_a_tile_take_the_planned_path(gen):
    tokens = kdecode.MAX_TOKENS + 1
    x, weights, ids, w_gate_up, w_down, _, _ = inputs = _decode_inputs(tokens, 2, 5, "swiglu", False,
                                                                       torch.float32, gen)
    backend = md.backends.get_backend("triton")
    assert backend.moe_mlp_from_ids(x, weights, ids, md.ExpertWeights(w_gate_up, w_down)) is None
    out = md.moe_mlp(x, weights, ids, w_gate_up, w_down, backend="triton")
    assert_close(out, naive_moe_mlp(*(t.cpu() for t in inputs[:5])))



# ---- triton: bf16 under the interpreter, fp16 gradients --------------------------------------



@needs_triton
@pytest.mark.parametrize("case", [c for c in CASES if c.id in ("odd-sizes", "empty-experts", "T=1")])
def test_bf16_moe_mlp_forward(case, gen):
    # On CPU the kernels multiply bf16 through float32 (the interpreter cannot do a bf16 tl.dot)
    ids = case.ids(gen).to(DEVICE)
    x = randn(case.tokens, case.hidden, gen=gen, dtype=torch.bfloat16, device=DEVICE)
    weights = random_weights(case.tokens, case.top_k, gen).to(DEVICE)
    w_gate_up, w_down, _, _ = expert_weights(case.experts, case.hidden, case.inter, gen, torch.bfloat16, device=DEVICE)
    out = md.moe_mlp(x, weights, ids, w_gate_up, w_down, backend="triton")
    assert out.dtype == torch.bfloat16
    assert_close(out, naive_moe_mlp(*(t.cpu() for t in (x, weights, ids, w_gate_up, w_down))))


def _moe_mlp_grads(dtype, activation, bias, gen, tokens=19, top_k=2, experts=5, hidden=29, inter=17):
    """(ours, reference) outputs and gradients of x, weights, both weight tensors and biases."""
    ids = random_ids(tokens, top_k, experts, gen).to(DEVICE)
    w_gate_up, w_down, _, _ = expert_weights(experts, hidden, inter, gen, dtype, activation, device=DEVICE)
    tensors = [randn(tokens, hidden, gen=gen, dtype=dtype, device=DEVICE),
               random_weights(tokens, top_k, gen).to(DEVICE), w_gate_up, w_down]
    if bias:
        tensors += [randn(experts, n, gen=gen, dtype=dtype, scale=0.5, device=DEVICE)
                    for n in (w_gate_up.shape[1], hidden)]
    dy = randn(tokens, hidden, gen=gen, dtype=dtype, device=DEVICE)

    def run(fn, device):
        leaves = [t.detach().to(device).requires_grad_() for t in tensors]
        out = fn(leaves, ids.to(device))
        out.backward(dy.to(device, out.dtype))
        return [out.detach()] + [t.grad for t in leaves]

    def ours(leaves, ids):
        b = leaves[4:] + [None, None]
        return md.moe_mlp(leaves[0], leaves[1], ids, leaves[2], leaves[3], activation=activation,
                          b_gate_up=b[0], b_down=b[1], backend="triton")

    def naive(leaves, ids):
        b = leaves[4:] + [None, None]
        return naive_moe_mlp(leaves[0], leaves[1], ids, leaves[2], leaves[3], b[0], b[1], activation)

    return run(ours, DEVICE), run(naive, "cpu")


@needs_triton
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_fp16_training_step(activation, gen):
    ours, ref = _moe_mlp_grads(torch.float16, activation, True, gen)
    for name, got, expected in zip(("out", "x", "weights", "w_gate_up", "w_down", "b_gate_up", "b_down"), ours, ref):
        assert_close(got, expected, dtype=torch.float16)


# ---- triton on a GPU -------------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("activation,bias", [("swiglu", True), ("gelu", False)])
@pytest.mark.usefixtures("pinned_configs")
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_gpu_training_step(dtype, activation, bias, gen):
    ours, ref = _moe_mlp_grads(dtype, activation, bias, gen)
    for got, expected in zip(ours, ref):
        assert got.dtype == dtype or got.dtype == torch.float32
        if dtype != torch.bfloat16:
            assert_close(got, expected, dtype=dtype)
            continue
        # bfloat16 keeps 8 bits, and a weight gradient's element sums rows' terms that may cancel:
        # its error is a share of the terms, not of the element (one element of 2465 was 0.047
        # off an exact 0.094 on an H200). The bound is the norm's: every element within 8 units
        # of bfloat16's last place of the largest (the same step under the interpreter: at most 5.7
        # units over 8 seeds).
        error = (got.double().cpu() - expected.double().cpu()).abs().max()
        assert error <= 8 * 2**-8 * expected.abs().max(), (error, expected.abs().max())



@needs_triton
@pytest.mark.usefixtures("pinned_configs")
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_gpu_decode_picks_split_k_and_matches(gen):
    # one token, K = 1024: the default config splits K so the few row tiles fill the GPU
    tokens, top_k, experts, hidden, inter = 1, 2, 8, 1024, 256
    assert configs.gemm_candidates(2, experts, hidden, inter, True, torch.bfloat16, DEVICE)[0].split_k > 1
    ids = random_ids(tokens, top_k, experts, gen).cuda()
    x = randn(tokens, hidden, gen=gen, dtype=torch.bfloat16, device=DEVICE)
    weights = random_weights(tokens, top_k, gen).cuda()
    w_gate_up, w_down, _, _ = expert_weights(experts, hidden, inter, gen, torch.bfloat16, device=DEVICE)
    plan = md.make_plan(ids, experts, backend="triton")  # with a plan: the grouped GEMMs, not the decode kernels
    out = md.moe_mlp(x, weights, ids, w_gate_up, w_down, plan=plan, backend="triton")
    assert_close(out, naive_moe_mlp(*(t.cpu() for t in (x, weights, ids, w_gate_up, w_down))))


@needs_triton
@pytest.mark.parametrize("dtype", TUNED_DTYPES)
@pytest.mark.usefixtures("pinned_configs")
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_gpu_every_decode_candidate_matches(dtype, gen, request):
    # 16 tokens, a duplicate choice, strided weights, biases
    if dtype == torch.float32:
        request.getfixturevalue("fma_float32")
    x, weights, ids, w_gate_up, w_down, b_gate_up, b_down = inputs = _decode_inputs(
        16, 4, 12, "swiglu", True, dtype, gen, hidden=384, inter=200)
    expected = naive_moe_mlp(*(t.cpu() for t in inputs))
    budget = configs.shared_memory_budget(DEVICE)
    fma = configs.uses_fma(dtype, DEVICE)
    for config in configs.decode_tiles(200, 12, True, dtype.itemsize, budget, 132, fma):
        act, routes, ok = kdecode.decode_up(x, ids, weights, w_gate_up.transpose(1, 2), b_gate_up, SWIGLU,
                                            (1, w_down.shape[2]), config)
        out = kdecode.decode_down(act, ids, routes, w_down.transpose(1, 2), b_down, config)
        try:
            assert ok.tolist() == [True]
            assert_close(out, expected)
        except AssertionError as exc:
            raise AssertionError(f"{config}: {exc}") from exc


@needs_numba
@pytest.mark.parametrize("path", ["decode", "blas"])
def test_a_token_that_picks_one_expert_twice_gets_both_rows(path, gen, monkeypatch):
    """Duplicate ids in a row: the expert holds two rows of one token, and both add into its
    output (the blocked path once added an expert's rows in parallel, one task per row)."""
    force_path(path, monkeypatch)
    num_tokens, hidden = 96, 40
    x = torch.randn(num_tokens, hidden, generator=gen)
    ids = torch.stack([torch.arange(num_tokens) % 3] * 2 + [torch.arange(num_tokens) % 5], dim=1)
    weights = random_weights(num_tokens, 3, gen)
    w_gate_up, w_down, _, _ = expert_weights(5, hidden, 24, gen)
    for _ in range(3):  # a race shows on some runs only
        out = md.moe_mlp(x, weights, ids, w_gate_up, w_down, backend="numba")
        assert_close(out, naive_moe_mlp(x, weights, ids, w_gate_up, w_down))
