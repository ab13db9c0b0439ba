"""Backend registry and the one rule that resolves "auto".

A backend module is imported only when first asked for, so a missing optional
dependency (numba, triton) costs nothing until that backend is requested.
"""

from __future__ import annotations

import importlib
import os
from functools import lru_cache
from typing import Optional, Union

import torch

from .base import Backend

# name -> "module:Class"; the order of preference for "auto" is in select_backend.
_REGISTRY = {
    "torch": "moe_dispatch.backends.torch_backend:TorchBackend",
    "triton": "moe_dispatch.backends.triton_backend:TritonBackend",
    "numba": "moe_dispatch.backends.numba_backend:NumbaBackend",
}
BACKEND_NAMES = ("torch", "numba", "triton")
ENV_VAR = "MOE_DISPATCH_BACKEND"


class BackendUnavailable(RuntimeError):
    """A backend was requested that cannot serve this call; the message says why."""


@lru_cache(maxsize=None)
def _load(name: str) -> Union[Backend, str]:
    """The backend instance, or why it cannot be loaded."""
    if name not in _REGISTRY:
        return f"the {name} backend is not part of this build of moe-dispatch"
    module_name, cls_name = _REGISTRY[name].split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        return f"the {name} backend could not be imported ({exc})"
    return getattr(module, cls_name)()


def unavailable_reason(name: str, device: torch.device) -> Optional[str]:
    """None if backend `name` can run on `device`, else the reason it cannot."""
    if name not in BACKEND_NAMES:
        return f"unknown backend {name!r}; choose one of {', '.join(('auto',) + BACKEND_NAMES)}"
    loaded = _load(name)
    if isinstance(loaded, str):
        return loaded
    return loaded.unavailable_reason(torch.device(device))


def select_backend(device: Union[torch.device, str], requested: str = "auto") -> str:
    """The backend that serves a call on `device`.

    "auto" picks triton for CUDA tensors and numba for CPU tensors, and torch when the
    fast backend cannot run. A named backend that cannot run raises BackendUnavailable
    saying why.
    """
    device = torch.device(device)
    if requested == "auto":
        preferred = ("triton",) if device.type == "cuda" else ("numba",)
        for name in preferred + ("torch",):
            if unavailable_reason(name, device) is None:
                return name
        raise BackendUnavailable(f"no backend can run on device {device}")
    reason = unavailable_reason(requested, device)
    if reason is not None:
        raise BackendUnavailable(f"backend={requested!r} cannot run on {device}: {reason}")
    return requested


@torch.compiler.assume_constant_result
def resolve_backend(device: Union[torch.device, str], backend: str) -> str:
    """select_backend, with MOE_DISPATCH_BACKEND standing in for "auto" (a constant to torch.compile)."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    chosen = backend
    if backend == "auto":
        chosen = os.environ.get(ENV_VAR, "auto") or "auto"
    try:
        return select_backend(device, chosen)
    except BackendUnavailable as exc:
        if chosen != backend:  # say where the name came from: the caller did not pass it
            raise BackendUnavailable(f"{exc} (from {ENV_VAR}={chosen})") from None
        raise


def get_backend(name: str) -> Backend:
    loaded = _load(name)
    if isinstance(loaded, str):
        raise BackendUnavailable(loaded)
    return loaded


def available_backends() -> list[str]:
    """The backends that can run on at least one device of this machine."""
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    return [n for n in BACKEND_NAMES if any(unavailable_reason(n, d) is None for d in devices)]
