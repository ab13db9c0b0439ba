"""permute, unpermute, grouped_mm and moe_mlp against the naive float64 loop, forward and backward."""

import contextlib

import pytest
import torch

import moe_dispatch as md
from cases import CASES
from conftest import assert_close, random_weights, skip_if_unsupported
from reference import naive_grouped_mm, naive_moe_mlp, naive_permute, naive_unpermute

DTYPES = [pytest.param(d, id=str(d).split(".")[1]) for d in (torch.float32, torch.float16, torch.bfloat16)]
ACTIVATIONS = ["swiglu", "geglu", "gelu", "relu", "silu"]


def _randn(*shape, gen, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=gen) * scale).to(dtype)


def _expert_weights(case, gen, dtype, activation="swiglu", bias=False):
    width = (2 if activation in ("swiglu", "geglu") else 1) * case.inter
    w_gate_up = _randn(case.experts, width, case.hidden, gen=gen, dtype=dtype, scale=case.hidden ** -0.5)
    w_down = _randn(case.experts, case.hidden, case.inter, gen=gen, dtype=dtype, scale=case.inter ** -0.5)
    if not bias:
        return w_gate_up, w_down, None, None
    return w_gate_up, w_down, _randn(case.experts, width, gen=gen, dtype=dtype), _randn(
        case.experts, case.hidden, gen=gen, dtype=dtype
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_permute_is_exact(backend, case, dtype, gen):
    ids = case.ids(gen)
    x = _randn(case.tokens, case.hidden, gen=gen, dtype=dtype)
    x_before = x.clone()
    plan = md.make_plan(ids, case.experts)
    xs = md.permute(x, plan, backend=backend)
    assert xs.dtype == dtype and xs.shape == (case.tokens * case.top_k, case.hidden)
    assert torch.equal(xs, naive_permute(x, plan.token_of_row.tolist()))
    assert torch.equal(x, x_before)


@pytest.mark.parametrize("weighted", [True, False], ids=["weighted", "sum"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_unpermute(backend, case, dtype, weighted, gen):
    ids = case.ids(gen)
    plan = md.make_plan(ids, case.experts)
    ys = _randn(case.tokens * case.top_k, case.hidden, gen=gen, dtype=dtype)
    weights = random_weights(case.tokens, case.top_k, gen) if weighted else None
    y = md.unpermute(ys, plan, weights, backend=backend)
    assert y.dtype == dtype and y.shape == (case.tokens, case.hidden)
    assert_close(y, naive_unpermute(ys, plan.row_of_slot.tolist(), weights))


def test_permute_then_unsum_round_trips(backend, gen):
    # Each token appears k times; summing its rows back gives k * x exactly (small ints).
    ids = torch.randint(0, 5, (10, 3), generator=gen)
    x = torch.randint(-8, 8, (10, 7), generator=gen).float()
    plan = md.make_plan(ids, 5)
    assert torch.equal(md.unpermute(md.permute(x, plan, backend=backend), plan, backend=backend), 3 * x)


@pytest.mark.parametrize("dtype, half_ulp", [(torch.bfloat16, 2.0**-8), (torch.float16, 2.0**-11)], ids=str)
def test_unpermute_sums_in_float32_and_rounds_once(backend, dtype, half_ulp):
    # 1 + h + h with h half an ulp of 1: rounding after each addition would stay at 1
    plan = md.make_plan(torch.tensor([[0, 1, 2]]), 3)
    ys = torch.tensor([[1.0], [half_ulp], [half_ulp]]).to(dtype)
    assert md.unpermute(ys, plan, backend=backend).item() == 1 + 2 * half_ulp


def test_relu_has_no_gradient_at_zero(backend, gen):
    """A zero (padding) token through experts without biases has h = 0 exactly; torch's relu'(0)
    is 0, so no gradient reaches it."""
    x = torch.randn(5, 8, generator=gen)
    x[0] = 0
    x.requires_grad_()
    w_gate_up, w_down = _randn(4, 6, 8, gen=gen), _randn(4, 8, 6, gen=gen)
    out = md.moe_mlp(x, random_weights(5, 2, gen), torch.randint(0, 4, (5, 2), generator=gen), w_gate_up, w_down,
                     activation="relu", backend=backend)
    (dx,) = torch.autograd.grad(out, x, torch.randn(5, 8, generator=gen))
    assert torch.equal(dx[0], torch.zeros(8)) and dx[1:].abs().sum() > 0


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_grouped_mm(backend, case, dtype, layout, gen):
    skip_if_unsupported(backend, dtype)
    plan = md.make_plan(case.ids(gen), case.experts)
    xs = _randn(plan.num_rows, case.hidden, gen=gen, dtype=dtype)
    if layout == "contiguous":
        w = _randn(case.experts, case.hidden, case.inter, gen=gen, dtype=dtype, scale=case.hidden ** -0.5)
    else:  # nn.Linear layout [E, N, K] passed as a transposed view, never copied
        w = _randn(case.experts, case.inter, case.hidden, gen=gen, dtype=dtype, scale=case.hidden ** -0.5)
        w = w.transpose(1, 2)
    ys = md.grouped_mm(xs, w, plan.offsets, backend=backend)
    assert ys.dtype == dtype and ys.shape == (plan.num_rows, case.inter)
    assert_close(ys, naive_grouped_mm(xs, w, plan.offsets.tolist()))


def test_grouped_mm_int64_offsets_and_sliced_weights(backend, gen):
    # offsets as int64 (torch's cumsum default), and w a non-contiguous slice of a bigger tensor
    offsets = torch.tensor([0, 5, 5, 12], dtype=torch.int64)
    xs = _randn(12, 16, gen=gen)
    w = _randn(3, 16, 40, gen=gen, scale=0.25)[:, :, ::2]
    assert_close(md.grouped_mm(xs, w, offsets, backend=backend), naive_grouped_mm(xs, w, offsets.tolist()))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_moe_mlp_forward(backend, case, dtype, gen):
    skip_if_unsupported(backend, dtype)
    ids = case.ids(gen)
    x = _randn(case.tokens, case.hidden, gen=gen, dtype=dtype)
    weights = random_weights(case.tokens, case.top_k, gen)
    w_gate_up, w_down, _, _ = _expert_weights(case, gen, dtype)
    inputs = (x, weights, ids, w_gate_up, w_down)
    before = [t.clone() for t in inputs]
    out = md.moe_mlp(*inputs, backend=backend)
    assert out.dtype == dtype and out.shape == x.shape
    assert_close(out, naive_moe_mlp(*inputs))
    assert all(torch.equal(a, b) for a, b in zip(inputs, before))


def _grads(fn, tensors):
    tensors = [t.detach().clone().requires_grad_() if t is not None else None for t in tensors]
    out = fn(*tensors)
    if out.grad_fn is not None:  # the naive loop's empty batch is not connected to its inputs
        dy = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
        out.backward(dy.to(out.dtype))
    # an input that did not reach the output has a zero gradient
    return out, [None if t is None else t.grad if t.grad is not None else torch.zeros_like(t) for t in tensors]


def _check_moe_mlp_grads(backend, case, activation, bias, gen):
    ids = case.ids(gen)
    x = _randn(case.tokens, case.hidden, gen=gen)
    weights = random_weights(case.tokens, case.top_k, gen)
    w_gate_up, w_down, b_gate_up, b_down = _expert_weights(case, gen, torch.float32, activation, bias)
    tensors = (x, weights, w_gate_up, w_down, b_gate_up, b_down)

    def ours(x, weights, w_gate_up, w_down, b_gate_up, b_down):
        return md.moe_mlp(x, weights, ids, w_gate_up, w_down, activation=activation,
                          b_gate_up=b_gate_up, b_down=b_down, backend=backend)

    def naive(x, weights, w_gate_up, w_down, b_gate_up, b_down):
        return naive_moe_mlp(x, weights, ids, w_gate_up, w_down, b_gate_up, b_down, activation)

    out, grads = _grads(ours, tensors)
    ref_out, ref_grads = _grads(naive, tensors)
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


def test_moe_mlp_autograd_skips_the_custom_op_only_in_plain_eager_mode(gen):
    case = CASES[1].values[0]
    x = _randn(case.tokens, case.hidden, gen=gen).requires_grad_()
    w_gate_up, w_down, _, _ = _expert_weights(case, gen, torch.float32, "swiglu", False)
    args = (x, random_weights(case.tokens, case.top_k, gen), case.ids(gen), w_gate_up, w_down)
    assert type(md.moe_mlp(*args).grad_fn).__name__ == "_EagerMoEMLPBackward"
    with _PassThrough():
        assert "moe_dispatch_moe_mlp" in type(md.moe_mlp(*args).grad_fn).__name__


@pytest.mark.parametrize("route", ["eager", "custom-op"])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_moe_mlp_activations_and_biases(backend, activation, bias, route, gen):
    case = CASES[1].values[0]  # odd sizes
    with _PassThrough() if route == "custom-op" else contextlib.nullcontext():
        _check_moe_mlp_grads(backend, case, activation, bias, gen)


@pytest.mark.parametrize("case", CASES)
def test_grouped_mm_and_unpermute_gradients(backend, case, gen):
    plan = md.make_plan(case.ids(gen), case.experts)
    xs = _randn(plan.num_rows, case.hidden, gen=gen)
    w = _randn(case.experts, case.inter, case.hidden, gen=gen, scale=case.hidden ** -0.5)
    weights = random_weights(case.tokens, case.top_k, gen)
    x = _randn(case.tokens, case.hidden, gen=gen)
    offsets, rows = plan.offsets.tolist(), plan.row_of_slot.tolist()

    def ours(x, xs, w, weights):
        ys = md.grouped_mm(md.permute(x, plan, backend=backend) + xs, w.transpose(1, 2), plan.offsets, backend=backend)
        return md.unpermute(ys, plan, weights, backend=backend)

    def naive(x, xs, w, weights):
        xs_total = naive_permute(x.double(), plan.token_of_row.tolist()) + xs.double()
        ys = naive_grouped_mm(xs_total, w.transpose(1, 2), offsets)
        return naive_unpermute(ys, rows, weights)

    out, grads = _grads(ours, (x, xs, w, weights))
    ref_out, ref_grads = _grads(naive, (x, xs, w, weights))
    assert_close(out, ref_out)
    for g, ref in zip(grads, ref_grads):
        assert_close(g, ref)


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
