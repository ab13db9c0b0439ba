"""warm_up: after it, a layer's calls at any number of tokens up to max_tokens compile nothing;
it leaves the layer, its gradients and torch's random state as they were."""

import copy
import types

import pytest
import torch

import moe_dispatch as md
from conftest import HAS_NUMBA, run_python, subprocess_env
from moe_dispatch.warm_up import balanced_routing


def test_balanced_routing_spreads_the_rows_evenly():
    weights, ids = balanced_routing(11, 3, 7, "cpu")
    assert ids.shape == weights.shape == (11, 3)
    assert all(len(set(row.tolist())) == 3 for row in ids)
    counts = torch.bincount(ids.flatten(), minlength=7)
    assert counts.max() - counts.min() <= 1
    torch.testing.assert_close(weights.sum(1), torch.ones(11))


@pytest.mark.parametrize("backend", ["torch", "numba", "triton"])
def test_warm_up_tokens_are_the_powers_of_two_and_what_the_backend_adds(backend):
    from moe_dispatch.backends import get_backend

    experts = md.MoE(64, 32, 16, 4).experts
    counts = get_backend(backend).warm_up_tokens(torch.empty(0, 64), experts, 4, 1000)
    assert counts == sorted(set(counts)) and 1 in counts and max(counts) <= 1000
    assert {1 << i for i in range(10)} <= set(counts)
    if backend == "triton":  # rows both divisible by 16 and not, in each bucket
        assert {(1 << i) + 1 for i in range(1, 10)} <= set(counts)


@pytest.mark.skipif(not HAS_NUMBA, reason="the numba backend's paths")
def test_numba_warm_up_tokens_take_each_side_of_its_row_limits(monkeypatch):
    import moe_dispatch.backends.numba_backend as nb

    monkeypatch.setattr(nb, "decode_setup", lambda x, experts: types.SimpleNamespace(
        rows_limit=9.5, register_rows=30, kernels=object()))
    experts = md.MoE(64, 32, 16, 4).experts
    rows = [t * 4 / 16 for t in nb.NumbaBackend().warm_up_tokens(torch.empty(0, 64), experts, 4, 4096)]
    for limit in (9.5, 30):  # the rows an expert that warm_up gives, the nearest on each side
        assert limit - 1 < max(r for r in rows if r <= limit)
        assert min(r for r in rows if r > limit) <= limit + 1


@pytest.mark.parametrize("backward", [False, True])
def test_leaves_the_layer_its_gradients_and_the_random_state_as_they_were(backend, backward):
    layer = md.MoE(32, 16, 4, 2, bias=True, backend=backend)
    before = copy.deepcopy(layer.state_dict())
    rng = torch.get_rng_state()
    seconds = md.warm_up(layer, max_tokens=4 if backend == "triton" else 64, backward=backward)  # the interpreter
    assert list(seconds) == ["MoE"] and seconds["MoE"] > 0
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in layer.parameters())
    after = layer.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode], ids=["no_grad", "inference_mode"])
def test_backward_runs_whatever_the_callers_grad_mode(mode):
    """A server's start-up may run under no_grad or inference_mode; backward=True still
    compiles the training kernels (the backward's own kernels run: a backward call is seen)."""
    layer = md.MoE(32, 16, 4, 2)
    calls = []
    layer.w_down.register_hook(lambda grad: calls.append(grad.shape))
    with mode():
        md.warm_up(layer, max_tokens=4, backward=True)
    assert calls and all(shape == layer.w_down.shape for shape in calls)
    assert all(p.grad is None for p in layer.parameters())


def test_a_layer_on_the_meta_device_is_refused():
    with torch.device("meta"):
        model = torch.nn.Sequential(md.MoE(32, 16, 4, 2))
    with pytest.raises(ValueError, match="0 holds tensors on the meta device"):
        md.warm_up(model)


def test_layers_alike_run_once():
    model = torch.nn.Sequential(md.MoE(32, 16, 4, 2), md.MoE(32, 16, 4, 2), md.MoE(32, 16, 4, 2, activation="gelu"))
    assert list(md.warm_up(model, max_tokens=8)) == ["0", "2"]


def test_bad_arguments_name_themselves():
    layer = md.MoE(32, 16, 4, 2)
    with pytest.raises(TypeError, match="model"):
        md.warm_up(layer.state_dict())
    with pytest.raises(ValueError, match="max_tokens"):
        md.warm_up(layer, max_tokens=0)
    with pytest.raises(TypeError, match="backward"):
        md.warm_up(layer, backward="yes")
    with pytest.raises(ValueError, match="no MoE layer"):
        md.warm_up(torch.nn.Linear(4, 4))


# In a fresh interpreter, so that no earlier test has loaded a kernel: the numba backend's
# kernels, each compiled (or loaded from the cache) signature counted per kernel.
COUNT_NEW_KERNELS = """
import sys
import numba
import torch
import moe_dispatch as md
from moe_dispatch.backends import get_backend, resolve_backend
from moe_dispatch.warm_up import balanced_routing

def kernel_signatures():
    found = dict()
    for name, module in list(sys.modules.items()):
        if name.startswith("moe_dispatch.kernels.numba"):
            for value in vars(module).values():
                if isinstance(value, numba.core.dispatcher.Dispatcher):
                    found[value.py_func.__qualname__] = len(value.overloads)
    return found

def new_signatures(before):
    return sorted(k for k, n in kernel_signatures().items() if n > before.get(k, 0))

def layer_of(activation):
    layer = md.MoE({hidden}, {inter}, {experts}, {top_k}, activation=activation, bias=True, dtype={dtype})
    return layer.quantize_({fmt!r}, group_size=32) if {fmt!r} else layer

def calls(layer, tokens):
    gen = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, {hidden}, dtype={dtype}, generator=gen)
    skewed = (torch.arange(tokens * {top_k}) % {top_k}).view(tokens, {top_k})  # every row on k experts
    _, balanced = balanced_routing(tokens, {top_k}, {experts}, "cpu")
    weights = torch.rand(tokens, {top_k}, generator=gen)
    with torch.no_grad():
        layer(x)
        for ids in (skewed, balanced):
            layer.routed_experts(x, weights, ids)
    if {backward}:
        out, aux = layer(x.requires_grad_(), return_aux=True)
        (out.float().square().mean() + aux.z_loss).backward()

TOKENS = [*range(1, 41), 47, 64, 100, 127, 200, 255, 300, 511, 700, {max_tokens}]

# the check can fail: a layer of another activation warmed at one token only
control = layer_of("gelu")
md.warm_up(control, max_tokens=1, backward={backward})
before = kernel_signatures()
for tokens in TOKENS:
    calls(control, tokens)
print("control:", *new_signatures(before))

layer = layer_of("swiglu")
md.warm_up(layer, max_tokens={max_tokens}, backward={backward})
before = kernel_signatures()
for tokens in TOKENS:
    calls(layer, tokens)
print("after warm_up:", *new_signatures(before))
"""

CASES = {
    # float32 experts small enough for the register tiles: decode kernels, then the tiles
    "float32": dict(dtype="torch.float32", hidden=64, inter=32, experts=8, top_k=2, fmt=None, backward=True),
    # bfloat16: pairs along K on the tiles where the CPU has AVX512-BF16
    "bfloat16": dict(dtype="torch.bfloat16", hidden=64, inter=32, experts=8, top_k=2, fmt=None, backward=True),
    # int4 codes: their own decode kernels, tiles and blocked path
    "int4": dict(dtype="torch.bfloat16", hidden=64, inter=32, experts=8, top_k=2, fmt="int4", backward=False),
}


@pytest.mark.skipif(not HAS_NUMBA, reason="the numba backend's kernels")
@pytest.mark.parametrize("case", CASES)
def test_after_warm_up_no_call_up_to_max_tokens_compiles_a_kernel(case):
    import numba

    if numba.config.DISABLE_JIT:
        pytest.skip("nothing compiles with the JIT off")
    code = COUNT_NEW_KERNELS.format(max_tokens=1024, **CASES[case])
    lines = dict(line.split(":", 1) for line in run_python(code, subprocess_env(), timeout=1200).splitlines())
    assert lines["control"].split(), "the control compiled nothing: the check cannot see a compile"
    assert lines["after warm_up"].split() == []
