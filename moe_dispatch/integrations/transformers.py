"""moe-dispatch inside Hugging Face transformers (>= 5.0).

transformers 5 runs the experts of every MoE model through its ExpertsInterface: the
experts module (a class decorated with @use_experts_implementation) calls the function
registered under config._experts_implementation as
fn(experts, hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H].
register() adds ours under the name "moe_dispatch":

    from moe_dispatch.integrations.transformers import register
    register()
    model = AutoModelForCausalLM.from_pretrained(name, experts_implementation="moe_dispatch")

The experts module's flags choose the path. Gated experts with transformers' default gate
(act(gate) * up over concatenated [gate | up] columns) and SiLU or GELU, gpt-oss's clamped
SwiGLU over interleaved columns, and ungated experts with SiLU, GELU or ReLU, run through the
fused moe_mlp, with or without biases, in either weight layout (is_transposed), without
copying a weight. Anything else - another model's own _apply_gate, another activation, a
norm after each expert - runs through the same steps composed from the public ops
(make_plan, permute, grouped_mm, unpermute) around the module's own gate, activation and
norm: slower, and exactly the model's computation.

from_transformers / to_transformers move a whole MoE block - router, experts and shared
experts - into our MoE layer and back.

quantize_experts_(model, format) quantizes every experts module's weights for inference, and
load_quantized_experts_(model, checkpoint) puts a quantized checkpoint's experts (DeepSeek-V3
FP8, gpt-oss MXFP4, GPTQ, AWQ, compressed-tensors) in place of the float ones: each weight
becomes a FrozenQuantized submodule under the parameter's name, which only moe-dispatch's
implementation reads (the eager loop indexes a tensor).
"""

from __future__ import annotations

import copy
import weakref
from typing import Callable, NamedTuple, Optional

import torch
from torch import nn

from .. import activations
from ..activations import CLAMPED_SWIGLU
from ..backends import BACKEND_NAMES
from ..experts import ExpertWeights, kept, stamp
from ..formats.quantized import QuantizedWeight, quantize
from ..layers import FrozenQuantized, MoE
from ..ops import grouped_mm, make_plan, moe_mlp, permute, unpermute

Tensor = torch.Tensor
REQUIREMENT = "transformers>=5.0"
DEFAULT_NAME = "moe_dispatch"
# What experts_forward reads off each experts module, kept beside it (see _module_experts).
_MODULE_EXPERTS: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


class _Transformers(NamedTuple):
    """What the forward needs from transformers, looked up once (plain attribute reads
    afterwards, which torch.compile traces without a graph break)."""

    experts_interface: type
    default_gate: Optional[Callable]  # the gate @use_experts_implementation gives a class without one
    gpt_oss_gate: Optional[Callable]  # gpt-oss's clamped SwiGLU over interleaved columns
    silu_types: tuple
    gelu_types: tuple


_LOADED: Optional[_Transformers] = None


def _transformers() -> _Transformers:
    """transformers' pieces, or an ImportError that says what to install."""
    global _LOADED
    if _LOADED is not None:
        return _LOADED
    try:
        import transformers
    except ImportError as exc:
        raise ImportError(
            f"moe_dispatch.integrations.transformers needs {REQUIREMENT}, which is not installed; "
            f"run: pip install '{REQUIREMENT}'"
        ) from exc
    found = transformers.__version__
    if int(found.split(".")[0]) < 5:
        raise ImportError(
            f"moe_dispatch.integrations.transformers needs {REQUIREMENT} (the release that added the "
            f"ExpertsInterface); found transformers {found}; run: pip install -U '{REQUIREMENT}'"
        )
    from transformers import activations
    from transformers.integrations import moe

    silu = getattr(activations, "SiLUActivation", None)
    try:
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts
    except ImportError:
        GptOssExperts = None
    _LOADED = _Transformers(
        experts_interface=moe.ExpertsInterface,
        default_gate=getattr(moe, "_default_apply_gate", None),
        gpt_oss_gate=getattr(GptOssExperts, "_apply_gate", None),
        silu_types=(nn.SiLU,) if silu is None else (nn.SiLU, silu),
        # GELUActivation is the exact erf GELU, in torch or in Python
        gelu_types=(activations.GELUActivation,),
    )
    return _LOADED


def register(name: str = DEFAULT_NAME, *, backend: str = "auto") -> str:
    """Register moe-dispatch in transformers' ExpertsInterface under `name`; returns `name`.

    Then `from_pretrained(..., experts_implementation=name)` or
    `model.set_experts_implementation(name)` runs every experts module on moe-dispatch.
    backend: "auto" (the fastest backend for each call's device) or one backend by name;
    register several names to compare backends.
    """
    experts_interface = _transformers().experts_interface
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty str, got {name!r}")
    if backend != "auto" and backend not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {', '.join(('auto',) + BACKEND_NAMES)}; got {backend!r}")

    def moe_dispatch_experts_forward(experts, hidden_states, top_k_index, top_k_weights):
        return experts_forward(experts, hidden_states, top_k_index, top_k_weights, backend=backend)

    experts_interface.register(name, moe_dispatch_experts_forward)
    return name


# ---- the experts forward -------------------------------------------------------------------


def experts_forward(
    experts: nn.Module, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor, *, backend: str = "auto"
) -> Tensor:
    """What `experts` (a transformers experts module) computes, on moe-dispatch.

    hidden_states: [T, H]; top_k_index: [T, k] int; top_k_weights: [T, k] float.
    Returns [T, H] in hidden_states' dtype.
    """
    fused, (w1, w2, b1, b2) = _module_experts(experts, hidden_states.dtype)
    ids, weights = top_k_index, top_k_weights
    if getattr(experts, "_is_expert_parallel", False):
        # Expert parallelism marks the slots of other ranks' experts with id num_experts and
        # weight 0. Sent to expert 0 with weight 0, they add nothing to the output or to any
        # gradient (for the cost of their rows).
        foreign = ids >= w1.shape[0]
        ids = ids.masked_fill(foreign, 0)
        weights = weights.masked_fill(foreign, 0.0)
    x = hidden_states.to(w1.dtype)  # under autocast the input may differ from the weights
    if fused is not None:
        out = moe_mlp(x, weights, ids, fused, backend=backend)
    else:
        out = _composed_forward(experts, x, weights, ids, (w1, w2, b1, b2), backend)
    return out.to(hidden_states.dtype)


def _module_experts(experts: nn.Module, dtype: torch.dtype) -> tuple:
    """(fused_experts, expert_weights) of the module for `dtype` activations: the same objects
    from call to call while its tensors, what decides its path and the grad mode stay as they
    are, so that what a backend derives from them is kept (made anew, they and the backend's
    setup took 0.07 ms of a 0.6 ms bfloat16 decode step at olmoe x0.5)."""
    def make():
        return fused_experts(experts, dtype), expert_weights(experts, dtype)

    if torch.compiler.is_compiling():
        return make()
    # the dicts themselves: parameters() walks the submodules, 15 us more once the kernels ran
    quantized = [t for m in experts._modules.values() if isinstance(m, FrozenQuantized) for t in m.tensors()]
    mark = stamp([*experts._parameters.values(), *quantized])
    if mark is not None:
        # fused_experts reads these; the grad mode, because views made under no_grad carry no grad
        path = (getattr(experts, "act_fn", None), getattr(experts, "_apply_gate", None),
                getattr(experts, "alpha", None), getattr(experts, "limit", None))
        mark = (dtype, torch.is_grad_enabled(), path, mark)
    return kept(_MODULE_EXPERTS, experts, mark, make)


# @use_experts_implementation's flags and their values in the releases before each existed.
_FLAG_DEFAULTS = dict(
    has_gate=True, has_bias=False, is_transposed=False, is_concatenated=True, has_post_expert_norm=False,
)


def flag(experts: nn.Module, name: str) -> bool:
    """One of the experts module's flags; an older transformers may not set every one."""
    return getattr(experts, name, _FLAG_DEFAULTS[name])


def expert_weights(experts: nn.Module, dtype: Optional[torch.dtype] = None) -> tuple:
    """The experts' weights in moe_mlp's layout, as views (no copies).

    (w1 [E, N, H], w2 [E, H, I], b1 [E, N] or None, b2 [E, H] or None); N is 2I for
    gated experts (their gate_up_proj) and I for ungated ones (their up_proj). A weight that
    quantize_experts_ or load_quantized_experts_ made quantized (a FrozenQuantized, held
    [E, N, K] whatever is_transposed says) comes as a QuantizedWeight for activations of the
    module's biases' dtype, else `dtype` (default: the default dtype).
    """
    has_gate = flag(experts, "has_gate")
    w1 = experts.gate_up_proj if has_gate else experts.up_proj
    w2 = experts.down_proj
    if flag(experts, "is_transposed"):  # stored [E, in, out]
        w1, w2 = (w if isinstance(w, FrozenQuantized) else w.transpose(1, 2) for w in (w1, w2))
    if isinstance(w1, FrozenQuantized) or isinstance(w2, FrozenQuantized):
        floats = [p.dtype for p in experts.parameters(recurse=False) if p.is_floating_point()]
        dtype = floats[0] if floats else dtype or torch.get_default_dtype()
        w1, w2 = (w.weight(dtype) if isinstance(w, FrozenQuantized) else w for w in (w1, w2))
    if not flag(experts, "has_bias"):
        return w1, w2, None, None
    b1 = experts.gate_up_proj_bias if has_gate else experts.up_proj_bias
    return w1, w2, b1, experts.down_proj_bias


def fused_experts(experts: nn.Module, dtype: Optional[torch.dtype] = None) -> Optional[ExpertWeights]:
    """The ExpertWeights (views of the module's weights; QuantizedWeight where they are
    quantized, for `dtype` activations as expert_weights says) whose moe_mlp computes exactly
    what `experts` computes, or None when no registered activation does."""
    if flag(experts, "has_post_expert_norm"):
        return None
    act = _activation_name(getattr(experts, "act_fn", None))
    if not flag(experts, "has_gate"):
        return None if act is None else ExpertWeights(*expert_weights(experts, dtype), act)
    known = _transformers()
    gate = getattr(experts._apply_gate, "__func__", None)
    if gate is None:
        return None
    if gate is known.gpt_oss_gate and (experts.alpha, experts.limit) == CLAMPED_SWIGLU.params:
        return ExpertWeights(*expert_weights(experts, dtype), CLAMPED_SWIGLU, interleaved=True)
    glu = activations.glu(act)
    if gate is not known.default_gate or not flag(experts, "is_concatenated") or glu is None:
        return None
    return ExpertWeights(*expert_weights(experts, dtype), glu)


def _activation_name(act) -> Optional[str]:
    """The name ("silu", "gelu", "relu") of what `act` computes, or None. Exact types only:
    a subclass may compute something else."""
    known = _transformers()
    kind = type(act)
    if kind in known.silu_types:
        return "silu"
    if kind in known.gelu_types or (kind is nn.GELU and act.approximate == "none"):
        return "gelu"
    if kind is nn.ReLU:
        return "relu"
    return None


def _composed_forward(experts, x, weights, ids, expert_tensors, backend) -> Tensor:
    """The experts through the public ops, around the module's own gate, activation and norm."""
    w1, w2, b1, b2 = expert_tensors
    plan = make_plan(ids, w1.shape[0], backend=backend)
    rows = permute(x, plan, backend=backend)
    owner = plan.expert_of_row() if b1 is not None else None
    h = _grouped_linear(rows, w1, b1, owner, plan, backend)
    a = experts._apply_gate(h) if flag(experts, "has_gate") else experts.act_fn(h)
    o = _grouped_linear(a.to(x.dtype), w2, b2, owner, plan, backend)
    if flag(experts, "has_post_expert_norm"):
        o = experts.post_expert_norm(o)
    return unpermute(o.to(x.dtype), plan, weights, backend=backend)


def _grouped_linear(rows, w, b, owner, plan, backend) -> Tensor:
    """rows [R, in] @ w[e].T (+ b[e]) for the expert e that owns each row; w: [E, out, in]."""
    y = grouped_mm(rows, w.mT, plan.offsets, backend=backend)  # .mT: a tensor's or a QuantizedWeight's
    return y if b is None else y + b[owner]


# ---- quantized experts ---------------------------------------------------------------------


def is_experts_module(module: nn.Module) -> bool:
    """Whether module is a transformers experts module (@use_experts_implementation sets its flags)."""
    return hasattr(module, "has_gate") and hasattr(module, "down_proj")


def _experts_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every experts module."""
    found = [(name, m) for name, m in model.named_modules() if is_experts_module(m)]
    if not found:
        raise ValueError(f"{type(model).__name__} has no experts module (@use_experts_implementation)")
    return found


def _hold_quantized(experts: nn.Module, w1: QuantizedWeight, w2: QuantizedWeight) -> None:
    """Replace the module's float weights by FrozenQuantized submodules of the same names:
    buffers that .to(device) moves and .to(dtype) leaves as they are."""
    names = ("gate_up_proj" if flag(experts, "has_gate") else "up_proj", "down_proj")
    for name, weight in zip(names, (w1, w2)):
        old = getattr(experts, name)
        transposed = flag(experts, "is_transposed") and not isinstance(old, FrozenQuantized)
        expected = old.transpose(1, 2).shape if transposed else old.shape
        if tuple(weight.shape) != tuple(expected):
            raise ValueError(f"{name} must be [E, out, in] = {tuple(expected)}, got a {weight.format} weight of shape "
                             f"{tuple(weight.shape)}")
        _replace(experts, name, FrozenQuantized(weight))


def _replace(module: nn.Module, name: str, frozen: FrozenQuantized) -> None:
    """A parameter replaced by a submodule of the same name (setattr alone refuses)."""
    delattr(module, name)
    setattr(module, name, frozen)


def quantize_experts_(model: nn.Module, format: str, *, group_size: Optional[int] = None,
                      symmetric: bool = True) -> nn.Module:
    """Quantize every experts module's weights in place, for inference with
    experts_implementation="moe_dispatch" (formats.quantized.quantize's options); biases,
    routers and the rest of the model stay as they are. Returns the model."""
    with torch.no_grad():
        for name, experts in _experts_modules(model):
            w1, w2, _, _ = expert_weights(experts)
            if isinstance(w1, QuantizedWeight):
                raise ValueError(f"{name} is already {w1.format}; quantize the float model once")
            _hold_quantized(experts, *(quantize(w, format, group_size=group_size, symmetric=symmetric)
                                       for w in (w1, w2)))
    return model


def load_quantized_experts_(model: nn.Module, checkpoint, format: Optional[str] = None, **options) -> nn.Module:
    """Put a quantized checkpoint's experts in place of every experts module's weights (the
    module named "{prefix}.experts" reads the tensors under that name; checkpoints.read_experts
    takes `checkpoint`, `format` and the options), biases included. On a CPU transformers
    loads FP8 and MXFP4 checkpoints dequantized to bfloat16: this gives back their bytes.
    Returns the model."""
    from .checkpoints import read_experts

    with torch.no_grad():
        for name, experts in _experts_modules(model):
            if not name.endswith(".experts"):
                raise ValueError(f"experts module {name!r}: its checkpoint tensors' prefix is not known")
            read = read_experts(checkpoint, name.removesuffix(".experts"), format, **options)
            if read.interleaved != getattr(fused_experts(experts), "interleaved", False):
                raise ValueError(f"{name} and the checkpoint lay gate and up rows out differently")
            _hold_quantized(experts, read.w_gate_up, read.w_down)
            _, _, b1, b2 = expert_weights(experts)
            for ours, theirs, what in ((b1, read.b_gate_up, "gate_up bias"), (b2, read.b_down, "down bias")):
                if (ours is None) != (theirs is None):
                    raise ValueError(f"{name} {'has' if ours is not None else 'has no'} {what}, the checkpoint "
                                     f"{'has none' if theirs is None else 'has one'}")
                if ours is not None:
                    ours.copy_(theirs)
    return model


# ---- MoE <-> transformers MoE blocks -------------------------------------------------------

# The blocks whose routing MoE reproduces, by class name: (the router's attribute, its rule).
# "softmax": softmax over every expert, top-k, renormalized when router.norm_topk_prob.
# "softmax_renormalized": the same, always renormalized (a softmax over the top-k logits
#     is the same thing).
# "grouped_sigmoid": DeepSeek-V3's sigmoid scores, correction bias, group-limited top-k,
#     routed_scaling_factor.
_BLOCKS = {
    "MixtralSparseMoeBlock": ("gate", "softmax_renormalized"),
    "Qwen3MoeSparseMoeBlock": ("gate", "softmax"),
    "OlmoeSparseMoeBlock": ("gate", "softmax"),
    "DeepseekV3MoE": ("gate", "grouped_sigmoid"),
    "Glm4MoeMoE": ("gate", "grouped_sigmoid"),
    "AriaTextMoELayer": ("router", "softmax_renormalized"),
}


def _block_config(block: nn.Module) -> dict:
    """MoE's constructor arguments that reproduce `block`, or a ValueError saying why not."""
    kind = type(block).__name__
    if kind not in _BLOCKS:
        raise ValueError(
            f"block must be one of {', '.join(sorted(_BLOCKS))} (blocks whose routing MoE reproduces); "
            f"got {kind}. Its experts still run on moe-dispatch through register()."
        )
    try:
        return _read_block_config(block, kind)
    except AttributeError as exc:  # another transformers release may build the block otherwise
        raise ValueError(
            f"this {kind} (transformers {_transformers_version()}) is not built as the one MoE knows: {exc}"
        ) from exc


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def _read_block_config(block: nn.Module, kind: str) -> dict:
    if getattr(block, "jitter_noise", 0):
        raise ValueError(f"block.jitter_noise={block.jitter_noise}: MoE has no router jitter; set it to 0 first")
    router_name, rule = _BLOCKS[kind]
    router, experts = getattr(block, router_name), block.experts
    fused = fused_experts(experts)
    if fused is None or fused.interleaved:
        raise ValueError(f"{type(experts).__name__}'s expert function (gate, activation or norm) is not one MoE has")
    w1, w2, b1, _ = expert_weights(experts)
    activation = fused.activation.name
    num_experts, hidden = router.weight.shape
    config = dict(
        hidden_size=hidden, intermediate_size=w2.shape[2], num_experts=num_experts, top_k=router.top_k,
        activation=activation, bias=b1 is not None, n_shared_experts=0,
        scoring="softmax", renormalize=True, n_groups=None, topk_groups=None, routed_scaling=1.0,
    )
    if rule == "softmax":
        config["renormalize"] = bool(router.norm_topk_prob)
    elif rule == "grouped_sigmoid":
        config.update(
            scoring="sigmoid", renormalize=bool(router.norm_topk_prob), n_groups=router.num_group,
            topk_groups=router.topk_group, routed_scaling=float(router.routed_scaling_factor),
        )
    shared = getattr(block, "shared_experts", None)
    if shared is not None:
        config["n_shared_experts"] = _shared_expert_count(shared, config["intermediate_size"])
    return config


def _shared_expert_count(shared: nn.Module, intermediate: int) -> int:
    """How many experts' width the shared SwiGLU MLP has (MoE's n_shared_experts)."""
    linears = [getattr(shared, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
    bias_free = all(isinstance(m, nn.Linear) and m.bias is None for m in linears)
    if not bias_free or _activation_name(shared.act_fn) != "silu":
        raise ValueError(f"the shared experts {type(shared).__name__} are not a bias-free SwiGLU MLP, as MoE's are")
    width = shared.gate_proj.out_features
    if width % intermediate:
        raise ValueError(f"the shared experts' width {width} is not a multiple of the experts' {intermediate}")
    return width // intermediate


def _layer_config(layer: MoE) -> dict:
    shared = layer.shared_experts
    return dict(
        hidden_size=layer.hidden_size, intermediate_size=layer.intermediate_size, num_experts=layer.num_experts,
        top_k=layer.top_k, activation=layer.activation, bias=layer.b_gate_up is not None,
        n_shared_experts=0 if shared is None else shared.down.in_features // layer.intermediate_size,
        scoring=layer.scoring, renormalize=layer.renormalize, n_groups=layer.n_groups,
        topk_groups=layer.topk_groups, routed_scaling=layer.routed_scaling,
    )


def _tensor_pairs(layer: MoE, block: nn.Module, config: dict) -> list[tuple[Tensor, Tensor]]:
    """(the layer's tensor, the block's tensor as a view in the layer's layout) for every weight."""
    router = getattr(block, _BLOCKS[type(block).__name__][0])
    w1, w2, b1, b2 = expert_weights(block.experts)
    pairs = [(layer.router.weight, router.weight), (layer.w_gate_up, w1), (layer.w_down, w2)]
    if b1 is not None:
        pairs += [(layer.b_gate_up, b1), (layer.b_down, b2)]
    if config["scoring"] == "sigmoid":
        pairs.append((layer.expert_bias, router.e_score_correction_bias))
    if config["n_shared_experts"]:
        shared, width = block.shared_experts, block.shared_experts.gate_proj.out_features
        gate_up = layer.shared_experts.gate_up.weight
        pairs += [
            (gate_up[:width], shared.gate_proj.weight),
            (gate_up[width:], shared.up_proj.weight),
            (layer.shared_experts.down.weight, shared.down_proj.weight),
        ]
    return pairs


def from_transformers(block: nn.Module, *, backend: str = "auto") -> MoE:
    """A new MoE computing what a transformers MoE block computes, with copies of its weights.

    The layer takes the dtype and device of the block's expert weights (of its router when they
    are quantized: quantized experts stay quantized, as FrozenQuantized copies).
    """
    config = _block_config(block)
    weight = block.experts.down_proj
    if isinstance(weight, FrozenQuantized):
        weight = getattr(block, _BLOCKS[type(block).__name__][0]).weight
    layer = MoE(**config, backend=backend, device=weight.device, dtype=weight.dtype)
    for ours, theirs in _quantized_names(layer, block.experts):
        _replace(layer, ours, copy.deepcopy(getattr(block.experts, theirs)))
    with torch.no_grad():
        for ours, theirs in _tensor_pairs(layer, block, config):
            if not isinstance(theirs, QuantizedWeight):
                ours.copy_(theirs)
    return layer


def to_transformers(layer: MoE, block: nn.Module) -> nn.Module:
    """Copy `layer`'s weights into a transformers MoE block of the same configuration; returns block."""
    config = _block_config(block)
    mine = _layer_config(layer)
    differing = [f"{key}: layer {mine[key]!r}, block {value!r}" for key, value in config.items() if mine[key] != value]
    if differing:
        raise ValueError(f"the layer and the {type(block).__name__} differ in " + "; ".join(differing))
    quantized = _quantized_names(layer, block.experts)
    if any(not isinstance(getattr(layer, ours), FrozenQuantized) for ours, _ in quantized):
        raise ValueError(f"the {type(block).__name__}'s experts are quantized and the layer's are not: quantize_ the "
                         f"layer the same way, or copy into a float block")
    for ours, theirs in quantized:
        _replace(block.experts, theirs, copy.deepcopy(getattr(layer, ours)))
    with torch.no_grad():
        for ours, theirs in _tensor_pairs(layer, block, config):
            if not isinstance(theirs, QuantizedWeight):
                theirs.copy_(ours)
    return block


def _quantized_names(layer: MoE, experts: nn.Module) -> list[tuple[str, str]]:
    """(the layer's name, the experts module's name) of each weight quantized on either side."""
    names = zip(("w_gate_up", "w_down"), ("gate_up_proj" if flag(experts, "has_gate") else "up_proj", "down_proj"))
    return [(ours, theirs) for ours, theirs in names
            if isinstance(getattr(layer, ours), FrozenQuantized) or isinstance(getattr(experts, theirs), FrozenQuantized)]


__all__ = ["register", "experts_forward", "expert_weights", "fused_experts", "quantize_experts_",
           "load_quantized_experts_", "from_transformers", "to_transformers"]
