"""Backend selection: "auto", the environment override, and errors that say why."""

import pytest
import torch

import moe_dispatch as md
from conftest import needs_triton
from moe_dispatch.backends import BackendUnavailable, resolve_backend, select_backend, unavailable_reason


def test_auto_on_cpu_prefers_numba_then_torch():
    expected = "numba" if unavailable_reason("numba", torch.device("cpu")) is None else "torch"
    assert select_backend("cpu", "auto") == expected


def test_auto_on_cuda_prefers_triton_then_torch():
    expected = "triton" if unavailable_reason("triton", torch.device("cuda")) is None else "torch"
    assert select_backend(torch.device("cuda"), "auto") == expected


def test_named_backend_is_returned_when_it_can_run():
    assert select_backend("cpu", "torch") == "torch"


def test_unknown_backend_lists_the_choices():
    with pytest.raises(BackendUnavailable, match="unknown backend 'fast'.*auto, torch, numba, triton"):
        select_backend("cpu", "fast")


def test_backend_that_cannot_run_says_why(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    reason = unavailable_reason("triton", torch.device("cpu"))
    if reason is None:
        pytest.skip("triton runs on this CPU")
    with pytest.raises(BackendUnavailable, match="backend='triton' cannot run on cpu: .+"):
        select_backend("cpu", "triton")


@needs_triton
def test_cpu_needs_the_interpreter(monkeypatch):
    backend = md.backends.get_backend("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "TRITON_INTERPRET=1" in backend.unavailable_reason(torch.device("cpu"))
    assert "CUDA" in backend.unavailable_reason(torch.device("meta"))


def test_environment_overrides_auto_only(monkeypatch):
    monkeypatch.setenv("MOE_DISPATCH_BACKEND", "torch")
    assert resolve_backend("cpu", "auto") == "torch"
    monkeypatch.setenv("MOE_DISPATCH_BACKEND", "nonsense")
    with pytest.raises(BackendUnavailable, match="unknown backend 'nonsense'.* .from MOE_DISPATCH_BACKEND=nonsense."):
        resolve_backend("cpu", "auto")
    assert resolve_backend("cpu", "torch") == "torch"


def test_backend_must_be_a_string():
    with pytest.raises(TypeError, match="backend must be a str"):
        md.route(torch.randn(2, 4), 1, backend=None)


def test_available_backends_lists_what_runs_here():
    names = md.available_backends()
    assert "torch" in names
    assert all(unavailable_reason(n, torch.device("cpu")) is None or torch.cuda.is_available() for n in names)
