"""MoE: a drop-in Mixture-of-Experts feed-forward layer."""

from __future__ import annotations

import math
import os
import weakref
from typing import NamedTuple, Optional

import torch
from torch import nn

from . import activations, formats
from . import validation as check
from .backends import BACKEND_NAMES
from .backends import ENV_VAR as BACKEND_ENV_VAR
from .experts import ExpertWeights, kept, stamp
from .formats import FORMATS
from .formats.quantized import QuantizedWeight, quantize
from .ops import eager_direct, make_plan, moe_mlp, routed_decode_step
from .plan import DispatchPlan
from .routing import route

Tensor = torch.Tensor
# Each MoE layer's last ExpertWeights, under what it was made from (MoE.experts); beside the
# layer rather than in it, so that copies and pickles of the layer carry none.
_LAYER_EXPERTS: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()
# Each layer's router weight widened to float32, likewise (MoE._router_float32).
_ROUTER_FLOAT32: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()
# Each layer's decode step as its backend prepared it, likewise (MoE._decode_step).
_DECODE_STEPS: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _registered(module: nn.Module, name: str):
    """module.<name>, read from nn.Module's registries where it is a parameter, buffer or
    submodule: its attribute lookup costs about a microsecond a name, and a decode step reads
    a dozen for kernels of a few tens of microseconds."""
    for registry in (module._parameters, module._buffers, module._modules):
        if name in registry:
            return registry[name]
    return getattr(module, name)


class MoEAux(NamedTuple):
    """What a trainer needs besides the output.

    load_balancing_loss: Switch Transformer's E * sum_e f_e * P_e (1.0 when perfectly balanced),
        f_e the share of routed slots that went to expert e, P_e its mean router probability.
    z_loss: mean over tokens of logsumexp(logits)^2 (ST-MoE), keeps router logits small.
    counts: [E] int32 tokens routed to each expert in this batch.
    """

    load_balancing_loss: Tensor
    z_loss: Tensor
    counts: Tensor


class SharedExperts(nn.Module):
    """Always-on experts (DeepSeek): a dense SwiGLU MLP of width n_shared_experts * I."""

    def __init__(self, hidden_size: int, width: int, *, device=None, dtype=None):
        super().__init__()
        self.gate_up = nn.Linear(hidden_size, 2 * width, bias=False, device=device, dtype=dtype)
        self.down = nn.Linear(width, hidden_size, bias=False, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(nn.functional.silu(gate) * up)


class FrozenQuantized(nn.Module):
    """A quantized expert weight as a layer holds it: its codes, scales and zero points are
    buffers (state_dict saves and loads them; .to(device) moves them), never cast by
    .to(dtype) or .half(): they keep their own types, and the weight multiplies activations
    of whatever dtype the layer has. Its precision ("weight-only" or "w8a8") is the weight's, like
    its format not saved in the state dict."""

    def __init__(self, weight: QuantizedWeight):
        super().__init__()
        self.format, self.block, self.precision = weight.format, weight.block, weight.precision
        self.register_buffer("codes", weight.codes)
        self.register_buffer("scales", weight.scales)
        self.register_buffer("zeros", weight.zeros)

    def weight(self, dtype: torch.dtype) -> QuantizedWeight:
        """The weight, for activations of dtype (views of the buffers, no copy)."""
        return FORMATS[self.format](self.codes, self.scales, self.block, zeros=self.zeros, dtype=dtype,
                                    precision=self.precision)

    @property
    def shape(self) -> torch.Size:
        return self.weight(torch.float32).shape

    def tensors(self) -> list[Tensor]:
        return [_registered(self, name) for name in ("codes", "scales", "zeros")]

    def _apply(self, fn, recurse=True):
        for name, t in self._buffers.items():
            if t is not None:
                moved = fn(t)
                self._buffers[name] = moved if moved.dtype == t.dtype else t.to(moved.device)
        return self

    def extra_repr(self) -> str:
        return f"format={self.format!r}, shape={tuple(self.shape)}, block={self.block}, precision={self.precision!r}"


class MoE(nn.Module):
    """A Mixture-of-Experts feed-forward layer: route, dispatch, expert MLPs, combine.

    Input [..., hidden_size] gives output of the same shape and dtype.

    The router is an nn.Linear without bias whose logits are computed in float32 (where no
    gradient reaches a lower-precision router, its float32 copy is kept between calls). With
    scoring="sigmoid" the buffer `expert_bias` shifts which experts are chosen (DeepSeek-V3's
    aux-loss-free balancing) without changing the weights; move it toward balance with
    `update_expert_bias(aux.counts)` after each optimizer step.

    Expert weights use transformers 5's layout: w_gate_up [E, 2I, H] (gate rows first; [E, I, H]
    for the non-gated activations) and w_down [E, H, I]; b_gate_up / b_down exist when bias=True.
    """

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        num_experts: int,
        top_k: int,
        *,
        activation: str = "swiglu",
        scoring: str = "softmax",
        renormalize: bool = True,
        n_groups: Optional[int] = None,
        topk_groups: Optional[int] = None,
        routed_scaling: float = 1.0,
        n_shared_experts: int = 0,
        bias: bool = False,
        backend: str = "auto",
        device=None,
        dtype=None,
    ):
        super().__init__()
        for name, value in (("hidden_size", hidden_size), ("intermediate_size", intermediate_size),
                            ("num_experts", num_experts), ("top_k", top_k)):
            check.positive_int(name, value)
        check.positive_int("n_shared_experts", n_shared_experts, minimum=0)
        if top_k > num_experts:
            raise ValueError(f"top_k={top_k} exceeds num_experts={num_experts}")
        entry = activations.get(activation)
        check.choice("scoring", scoring, ("softmax", "sigmoid"))
        check.routing_groups(num_experts, top_k, n_groups, topk_groups)
        check.choice("backend", backend, ("auto", *BACKEND_NAMES))
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.num_experts, self.top_k = num_experts, top_k
        self.activation, self.scoring, self.renormalize = entry.name, scoring, renormalize
        self.n_groups, self.topk_groups = n_groups, topk_groups
        self.routed_scaling = routed_scaling
        self.backend = backend

        factory = dict(device=device, dtype=dtype)
        width = entry.width(intermediate_size)
        self.router = nn.Linear(hidden_size, num_experts, bias=False, **factory)
        self.register_buffer("expert_bias", torch.zeros(num_experts, device=device, dtype=torch.float32))
        self.w_gate_up = nn.Parameter(torch.empty(num_experts, width, hidden_size, **factory))
        self.w_down = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size, **factory))
        self.b_gate_up = nn.Parameter(torch.empty(num_experts, width, **factory)) if bias else None
        self.b_down = nn.Parameter(torch.empty(num_experts, hidden_size, **factory)) if bias else None
        self.shared_experts = (
            SharedExperts(hidden_size, n_shared_experts * intermediate_size, **factory)
            if n_shared_experts else None
        )
        self.reset_parameters()

    @classmethod
    def from_experts(cls, experts: ExpertWeights, top_k: int, **options) -> "MoE":
        """A layer whose experts are `experts` (their dense values become its parameters, shared,
        not copied), with a new router; options: MoE's keyword arguments but activation and bias,
        which the experts give. Interleaved gate and up rows are not a layout the layer keeps."""
        if experts.interleaved:
            raise ValueError("MoE keeps gate rows, then up rows; experts.interleaved must be False "
                             "(experts.gate_then_up() reorders them)")
        b_gate_up, b_down = experts.b_gate_up, experts.b_down
        device, dtype = experts.w_gate_up.device, experts.w_gate_up.dtype
        # Built on the meta device: the constructor's own float experts (DeepSeek-V3's take 22.5 GB
        # in bfloat16) would be allocated and initialised only to be replaced by `experts`.
        layer = cls(experts.hidden_size, experts.intermediate_size, experts.num_experts, top_k,
                    activation=experts.activation.name, bias=b_gate_up is not None or b_down is not None,
                    device="meta", dtype=dtype, **options)
        for name, tensor in (("w_gate_up", experts.w_gate_up), ("w_down", experts.w_down), ("b_gate_up", b_gate_up),
                             ("b_down", b_down)):
            if tensor is None and getattr(layer, name) is not None:  # one bias given: the other starts at 0
                setattr(layer, name, nn.Parameter(torch.zeros(getattr(layer, name).shape, device=device, dtype=dtype)))
            elif isinstance(tensor, QuantizedWeight):
                delattr(layer, name)
                setattr(layer, name, FrozenQuantized(tensor))
            elif tensor is not None:
                tensor = formats.dense(tensor)
                setattr(layer, name, nn.Parameter(tensor.detach(), requires_grad=tensor.requires_grad))
        for module in (layer.router, layer.shared_experts):  # made and initialised as the constructor does
            if module is not None:
                module.to_empty(device=device)
                for linear in module.modules():
                    if isinstance(linear, nn.Linear):
                        linear.reset_parameters()
        layer.expert_bias = torch.zeros_like(layer.expert_bias, device=device)
        return layer

    @torch.no_grad()
    def quantize_(self, format: str, *, group_size: Optional[int] = None, symmetric: bool = True,
                  precision: str = "weight-only") -> "MoE":
        """Quantize the experts' weights in place (formats.quantized.quantize's options;
        precision="w8a8" for fp8 quantizes the activations too); they become frozen buffers, the
        biases, router and shared experts stay as they are. Returns the layer."""
        for name in ("w_gate_up", "w_down"):
            weight = getattr(self, name)
            if isinstance(weight, FrozenQuantized):
                raise ValueError(f"{name} is already {weight.format}; quantize the float layer once")
            quantized = quantize(weight, format, group_size=group_size, symmetric=symmetric, precision=precision)
            delattr(self, name)
            setattr(self, name, FrozenQuantized(quantized))
        return self

    @property
    def experts(self) -> ExpertWeights:
        """The layer's experts as one ExpertWeights (views of its parameters; quantized weights
        for activations of the router's dtype). The same object from call to call while the
        tensors stay as they are, so that what a backend derives from it is kept (a decode
        step's Python costs as much as its kernels)."""
        dtype = self.router.weight.dtype
        if torch.compiler.is_compiling():
            return self._make_experts(dtype)
        mark = stamp(self._expert_tensors())
        return kept(_LAYER_EXPERTS, self, None if mark is None else (dtype, self.activation, mark),
                    lambda: self._make_experts(dtype))

    def _expert_tensors(self) -> list[Optional[Tensor]]:
        """The tensors that hold the experts: each weight's (a quantized one's codes, scales and
        zero points), then the biases (None where absent)."""
        held = []
        for name in ("w_gate_up", "w_down"):
            weight = _registered(self, name)
            held += weight.tensors() if isinstance(weight, FrozenQuantized) else (weight,)
        return held + [_registered(self, "b_gate_up"), _registered(self, "b_down")]

    def _make_experts(self, dtype: torch.dtype) -> ExpertWeights:
        w_gate_up, w_down = (w.weight(dtype) if isinstance(w, FrozenQuantized) else w
                             for w in (self.w_gate_up, self.w_down))
        return ExpertWeights(w_gate_up, w_down, self.b_gate_up, self.b_down, self.activation)

    def reset_parameters(self) -> None:
        """Each expert initialised like nn.Linear: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
        bound_in = 1 / math.sqrt(self.hidden_size)
        bound_out = 1 / math.sqrt(self.intermediate_size)
        if isinstance(self.w_gate_up, FrozenQuantized) or isinstance(self.w_down, FrozenQuantized):
            raise ValueError("the experts are quantized (frozen): reset a float layer, then quantize_ it")
        with torch.no_grad():
            self.w_gate_up.uniform_(-bound_in, bound_in)
            self.w_down.uniform_(-bound_out, bound_out)
            if self.b_gate_up is not None:
                self.b_gate_up.uniform_(-bound_in, bound_in)
                self.b_down.uniform_(-bound_out, bound_out)
            self.expert_bias.zero_()

    def extra_repr(self) -> str:
        return (
            f"hidden_size={self.hidden_size}, intermediate_size={self.intermediate_size}, "
            f"num_experts={self.num_experts}, top_k={self.top_k}, activation={self.activation!r}, "
            f"scoring={self.scoring!r}, backend={self.backend!r}"
        )

    def router_logits(self, x: Tensor) -> Tensor:
        """[T, H] -> [T, E] float32, whatever the layer's dtype."""
        return nn.functional.linear(x.float(), self._router_float32())

    def _router_float32(self) -> Tensor:
        """The router's weight in float32. Kept from call to call (a copy of the router, E x H
        floats) where no gradient reaches it, so that a decode step does not widen it each time."""
        weight = self.router.weight
        if weight.dtype == torch.float32 or torch.compiler.is_compiling() or (
                torch.is_grad_enabled() and weight.requires_grad):
            return weight.float()
        return kept(_ROUTER_FLOAT32, self, stamp([weight]), lambda: weight.detach().float())

    def routing(self, flat: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """[T, H] -> the router's logits [T, E] (float32) and each token's routing weights and
        expert ids [T, top_k]."""
        logits = self.router_logits(flat)
        weights, ids = route(logits, self.top_k, backend=self.backend, **self._route_options())
        return logits, weights, ids

    def forward(self, x: Tensor, return_aux: bool = False):
        check.floating("x", x)
        if x.dim() == 0 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"x must be [..., hidden_size={self.hidden_size}], got shape {tuple(x.shape)}")
        # a view's making costs a decode step a few percent: none where x is [T, H] already
        flat = x if x.dim() == 2 else x.reshape(-1, self.hidden_size)
        out = None if return_aux else self._decode_step(flat)
        if out is not None:
            out = self._with_shared_experts(out, flat)
            return out if flat is x else out.view(x.shape)
        logits, weights, ids = self.routing(flat)
        # the expert counts are needed only for the aux losses; without them moe_mlp makes the plan
        # itself, or skips it (a decode step on the triton and numba backends)
        plan = make_plan(ids, self.num_experts, backend=self.backend) if return_aux else None
        out = self._with_shared_experts(self.routed_experts(flat, weights, ids, plan), flat).view(x.shape)
        if not return_aux:
            return out
        return out, self._aux(logits, plan.counts)

    def _decode_step(self, flat: Tensor) -> Optional[Tensor]:
        """The routed experts' output with the router and the routing computed in the same
        backend call (ops.routed_decode_step: a decode step on the numba backend), or None;
        not for experts that this class does not route itself (expert parallelism overrides
        routed_experts). The step is prepared once and kept while the layer's tensors and
        settings stay as they are: a decode step's Python costs as much as its kernels."""
        if type(self).routed_experts is not MoE.routed_experts:
            return None
        tensors = [_registered(_registered(self, "router"), "weight"), _registered(self, "expert_bias"),
                   *self._expert_tensors()]
        if not eager_direct(flat, *tensors) or torch.is_grad_enabled() and any(
                t is not None and t.requires_grad for t in (flat, *tensors)):
            return None
        mark = stamp(tensors)
        # "auto" follows MOE_DISPATCH_BACKEND from call to call, as every op does
        backend = (self.backend, os.environ.get(BACKEND_ENV_VAR) if self.backend == "auto" else None)
        key = None if mark is None else (
            mark, flat.dtype, flat.device, backend, self.top_k, self.activation, self.scoring, self.renormalize,
            self.n_groups, self.topk_groups, self.routed_scaling)
        step = kept(_DECODE_STEPS, self, key, lambda: routed_decode_step(
            flat, self._router_float32(), self.top_k, self.experts, backend=self.backend, **self._route_options()))
        return None if step is None else step(flat)

    def _route_options(self) -> dict:
        """route's keyword arguments for this layer's routing."""
        return dict(scoring=self.scoring, renormalize=self.renormalize,
                    bias=self.expert_bias if self.scoring == "sigmoid" else None, n_groups=self.n_groups,
                    topk_groups=self.topk_groups, scale=self.routed_scaling)

    def _with_shared_experts(self, out: Tensor, flat: Tensor) -> Tensor:
        return out if self.shared_experts is None else out + self.shared_experts(flat)

    def routed_experts(self, flat: Tensor, weights: Tensor, ids: Tensor, plan: Optional[DispatchPlan] = None) -> Tensor:
        """[T, H] -> [T, H]: the weighted sum of each token's routed experts, the step between
        routing and the shared experts (expert parallelism overrides it). weights, ids: [T, k]
        from route; plan: the ids' plan, when forward made one."""
        return moe_mlp(flat, weights, ids, self.experts, plan=plan, backend=self.backend)

    def _aux(self, logits: Tensor, counts: Tensor) -> MoEAux:
        num_tokens = logits.shape[0]
        if num_tokens == 0:
            zero = logits.new_zeros(())
            return MoEAux(zero, zero.clone(), counts)
        if self.scoring == "softmax":
            probs = logits.softmax(-1)
        else:
            scores = logits.sigmoid()
            probs = scores / scores.sum(-1, keepdim=True)
        share = counts.float() / (num_tokens * self.top_k)
        load_balancing = self.num_experts * (share * probs.mean(0)).sum()
        z_loss = torch.logsumexp(logits, dim=-1).square().mean()
        return MoEAux(load_balancing, z_loss, counts)

    @torch.no_grad()
    def update_expert_bias(self, counts: Tensor, rate: float = 1e-3) -> None:
        """Aux-loss-free balancing (DeepSeek-V3): raise the bias of under-loaded experts,
        lower it for over-loaded ones, by `rate` each call.

        counts: [E] tokens per expert, e.g. aux.counts (summed over data-parallel ranks).
        Only scoring="sigmoid" uses the bias for choice.
        """
        check.tensor("counts", counts, ndim=1)
        check.shape("counts", counts, (self.num_experts,))
        load = counts.to(self.expert_bias.device, torch.float32)
        self.expert_bias += rate * torch.sign(load.mean() - load)
