"""A layer's decode step in one call: the router, the top-k routing and the routed experts
(ops.routed_decode_step, the numba backend's routed_decode, kernels/numba/routing.py)."""

import numpy as np
import pytest
import torch

import moe_dispatch as md
from conftest import assert_close, count_decode_steps, large_groups_everywhere, needs_numba
from moe_dispatch import ops
from moe_dispatch.backends.numba_backend import as_array
from moe_dispatch.kernels.numba.routing import Routing, route_rows
from reference import naive_moe_mlp, naive_route

# x's dtype: what the kernel reads (16-bit floats as their bits), the dtype of its weights
ROUTE_DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64]


def _routing(router, scoring="softmax", renormalize=True, bias=None, n_groups=None, topk_groups=None, scale=1.0):
    bias = np.zeros(0, dtype=np.float32) if bias is None else bias.numpy()
    return Routing(router.numpy(), bias, scoring == "sigmoid", n_groups or 0, topk_groups or 0, renormalize, scale)


ROUTINGS = [
    pytest.param(dict(), id="softmax"),
    pytest.param(dict(renormalize=False, scale=2.5), id="softmax-raw-scaled"),
    pytest.param(dict(n_groups=4, topk_groups=2), id="softmax-groups"),
    pytest.param(dict(scoring="sigmoid", renormalize=False), id="sigmoid"),
    pytest.param(dict(scoring="sigmoid", bias=True, n_groups=4, topk_groups=2, scale=2.5), id="deepseek"),
    pytest.param(dict(scoring="sigmoid", bias=True, n_groups=12, topk_groups=4), id="groups-of-one"),
]


@pytest.mark.nojit
@pytest.mark.parametrize("dtype", ROUTE_DTYPES, ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("options", ROUTINGS)
def test_route_rows_matches_route(dtype, options, gen):
    T, H, E, k = 5, 24, 12, 3
    x = torch.randn(T, H, generator=gen).to(dtype)
    router = torch.randn(E, H, generator=gen)
    options = dict(options, bias=torch.randn(E, generator=gen) * 0.1 if options.get("bias") else None)
    weights = np.full((T, k), np.nan, dtype=np.float64 if dtype == torch.float64 else np.float32)
    ids = np.full((T, k), -1, dtype=np.int64)
    x_before = x.clone()
    route_rows(as_array(x), _routing(router, **options), weights, ids)
    assert torch.equal(x, x_before)
    logits = x.double().float().double() @ router.double().T
    expected_weights, expected_ids = naive_route(logits, k, **options)
    assert torch.equal(torch.from_numpy(ids), expected_ids)
    torch.testing.assert_close(torch.from_numpy(weights).double(), expected_weights, rtol=1e-5, atol=1e-6)


@pytest.mark.nojit
def test_route_rows_ranks_ties_and_nans_like_topk():
    """Equal logits go to the lower id, a NaN before every number; every id is chosen once."""
    router = torch.eye(6)
    weights, ids = np.empty((1, 4), dtype=np.float32), np.empty((1, 4), dtype=np.int64)
    x = np.array([[0.5, 2.0, 0.5, 2.0, -1.0, 0.5]], dtype=np.float32)
    route_rows(x, _routing(router), weights, ids)
    assert ids.tolist() == [[1, 3, 0, 2]] and np.isclose(weights.sum(), 1.0)
    route_rows(x, _routing(router, scoring="sigmoid", n_groups=3, topk_groups=2), weights, ids)
    assert ids.tolist() == [[1, 3, 0, 2]]  # groups (0, 1) and (2, 3) score alike, ahead of (4, 5)
    router[1, 1] = router[4, 4] = float("nan")  # logits 1 and 4 are NaN for any x
    route_rows(np.array([[0.0, 1.0, 1.0, 0.0, 1.0, 3.0]], dtype=np.float32), _routing(router), weights, ids)
    assert ids.tolist() == [[1, 4, 5, 2]] and np.isnan(weights).all()


def _layer(dtype, fmt=None, **kwargs):
    torch.manual_seed(0)
    args = dict(hidden_size=64, intermediate_size=32, num_experts=8, top_k=2, backend="numba")
    layer = md.MoE(**dict(args, **kwargs)).to(dtype)
    return layer.quantize_(fmt) if fmt else layer


def _general_path(layer, x):
    """The layer's output through route and moe_mlp, as without the one-call step."""
    flat = x.reshape(-1, layer.hidden_size)
    _, weights, ids = layer.routing(flat)
    out = md.moe_mlp(flat, weights, ids, layer.experts, backend="numba")
    if layer.shared_experts is not None:
        out = out + layer.shared_experts(flat)
    return out.view(x.shape), weights, ids


@needs_numba
@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param(dict(), id="mixtral-like"),
        pytest.param(dict(renormalize=False, routed_scaling=1.5, n_shared_experts=1), id="olmoe-like-scaled-shared"),
        pytest.param(dict(activation="gelu", bias=True, top_k=3), id="plain-gelu-bias"),
        pytest.param(dict(scoring="sigmoid", n_groups=4, topk_groups=2, routed_scaling=2.5, n_shared_experts=1),
                     id="deepseek-like"),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_a_layer_decode_step_is_one_call_and_matches_the_general_path(dtype, kwargs, gen, monkeypatch):
    layer = _layer(dtype, **kwargs)
    if layer.scoring == "sigmoid":
        layer.expert_bias.copy_(torch.randn(8, generator=gen) * 0.05)
    calls = count_decode_steps(monkeypatch)
    for tokens in (1, 3):
        x = torch.randn(2, tokens, 64, generator=gen).to(dtype)
        with torch.no_grad():
            out = layer(x)
            assert calls == ["moe_mlp_decode_ids"]  # the routing in the experts' call
            expected, weights, ids = _general_path(layer, x)
        calls.clear()
        assert out.shape == x.shape and out.dtype == dtype
        assert_close(out, expected.double())
        naive = naive_moe_mlp(x.reshape(-1, 64), weights, ids, layer.w_gate_up.detach(), layer.w_down.detach(),
                              layer.b_gate_up, layer.b_down, layer.activation)
        if layer.shared_experts is not None:
            naive = naive + layer.shared_experts(x.reshape(-1, 64)).double()
        assert_close(out.reshape(-1, 64), naive, dtype)


@needs_numba
def test_quantized_experts_take_the_one_call_step(gen, monkeypatch):
    layer = _layer(torch.bfloat16, "int8")
    calls = count_decode_steps(monkeypatch, "quantized_kernels")
    x = torch.randn(2, 64, generator=gen).bfloat16()
    with torch.no_grad():
        out = layer(x)
        assert calls == ["moe_mlp_decode_ids"]
        expected, _, _ = _general_path(layer, x)
    assert_close(out, expected.double())


@needs_numba
@pytest.mark.parametrize("case", ["aux", "grad", "many-tokens"])
def test_other_steps_route_the_general_way(case, gen, monkeypatch):
    """The aux losses, autograd and batches past a decode step's slots leave the routing to
    route."""
    import moe_dispatch.backends.numba_backend as nb

    layer = _layer(torch.float32)
    routed = []
    original = nb.RoutedDecode.__call__
    monkeypatch.setattr(nb.RoutedDecode, "__call__", lambda *a: routed.append(original(*a)) or routed[-1])
    x = torch.randn(2100 if case == "many-tokens" else 2, 64, generator=gen)  # 4200 slots: not a decode step
    with torch.set_grad_enabled(case == "grad"):
        out = layer(x, return_aux=case == "aux")
        out = out[0] if case == "aux" else out
        expected, _, _ = _general_path(layer, x)
    assert all(r is None for r in routed)
    assert_close(out.detach(), expected.detach().double())


@needs_numba
def test_a_step_the_decode_kernels_decline_routes_again(gen, monkeypatch):
    """Where the routed rows crowd too few experts for the decode kernels, the layer's general
    path serves the step."""
    import moe_dispatch.backends.numba_backend as nb

    layer = _layer(torch.float32)
    monkeypatch.setattr(nb.mlp, "moe_mlp_decode_ids", lambda *args: nb.mlp.NOT_DECODE)
    x = torch.randn(3, 64, generator=gen)
    with torch.no_grad():
        step = ops.routed_decode_step(x, layer._router_float32(), 2, layer.experts, backend="numba",
                                      **layer._route_options())
        assert step(x) is None
        out = layer(x)
    monkeypatch.undo()
    with torch.no_grad():
        expected, _, _ = _general_path(layer, x)
    assert_close(out, expected.double())


@needs_numba
def test_a_layer_prepares_its_decode_step_once_until_it_or_a_setting_changes(gen, monkeypatch):
    """The step the backend prepares (the router's and the routing's arrays, the experts' setup)
    is kept while the layer's tensors and settings stay as they are; a write, a new setting or a
    new row limit gets a step that follows it."""
    import moe_dispatch.backends.numba_backend as nb

    monkeypatch.delenv("MOE_DISPATCH_BACKEND", raising=False)
    layer = _layer(torch.float32, scoring="sigmoid", n_groups=4, topk_groups=2, backend="auto")
    prepared, calls = [], count_decode_steps(monkeypatch)
    original = nb.NumbaBackend.routed_decode
    monkeypatch.setattr(nb.NumbaBackend, "routed_decode", lambda *a, **kw: prepared.append(1) or original(*a, **kw))
    x = torch.randn(3, 64, generator=gen)

    def step_matches_the_general_path():
        calls.clear()
        with torch.no_grad():
            out = layer(x)
            took_the_step = calls == ["moe_mlp_decode_ids"]
            expected, _, _ = _general_path(layer, x)
        assert_close(out, expected.double())
        return took_the_step

    assert step_matches_the_general_path() and step_matches_the_general_path() and len(prepared) == 1
    changes = [lambda: layer.expert_bias.add_(torch.randn(8, generator=gen)), lambda: layer.router.weight.mul_(-1),
               lambda: layer.w_down.mul_(2), lambda: setattr(layer, "top_k", 3),
               lambda: setattr(layer, "routed_scaling", 2.0), lambda: setattr(layer, "topk_groups", 3)]
    for count, change in enumerate(changes, 2):
        with torch.no_grad():
            change()
        assert step_matches_the_general_path() and len(prepared) == count
    monkeypatch.setenv("MOE_DISPATCH_BACKEND", "torch")  # what "auto" picks
    assert not step_matches_the_general_path()
    monkeypatch.delenv("MOE_DISPATCH_BACKEND")
    assert step_matches_the_general_path() and len(prepared) == len(changes) + 2
    large_groups_everywhere(monkeypatch)  # a setting of the backend's: the kept step declines
    assert not step_matches_the_general_path() and len(prepared) == len(changes) + 2


@needs_numba
def test_activations_of_another_dtype_than_the_experts_are_refused():
    layer = _layer(torch.bfloat16)
    with torch.no_grad(), pytest.raises(TypeError, match="w_gate_up"):
        layer(torch.randn(1, 64))
