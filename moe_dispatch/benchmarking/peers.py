"""The baselines every backend is compared with, imported from this one place.

Each peer runs the same experts (the same weight tensors where the layout allows) on the
same routed inputs:

- hf-eager / hf-grouped-mm: transformers 5's experts module (Qwen3MoeExperts; GptOssExperts
  for presets with biases, whose clamped SwiGLU and [E, H, 2I] interleaved layout need a
  copy of the weights) with experts_implementation "eager" (a Python loop over the experts
  hit) or "grouped_mm" (torch's grouped GEMM). transformers is imported only when asked for.
- torch-grouped-mm: the pipeline torchtitan builds on torch._grouped_mm: sort the slots by
  expert, gather, grouped GEMM, SwiGLU, grouped GEMM, weight and scatter-add.
- dense: a dense SwiGLU MLP of width k*I, the same active FLOPs with no routing at all.
- bound: not run; the bytes of the distinct experts touched over the measured bandwidth.

Quantized experts give the first three a dequantized copy, when it fits in memory.
The whole layer (op "layer") is compared with its bound only.

Op-level peers (grouped_mm, permute, unpermute) are torch's own kernels for the same op.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..activations import activate
from .cases import Experts, Inputs
from .costs import gate_up_width

Tensor = torch.Tensor

MOE_PEERS = ("hf-eager", "hf-grouped-mm", "torch-grouped-mm", "dense", "bound")
OP_PEERS = {
    "moe_mlp": MOE_PEERS,
    "grouped_mm": ("torch-grouped-mm", "bound"),
    "permute": ("torch-gather", "bound"),
    "unpermute": ("torch-gather", "bound"),
    "layer": ("bound",),
}
MEASURED_ONLY = ("bound",)  # computed from the roofline, never run
# The peers that run the experts' float weights (of quantized experts: a dequantized copy)
FLOAT_PEERS = ("hf-eager", "hf-grouped-mm", "torch-grouped-mm")


@dataclass
class Peer:
    """forward(x, weights, ids) -> [T, H], and the weights it trains."""

    forward: Callable[[Tensor, Tensor, Tensor], Tensor]
    parameters: tuple


class PeerUnavailable(RuntimeError):
    """A peer that cannot run here (missing package, unsupported dtype or device)."""


def torch_grouped_mm_fn() -> Optional[Callable]:
    """torch's grouped GEMM (F.grouped_mm in newer releases), or None."""
    return getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def check_torch_grouped_mm(dtype: torch.dtype, device: torch.device) -> None:
    """Raise PeerUnavailable unless torch's grouped GEMM runs for this dtype and device."""
    fn = torch_grouped_mm_fn()
    if fn is None:
        raise PeerUnavailable(f"torch {torch.__version__} has no _grouped_mm")
    a = torch.ones(32, 16, device=device, dtype=dtype)
    w = torch.ones(2, 16, 16, device=device, dtype=dtype)
    try:
        fn(a, w, offs=torch.tensor([16, 32], device=device, dtype=torch.int32))
    except (RuntimeError, NotImplementedError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PeerUnavailable(f"torch._grouped_mm does not run for {dtype} on {device.type}: {first_line}")


# ---- transformers' experts module -----------------------------------------------------------


def _hf_experts(experts: Experts, implementation: str, trainable: bool) -> torch.nn.Module:
    preset = experts.preset
    if (preset.activation, preset.bias) not in (("swiglu", False), ("clamped_swiglu", True)):
        raise PeerUnavailable(f"transformers' experts modules are Qwen3-MoE's SwiGLU and gpt-oss's clamped one with "
                              f"biases, not {preset.activation}{' with biases' if preset.bias else ''}")
    try:
        if preset.bias:
            from transformers.models.gpt_oss.configuration_gpt_oss import GptOssConfig
            from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts as Module

            config = GptOssConfig(hidden_size=preset.hidden_size, intermediate_size=preset.intermediate_size,
                                  num_local_experts=preset.num_experts)
        else:
            from transformers.models.qwen3_moe.configuration_qwen3_moe import Qwen3MoeConfig
            from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts as Module

            config = Qwen3MoeConfig(hidden_size=preset.hidden_size, moe_intermediate_size=preset.intermediate_size,
                                    num_experts=preset.num_experts, hidden_act="silu")
    except ImportError as exc:
        raise PeerUnavailable(f"transformers is not installed ({exc})")
    config._experts_implementation = implementation
    with torch.device("meta"):  # the module's own parameters are replaced by ours below
        module = Module(config)

    def param(t: Tensor) -> torch.nn.Parameter:
        return torch.nn.Parameter(t.detach(), requires_grad=trainable)

    w_gate_up, w_down, b_gate_up, b_down = experts.weights.tensors()
    if preset.bias:  # gpt-oss: gate_up [E, H, 2I] with gate and up columns interleaved
        i = preset.intermediate_size
        interleave = torch.stack([torch.arange(i), torch.arange(i) + i], 1).reshape(-1).to(experts.device)
        module.gate_up_proj = param(w_gate_up[:, interleave].transpose(1, 2).contiguous())
        module.gate_up_proj_bias = param(b_gate_up[:, interleave].contiguous())
        module.down_proj = param(w_down.transpose(1, 2).contiguous())
        module.down_proj_bias = param(b_down.detach().clone())
    else:
        module.gate_up_proj = param(w_gate_up)
        module.down_proj = param(w_down)
    if implementation == "grouped_mm":
        check_torch_grouped_mm(experts.dtype, experts.device)
    return module


def hf_experts_fn(experts: Experts, implementation: str, trainable: bool = False) -> Peer:
    module = _hf_experts(experts, implementation, trainable)
    return Peer(lambda x, weights, ids: module(x, ids, weights.to(x.dtype)), tuple(module.parameters()))


# ---- torch._grouped_mm pipeline ---------------------------------------------------------------


def torch_grouped_mm_moe(experts: Experts) -> Peer:
    """The routed experts on torch._grouped_mm, as torchtitan's MoE runs them (without its
    padding of each expert's rows to 16, which only its fp8 path needs)."""
    check_torch_grouped_mm(experts.dtype, experts.device)
    gmm = torch_grouped_mm_fn()
    w_gate_up, w_down, b_gate_up, b_down = experts.weights.tensors()
    num_experts, activation = w_gate_up.shape[0], experts.weights.activation

    def forward(x: Tensor, weights: Tensor, ids: Tensor) -> Tensor:
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        sorted_ids = flat[order]
        counts = torch.histc(sorted_ids.float() if x.device.type == "cpu" else sorted_ids.int(),
                             bins=num_experts, min=0, max=num_experts - 1)
        offs = counts.cumsum(0).to(torch.int32)
        tokens = order // ids.shape[1]
        h = gmm(x[tokens], w_gate_up.transpose(1, 2), offs=offs)
        if b_gate_up is not None:
            h = h + b_gate_up[sorted_ids]
        o = gmm(activate(h, activation).to(x.dtype), w_down.transpose(1, 2), offs=offs)
        if b_down is not None:
            o = o + b_down[sorted_ids]
        o = o.float() * weights.reshape(-1)[order, None]
        return torch.zeros(x.shape, device=x.device, dtype=torch.float32).index_add_(0, tokens, o).to(x.dtype)

    return Peer(forward, experts.trained())


# ---- dense MLP ------------------------------------------------------------------------------


def dense_mlp(experts: Experts, trainable: bool = False, seed: int = 0) -> Peer:
    """A dense SwiGLU MLP of width k*I: the active FLOPs of the routed experts, no routing."""
    preset = experts.preset
    gen = torch.Generator(device=experts.device).manual_seed(seed + 3)

    def weight(rows: int, cols: int) -> Tensor:
        t = torch.empty(rows, cols, device=experts.device, dtype=experts.dtype)
        return t.uniform_(-0.02, 0.02, generator=gen).requires_grad_(trainable)

    w1 = weight(preset.top_k * gate_up_width(preset), preset.hidden_size)
    w2 = weight(preset.hidden_size, preset.top_k * preset.intermediate_size)
    activation = preset.activation

    def forward(x: Tensor, weights: Tensor, ids: Tensor) -> Tensor:
        return F.linear(activate(F.linear(x, w1), activation).to(x.dtype), w2)

    return Peer(forward, (w1, w2))


def moe_peer(name: str, experts: Experts, trainable: bool = False) -> Peer:
    """One of MOE_PEERS except "bound"."""
    if name == "hf-eager":
        return hf_experts_fn(experts, "eager", trainable)
    if name == "hf-grouped-mm":
        return hf_experts_fn(experts, "grouped_mm", trainable)
    if name == "torch-grouped-mm":
        return torch_grouped_mm_moe(experts)
    if name == "dense":
        return dense_mlp(experts, trainable)
    raise ValueError(f"unknown peer {name!r}; choose from {', '.join(MOE_PEERS)}")


def training_step(forward: Callable[[Tensor, Tensor, Tensor], Tensor], inputs: Inputs,
                  parameters: tuple) -> Callable[[], object]:
    """A callable running forward and backward with gradients for x, the routing weights and
    `parameters` (returned, not accumulated into .grad, so every repeat does the same work)."""
    x = inputs.x.detach().requires_grad_()
    weights = inputs.weights.detach().requires_grad_()
    wanted = (x, weights) + tuple(p for p in parameters if p.requires_grad)
    grad = torch.randn_like(inputs.x)
    return lambda: torch.autograd.grad(forward(x, weights, inputs.ids), wanted, grad, allow_unused=True)


def peer_call(peer: Peer, inputs: Inputs, backward: bool) -> Callable[[], object]:
    """A no-argument callable that runs the peer once on inputs: the forward without autograd,
    or forward and backward (the experts' tensors made with requires_grad=True)."""
    if backward:
        return training_step(peer.forward, inputs, peer.parameters)
    x, weights, ids = inputs.x, inputs.weights, inputs.ids

    def run():
        with torch.no_grad():
            return peer.forward(x, weights, ids)

    return run


# ---- op-level peers -------------------------------------------------------------------------


def torch_gather_permute(x: Tensor, token_of_row: Tensor) -> Tensor:
    return x.index_select(0, token_of_row)


def torch_gather_unpermute(ys: Tensor, row_of_slot: Tensor, weights: Tensor) -> Tensor:
    rows = ys.index_select(0, row_of_slot.reshape(-1)).view(*row_of_slot.shape, ys.shape[1])
    return (rows.float() * weights[..., None]).sum(1).to(ys.dtype)
