"""The activation registry: each entry's definition against torch's own functions and the models'
code, its derivative against autograd of its definition, and each fast backend's jit functions
against the entry, at values where their branches meet (tests/test_moe_mlp.py runs every entry
through every backend's moe_mlp)."""

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from conftest import HAS_TRITON, TRITON_DEVICE, assert_close, needs_numba, needs_triton
from moe_dispatch import activations
from moe_dispatch.activations import ACTIVATIONS, IDENTITY, Activation


def _gpt_oss_gate(gate, up, alpha=1.702, limit=7.0):
    # GptOssExperts._apply_gate of transformers, on split columns
    gate = gate.clamp(min=None, max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


# What each registered activation computes, written independently of the registry.
INDEPENDENT = {
    "silu": lambda g, u: F.silu(g),
    "gelu": lambda g, u: F.gelu(g),
    "relu": lambda g, u: F.relu(g),
    "swiglu": lambda g, u: F.silu(g) * u,
    "geglu": lambda g, u: F.gelu(g) * u,
    "clamped_swiglu": _gpt_oss_gate,
}


def _points(dtype=torch.float64):
    """(gate, up): random values over [-12, 12], and the values where branches meet: 0, and the
    clamped SwiGLU's bounds exactly."""
    gen = torch.Generator().manual_seed(0)
    special = torch.tensor([0.0, 7.0, -7.0, 6.999, 7.001, -7.001, 1e-3, -1e-3, 30.0, -30.0])
    gate = torch.cat([torch.rand(200, generator=gen) * 24 - 12, special, special.flip(0)])
    up = torch.cat([torch.rand(200, generator=gen) * 24 - 12, special.flip(0), special])
    return gate.to(dtype), up.to(dtype)


def test_every_registered_activation_has_an_independent_definition_here():
    assert set(ACTIVATIONS) == set(INDEPENDENT)


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_definition_matches_an_independent_one(name):
    gate, up = _points()
    entry = ACTIVATIONS[name]
    got = entry.forward(gate, up if entry.gated else None)
    assert_close(got, INDEPENDENT[name](gate, up))


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_derivative_matches_autograd_of_the_definition(name):
    gate, up = (t.requires_grad_() for t in _points())
    entry = ACTIVATIONS[name]
    y = entry.forward(gate, up if entry.gated else None)
    d_gate, d_up = torch.autograd.grad(y.sum(), (gate, up), allow_unused=True)
    got_gate, got_up = entry.derivative(gate.detach(), up.detach() if entry.gated else None)
    assert_close(got_gate, d_gate)
    if entry.gated:
        assert_close(got_up, d_up)
    else:
        assert got_up is None and d_up is None


@pytest.mark.parametrize("name", [n for n, a in ACTIVATIONS.items() if a.gated])
@pytest.mark.parametrize("interleaved", [False, True], ids=["concatenated", "interleaved"])
def test_gate_and_up_columns(name, interleaved):
    h = torch.randn(5, 8, dtype=torch.float64)
    gate, up = (h[:, 0::2], h[:, 1::2]) if interleaved else (h[:, :4], h[:, 4:])
    assert_close(activations.activate(h, name, interleaved), INDEPENDENT[name](gate, up))
    grad = torch.randn(5, 4, dtype=torch.float64)
    leaf = h.clone().requires_grad_()
    expected, = torch.autograd.grad(activations.activate(leaf, name, interleaved), leaf, grad)
    assert_close(activations.activate_backward(h, grad, name, interleaved), expected)
    step, shift = activations.gate_up_columns(name, interleaved, 4)
    assert [(i * step, i * step + shift) for i in range(4)] == (
        [(2 * i, 2 * i + 1) for i in range(4)] if interleaved else [(i, 4 + i) for i in range(4)])


def test_codes_are_one_numbering_and_names_resolve():
    codes = [a.code for a in ACTIVATIONS.values()]
    assert len(set(codes)) == len(codes) and IDENTITY not in codes
    assert activations.get("swiglu") is ACTIVATIONS["swiglu"] is activations.get(ACTIVATIONS["swiglu"])
    with pytest.raises(ValueError, match="activation must be one of 'silu'.*got 'tanh'"):
        activations.get("tanh")
    with pytest.raises(ValueError, match="exists already"):
        activations.register(Activation("swiglu", 99, True, INDEPENDENT["swiglu"], ACTIVATIONS["swiglu"].derivative))
    with pytest.raises(ValueError, match="exists already"):
        activations.register(Activation("new", ACTIVATIONS["relu"].code, False, F.relu, ACTIVATIONS["relu"].derivative))
    assert [ACTIVATIONS[n].width(10) for n in ("swiglu", "relu")] == [20, 10]


# ---- each fast backend's jit functions, against the entry ---------------------------------------


def _expected(name, gate, up):
    """(act, d act / d gate, d act / d up) by the entry, in float64; d/d up 0 for a plain one."""
    entry = ACTIVATIONS[name]
    g, u = gate.double(), up.double()
    d_gate, d_up = entry.derivative(g, u if entry.gated else None)
    return entry.forward(g, u if entry.gated else None), d_gate, torch.zeros_like(g) if d_up is None else d_up


if HAS_TRITON:
    import triton
    import triton.language as tl

    from moe_dispatch.kernels.triton import activations as triton_activations

    @triton.jit
    def _activation_kernel(gate_ptr, up_ptr, act_ptr, d_gate_ptr, d_up_ptr, forward_ptr, n,
                           ACT: tl.constexpr, P0: tl.constexpr, P1: tl.constexpr, BLOCK: tl.constexpr):
        offsets = tl.arange(0, BLOCK)
        ok = offsets < n
        gate = tl.load(gate_ptr + offsets, mask=ok, other=0.0)
        up = tl.load(up_ptr + offsets, mask=ok, other=0.0)
        act, d_gate, d_up = triton_activations.activate_grad(gate, up, ACT, P0, P1)
        tl.store(act_ptr + offsets, act, mask=ok)
        tl.store(d_gate_ptr + offsets, d_gate, mask=ok)
        tl.store(d_up_ptr + offsets, d_up, mask=ok)
        tl.store(forward_ptr + offsets, triton_activations.activate(gate, up, ACT, P0, P1), mask=ok)


@needs_triton
@pytest.mark.parametrize("name", ACTIVATIONS)
def test_triton_jit_functions_match_the_entry(name):
    gate, up = (t.float().to(TRITON_DEVICE) for t in _points())
    outputs = [torch.empty_like(gate) for _ in range(4)]
    entry = ACTIVATIONS[name]
    _activation_kernel[(1,)](gate, up, *outputs, gate.numel(), ACT=entry.code, P0=entry.params[0],
                             P1=entry.params[1], BLOCK=triton.next_power_of_2(gate.numel()))
    act, d_gate, d_up = _expected(name, gate.cpu(), up.cpu())
    for got, want in zip(outputs, (act, d_gate, d_up, act)):
        assert_close(got, want)


@needs_numba
@pytest.mark.nojit
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("name", ACTIVATIONS)
def test_numba_jit_functions_match_the_entry(name, dtype):
    from numba import njit

    from moe_dispatch.kernels.numba import activations as numba_activations

    @njit
    def evaluate(gate, up, act, out):
        for i in range(gate.shape[0]):
            out[0, i], out[1, i], out[2, i] = numba_activations.activate_and_grad(gate[i], up[i], act)
            out[3, i] = numba_activations.activate(gate[i], up[i], act)

    gate, up = (t.numpy().astype(dtype) for t in _points())
    out = np.empty((4, gate.shape[0]), dtype=dtype)
    evaluate(gate, up, numba_activations.fused(ACTIVATIONS[name], (1, 0)), out)
    act, d_gate, d_up = _expected(name, torch.from_numpy(gate), torch.from_numpy(up))
    for got, want in zip(out, (act, d_gate, d_up, act)):
        assert_close(torch.from_numpy(got), want)


def test_the_gated_form_of_a_plain_activation():
    assert activations.glu("silu") is ACTIVATIONS["swiglu"] and activations.glu("gelu") is ACTIVATIONS["geglu"]
    assert activations.glu("relu") is None and activations.glu(None) is None


def test_an_unregistered_activation_is_refused():
    # the kernels branch on the registered codes only: another object would run another function
    stranger = Activation("swiglu", ACTIVATIONS["swiglu"].code, True, INDEPENDENT["geglu"],
                          ACTIVATIONS["geglu"].derivative)
    with pytest.raises(ValueError, match="activation must be one of"):
        activations.get(stranger)


@needs_numba
def test_the_numba_kernels_refuse_an_activation_registered_after_them(monkeypatch):
    from moe_dispatch.kernels.numba import activations as numba_activations

    late = Activation("late", 1 + max(a.code for a in ACTIVATIONS.values()), False, F.relu,
                      ACTIVATIONS["relu"].derivative)
    monkeypatch.setitem(ACTIVATIONS, "late", late)
    with pytest.raises(ValueError, match=r"no branch for Activation\('late'\), registered after"):
        numba_activations.fused(late, (1, 0))
