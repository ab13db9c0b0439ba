"""warm_up: run a model's experts at every batch size class it may meet, before it serves.

The Numba kernels compile on their first call for each dtype, format, activation and path,
and the Triton kernels compile and tune for each power of two of rows: a server's first
prefill, or its first batch past some size, would otherwise wait seconds to minutes for them.
warm_up makes those calls ahead, on inputs of its own, and leaves the model as it was.
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable, Iterator, NamedTuple, Optional

import torch
from torch import nn

from . import validation as check
from .backends import get_backend, resolve_backend
from .experts import ExpertWeights
from .integrations.transformers import expert_weights, fused_experts, is_experts_module
from .layers import MoE

Tensor = torch.Tensor


class _Runner(NamedTuple):
    """One layer's call at a number of tokens, and what token_counts needs to know of it."""

    call: Callable[[int], None]
    experts: Optional[ExpertWeights]  # None where the module's experts are not one ExpertWeights
    top_k: int
    dtype: torch.dtype
    device: torch.device
    backend: str


def warm_up(model: nn.Module, *, max_tokens: int = 8192, backward: bool = False) -> dict[str, float]:
    """Run every distinct MoE layer and transformers experts module of `model` (or `model`
    itself) at each number of tokens up to max_tokens that may take another kernel (its
    backend's warm_up_tokens: powers of two, and on the numba backend each side of its limits
    of rows per expert between paths).
    backward: each layer's forward and backward under autograd too (training), whatever the
    caller's grad mode, the gradients returned to warm_up, not left in any .grad.

    The kernels compiled go to the compile caches as any call's do; the model's parameters,
    gradients and torch's random state stay as they were. Layers alike (the same class,
    configuration and tensors' shapes, dtypes and devices) run once. Returns the seconds each
    layer's run took, by its name in `model`."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check.positive_int("max_tokens", max_tokens)
    if not isinstance(backward, bool):
        raise TypeError(f"backward must be a bool, got {backward!r}")
    found = [(name, module) for name, module in model.named_modules()
             if isinstance(module, MoE) or is_experts_module(module)]
    if not found:
        raise ValueError(f"model ({type(model).__name__}) holds no MoE layer and no transformers experts module")
    seconds, seen = {}, set()
    for name, module in found:
        kind = _kind(module)
        if kind in seen:
            continue
        seen.add(kind)
        if any(t.is_meta for t in (*module.parameters(), *module.buffers())):
            raise ValueError(f"{name or type(module).__name__} holds tensors on the meta device: warm_up runs "
                             "real calls, so load the model's weights first")
        start = time.perf_counter()
        runner = (_layer_runner(module, backward) if isinstance(module, MoE)
                  else _experts_runner(module, _float_dtype(model), _top_k(model), backward))
        for tokens in token_counts(runner, max_tokens):
            runner.call(tokens)
        if runner.device.type == "cuda":
            torch.cuda.synchronize(runner.device)
        seconds[name or type(module).__name__] = time.perf_counter() - start
    return seconds


def token_counts(runner: _Runner, max_tokens: int) -> list[int]:
    """The tokens at which the runner's layer runs: its backend's warm_up_tokens."""
    hidden = runner.experts.hidden_size if runner.experts is not None else 0
    x = torch.empty(0, hidden, dtype=runner.dtype, device=runner.device)
    backend = get_backend(resolve_backend(runner.device, runner.backend))
    return backend.warm_up_tokens(x, runner.experts, runner.top_k, max_tokens)


def _layer_runner(layer: MoE, backward: bool) -> _Runner:
    """The layer's forward at T tokens (its own routing), and its routed experts on routing
    that gives every expert the same rows (each side of a row limit exactly)."""
    weight = layer.router.weight
    dtype, device = weight.dtype, weight.device
    gen = torch.Generator(device).manual_seed(0)

    def call(tokens: int) -> None:
        x = torch.randn(tokens, layer.hidden_size, dtype=dtype, device=device, generator=gen)
        weights, ids = balanced_routing(tokens, layer.top_k, layer.num_experts, device)
        with torch.no_grad():
            layer(x)
            layer.routed_experts(x, weights, ids)
        if not backward:
            return
        with _autograd():
            x, weights = x.clone().requires_grad_(), weights.clone().requires_grad_()
            out, aux = layer(x, return_aux=True)
            _gradients(gen, out, [x, *layer.parameters()], aux.load_balancing_loss + aux.z_loss)
            _gradients(gen, layer.routed_experts(x, weights, ids), [x, weights, *layer.parameters()])

    return _Runner(call, layer.experts, layer.top_k, dtype, device, layer.backend)


def _experts_runner(experts: nn.Module, dtype: torch.dtype, top_k: int, backward: bool) -> _Runner:
    """A transformers experts module's forward (hidden_states, top_k_index, top_k_weights) on
    balanced routing, in the model's dtype, through whatever experts implementation the model
    has set."""
    w1 = expert_weights(experts, dtype)[0]
    num_experts, device = w1.shape[0], w1.device
    gen = torch.Generator(device).manual_seed(0)

    def call(tokens: int) -> None:
        x = torch.randn(tokens, w1.shape[-1], dtype=dtype, device=device, generator=gen)
        weights, ids = balanced_routing(tokens, top_k, num_experts, device)
        weights = weights.to(dtype)
        with torch.no_grad():
            experts(x, ids, weights)
        if not backward:
            return
        with _autograd():
            x, weights = x.clone().requires_grad_(), weights.clone().requires_grad_()
            _gradients(gen, experts(x, ids, weights), [x, weights, *experts.parameters()])

    return _Runner(call, fused_experts(experts, dtype), top_k, dtype, device, "auto")


@contextlib.contextmanager
def _autograd() -> Iterator[None]:
    """Autograd on, whatever the caller's mode (a server may call warm_up under no_grad or
    inference_mode): backward=True asks for the training kernels."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


def balanced_routing(tokens: int, top_k: int, num_experts: int, device) -> tuple[Tensor, Tensor]:
    """Weights [T, k] (float32, each row summing to one) and ids [T, k] that send token t to
    experts t*k, t*k + 1, ... modulo E: distinct in each row, and each expert's rows differ by
    at most one."""
    slots = torch.arange(tokens * top_k, device=device).view(tokens, top_k)
    weights = torch.full((tokens, top_k), 1.0 / top_k, device=device)
    return weights, slots % num_experts


def _gradients(gen: torch.Generator, out: Tensor, inputs: list, extra: Optional[Tensor] = None) -> None:
    """The backward of out (a random cotangent) and of extra, to those of `inputs` that need a
    gradient, returned here rather than accumulated into their .grad."""
    outputs = [out] if extra is None else [out, extra]
    cotangents = [torch.randn(out.shape, dtype=out.dtype, device=out.device, generator=gen)]
    if extra is not None:
        cotangents.append(torch.ones_like(extra))
    torch.autograd.grad(outputs, [t for t in inputs if t.requires_grad], cotangents, allow_unused=True)


def _float_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's activations: its first floating-point parameter's."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.get_default_dtype())


def _top_k(model: nn.Module) -> int:
    """The experts each token takes in a transformers model: its config's num_experts_per_tok,
    else the top_k of its first module that has one (a router's)."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    top_k = getattr(config, "num_experts_per_tok", None)
    if top_k is None:
        top_k = next((m.top_k for m in model.modules() if isinstance(getattr(m, "top_k", None), int)), None)
    if top_k is None:
        raise ValueError(f"model ({type(model).__name__}) has no config.num_experts_per_tok nor a router's top_k: "
                         "pass the whole transformers model")
    return top_k


def _kind(module: nn.Module) -> tuple:
    """What decides a layer's kernels and paths: its class, configuration and tensors' shapes,
    dtypes and devices."""
    tensors = [(name, tuple(t.shape), t.dtype, t.device, t.requires_grad)
               for name, t in (*module.named_parameters(), *module.named_buffers())]
    return type(module), repr(module), tuple(tensors)
