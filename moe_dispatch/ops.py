"""The public functions: validate, pick the backend, call it. Autograd lives here.

Each op is a torch custom op (torch.library) that takes the resolved backend's name, so
autograd, torch.compile (through the fake implementations) and every backend share one
definition. Backward formulas call custom ops too, so compiled backward graphs trace.
make_plan and moe_mlp call the backend directly when nothing needs the custom op (eager
mode, plain tensors; see _direct): its dispatch costs more than a small step. moe_mlp with
autograd then runs as a torch.autograd.Function over the same backend calls.
"""

from typing import Optional

import torch
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from . import validation as check
from .backends import get_backend, resolve_backend
from .plan import DispatchPlan

Tensor = torch.Tensor


@torch.compiler.assume_constant_result
def _backend_name(device: torch.device, backend: str) -> str:
    return resolve_backend(device, backend)


def _direct(*tensors: Optional[Tensor]) -> bool:
    """Whether a call may skip its custom op and call the backend (moe_mlp with autograd
    through _EagerMoEMLP): in eager mode, on plain tensors or parameters, with no torch
    function or dispatch mode active. The custom op's dispatch costs about 0.1 ms a call when
    caches are cold (a decode step between other layers), more than the kernels of a small
    step; tracing, fake and meta tensors, modes and other subclasses still go through it."""
    if torch.compiler.is_compiling() or is_in_torch_dispatch_mode() or torch._C._is_torch_function_mode_enabled():
        return False
    return all(t is None or type(t) in (torch.Tensor, torch.nn.Parameter) for t in tensors)


# ---- routing: the same vectorized torch code on every backend --------------------------


def route(
    logits: Tensor,
    top_k: int,
    *,
    scoring: str = "softmax",
    renormalize: bool = True,
    bias: Optional[Tensor] = None,
    n_groups: Optional[int] = None,
    topk_groups: Optional[int] = None,
    scale: float = 1.0,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Choose top_k experts per token.

    logits: [T, E] float; bias: [E] float (shifts the choice, never the weights).
    Returns weights [T, k] float32 (float64 for float64 logits: the chosen scores, renormalized to sum to one if asked,
    times scale) and ids [T, k] int64. With n_groups, only the topk_groups best groups
    (a group's score is the sum of its two best biased scores, as DeepSeek-V3) compete.
    """
    check.floating("logits", logits, ndim=2)
    num_tokens, num_experts = logits.shape
    check.positive_int("top_k", top_k)
    if top_k > num_experts:
        raise ValueError(f"top_k={top_k} exceeds the number of experts E={num_experts}")
    check.choice("scoring", scoring, ("softmax", "sigmoid"))
    if bias is not None:
        check.floating("bias", bias, ndim=1)
        check.shape("bias", bias, (num_experts,))
        check.same_device("bias", bias, "logits", logits)
    check.routing_groups(num_experts, top_k, n_groups, topk_groups)
    _backend_name(logits.device, backend)

    # At least float32 whatever the logits' dtype; float64 stays float64 (gradcheck).
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    scores = logits.softmax(-1) if scoring == "softmax" else logits.sigmoid()
    choice = scores.detach() if bias is None else scores.detach() + bias.detach().to(scores.dtype)
    if n_groups is not None:
        group_size = num_experts // n_groups
        grouped = choice.view(num_tokens, n_groups, group_size)
        group_score = grouped.topk(min(2, group_size), dim=-1).values.sum(-1)
        kept = group_score.topk(topk_groups, dim=-1).indices
        keep = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, kept, True)
        choice = choice.masked_fill(~keep.repeat_interleave(group_size, dim=1), float("-inf"))
    ids = choice.topk(top_k, dim=-1).indices
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-20)
    return weights * scale, ids


# ---- make_plan ----------------------------------------------------------------------------


@torch.library.custom_op("moe_dispatch::make_plan", mutates_args=())
def _make_plan(ids: Tensor, num_experts: int, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return get_backend(backend).make_plan(ids, num_experts)


@_make_plan.register_fake
def _(ids, num_experts, backend):
    int32 = dict(dtype=torch.int32)
    return (
        ids.new_empty(num_experts, **int32),
        ids.new_empty(num_experts + 1, **int32),
        ids.new_empty(ids.numel(), **int32),
        ids.new_empty(ids.shape, **int32),
    )


def make_plan(ids: Tensor, num_experts: int, *, backend: str = "auto") -> DispatchPlan:
    """Group the (token, choice) slots of ids [T, k] by expert; see DispatchPlan."""
    check.expert_ids(ids, num_experts)
    return _plan(ids, num_experts, _backend_name(ids.device, backend))


def _plan(ids: Tensor, num_experts: int, backend_name: str) -> DispatchPlan:
    """make_plan for ids of a checked type and shape, on a resolved backend."""
    if _direct(ids):
        backend = get_backend(backend_name)
        if not backend.refuses_bad_ids:
            check.expert_id_values(ids, num_experts)
        return DispatchPlan(*backend.make_plan(ids, num_experts))
    check.expert_id_values(ids, num_experts)  # skipped while compiling
    return DispatchPlan(*_make_plan(ids, num_experts, backend_name))


# ---- permute / unpermute ------------------------------------------------------------------


@torch.library.custom_op("moe_dispatch::permute", mutates_args=())
def _permute(x: Tensor, token_of_row: Tensor, row_of_slot: Tensor, backend: str) -> Tensor:
    return get_backend(backend).permute(x, token_of_row)


@_permute.register_fake
def _(x, token_of_row, row_of_slot, backend):
    return x.new_empty(token_of_row.shape[0], x.shape[1])


def _permute_setup(ctx, inputs, output):
    _, token_of_row, row_of_slot, ctx.backend = inputs
    ctx.save_for_backward(token_of_row, row_of_slot)


def _permute_backward(ctx, dxs):
    token_of_row, row_of_slot = ctx.saved_tensors
    return _unpermute(dxs, token_of_row, row_of_slot, None, ctx.backend), None, None, None


_permute.register_autograd(_permute_backward, setup_context=_permute_setup)


@torch.library.custom_op("moe_dispatch::unpermute", mutates_args=())
def _unpermute(
    ys: Tensor, token_of_row: Tensor, row_of_slot: Tensor, weights: Optional[Tensor], backend: str
) -> Tensor:
    return get_backend(backend).unpermute(ys, row_of_slot, weights)


@_unpermute.register_fake
def _(ys, token_of_row, row_of_slot, weights, backend):
    return ys.new_empty(row_of_slot.shape[0], ys.shape[1])


@torch.library.custom_op("moe_dispatch::unpermute_backward", mutates_args=())
def _unpermute_backward_op(
    dy: Tensor, ys: Tensor, token_of_row: Tensor, row_of_slot: Tensor, weights: Optional[Tensor], backend: str
) -> tuple[Tensor, Tensor]:
    dys, dweights = get_backend(backend).unpermute_backward(dy, ys, token_of_row, row_of_slot, weights)
    return dys, (dweights if dweights is not None else dy.new_empty(0, dtype=torch.float32))


@_unpermute_backward_op.register_fake
def _(dy, ys, token_of_row, row_of_slot, weights, backend):
    dweights_shape = row_of_slot.shape if weights is not None else (0,)
    return ys.new_empty(ys.shape), dy.new_empty(dweights_shape, dtype=torch.float32)


def _unpermute_setup(ctx, inputs, output):
    ys, token_of_row, row_of_slot, weights, ctx.backend = inputs
    ctx.has_weights = weights is not None
    ctx.save_for_backward(ys, token_of_row, row_of_slot, weights)


def _unpermute_grad(ctx, dy):
    ys, token_of_row, row_of_slot, weights = ctx.saved_tensors
    dys, dweights = _unpermute_backward_op(dy, ys, token_of_row, row_of_slot, weights, ctx.backend)
    dweights = dweights.to(weights.dtype) if ctx.has_weights else None
    return dys, None, None, dweights, None


_unpermute.register_autograd(_unpermute_grad, setup_context=_unpermute_setup)


def permute(x: Tensor, plan: DispatchPlan, *, backend: str = "auto") -> Tensor:
    """x: [T, H] -> xs: [T*k, H] in expert order, xs[r] = x[plan.token_of_row[r]]."""
    check.floating("x", x, ndim=2)
    check.plan(plan, "x", x)
    if x.shape[0] != plan.num_tokens:
        raise ValueError(f"x has {x.shape[0]} tokens but the plan was made for {plan.num_tokens}")
    check.plan_values(plan)
    return _permute(x, plan.token_of_row, plan.row_of_slot, _backend_name(x.device, backend))


def unpermute(ys: Tensor, plan: DispatchPlan, weights: Optional[Tensor] = None, *, backend: str = "auto") -> Tensor:
    """ys: [T*k, N] -> y: [T, N], y[t] = sum_j weights[t, j] * ys[plan.row_of_slot[t, j]].

    Sums in float32; weights None means all ones. The result has ys's dtype.
    """
    check.floating("ys", ys, ndim=2)
    check.plan(plan, "ys", ys)
    if ys.shape[0] != plan.num_rows:
        raise ValueError(f"ys has {ys.shape[0]} rows but the plan has {plan.num_rows} (T*k)")
    check.plan_values(plan)
    if weights is not None:
        check.floating("weights", weights, ndim=2)
        check.shape("weights", weights, tuple(plan.row_of_slot.shape))
        check.same_device("weights", weights, "ys", ys)
    return _unpermute(ys, plan.token_of_row, plan.row_of_slot, weights, _backend_name(ys.device, backend))


# ---- grouped_mm ---------------------------------------------------------------------------


@torch.library.custom_op("moe_dispatch::grouped_mm", mutates_args=())
def _grouped_mm(a: Tensor, w: Tensor, offsets: Tensor, backend: str) -> Tensor:
    return get_backend(backend).grouped_mm(a, w, offsets)


@_grouped_mm.register_fake
def _(a, w, offsets, backend):
    return a.new_empty(a.shape[0], w.shape[2])


@torch.library.custom_op("moe_dispatch::grouped_mm_wgrad", mutates_args=())
def _grouped_mm_wgrad(a: Tensor, b: Tensor, offsets: Tensor, num_experts: int, backend: str) -> Tensor:
    return get_backend(backend).grouped_mm_wgrad(a, b, offsets, num_experts)


@_grouped_mm_wgrad.register_fake
def _(a, b, offsets, num_experts, backend):
    return a.new_empty(num_experts, a.shape[1], b.shape[1])


def _grouped_mm_setup(ctx, inputs, output):
    a, w, offsets, ctx.backend = inputs
    ctx.save_for_backward(a, w, offsets)


def _grouped_mm_grad(ctx, dy):
    a, w, offsets = ctx.saved_tensors
    da = _grouped_mm(dy, w.transpose(1, 2), offsets, ctx.backend)
    dw = _grouped_mm_wgrad(a, dy, offsets, w.shape[0], ctx.backend)
    return da, dw, None, None


_grouped_mm.register_autograd(_grouped_mm_grad, setup_context=_grouped_mm_setup)


def grouped_mm(xs: Tensor, w: Tensor, offsets: Tensor, *, backend: str = "auto") -> Tensor:
    """xs: [M, K], w: [E, K, N] (any strides), offsets: [E+1] int -> [M, N].

    Rows offsets[e]:offsets[e+1] are multiplied by w[e] (torch._grouped_mm's semantics with
    offs = offsets[1:]). Pass nn.Linear-layout weights [E, N, K] as w.transpose(1, 2).
    """
    check.floating("xs", xs, ndim=2)
    check.floating("w", w, ndim=3)
    check.same_dtype("w", w, "xs", xs)
    check.same_device("w", w, "xs", xs)
    if w.shape[1] != xs.shape[1]:
        raise ValueError(f"w must be [E, K={xs.shape[1]}, N] to match xs [M, K]; got w of shape {tuple(w.shape)}")
    check.offsets(offsets, xs.shape[0], w.shape[0], xs.device)
    return _grouped_mm(xs, w, offsets, _backend_name(xs.device, backend))


# ---- moe_mlp ------------------------------------------------------------------------------


@torch.library.custom_op("moe_dispatch::moe_mlp", mutates_args=())
def _moe_mlp(
    x: Tensor,
    weights: Tensor,
    counts: Tensor,
    offsets: Tensor,
    token_of_row: Tensor,
    row_of_slot: Tensor,
    w_gate_up: Tensor,
    w_down: Tensor,
    b_gate_up: Optional[Tensor],
    b_down: Optional[Tensor],
    activation: str,
    save_for_backward: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:
    plan = (counts, offsets, token_of_row, row_of_slot)
    return get_backend(backend).moe_mlp(
        x, weights, plan, w_gate_up, w_down, b_gate_up, b_down, activation, save_for_backward
    )


@_moe_mlp.register_fake
def _(x, weights, counts, offsets, token_of_row, row_of_slot, w_gate_up, w_down, b_gate_up, b_down,
      activation, save_for_backward, backend):
    rows = token_of_row.shape[0] if save_for_backward else 0
    return x.new_empty(x.shape), x.new_empty(rows, w_gate_up.shape[1])


@torch.library.custom_op("moe_dispatch::moe_mlp_backward", mutates_args=())
def _moe_mlp_backward(
    dy: Tensor,
    x: Tensor,
    weights: Tensor,
    counts: Tensor,
    offsets: Tensor,
    token_of_row: Tensor,
    row_of_slot: Tensor,
    w_gate_up: Tensor,
    w_down: Tensor,
    b_gate_up: Optional[Tensor],
    b_down: Optional[Tensor],
    activation: str,
    h: Tensor,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    dx, dweights, dw_gate_up, dw_down, db_gate_up, db_down = _backend_mlp_backward(
        backend, dy, x, weights, (counts, offsets, token_of_row, row_of_slot), w_gate_up, w_down, b_gate_up, b_down,
        activation, h,
    )
    none = x.new_empty(0)  # a custom op returns tensors: empty ones for absent biases
    return (
        dx, dweights, dw_gate_up, dw_down,
        none if db_gate_up is None else db_gate_up,
        none.clone() if db_down is None else db_down,
    )


def _backend_mlp_backward(backend, dy, x, weights, plan, w_gate_up, w_down, b_gate_up, b_down, activation, h):
    """The backend's moe_mlp backward, each gradient in its input's dtype; None for absent biases."""
    dx, dweights, dw_gate_up, dw_down, db_gate_up, db_down = get_backend(backend).moe_mlp_backward(
        dy, x, weights, plan, w_gate_up, w_down, b_gate_up, b_down, activation, h
    )
    return (
        dx, dweights.to(weights.dtype), dw_gate_up, dw_down,
        None if b_gate_up is None else db_gate_up.to(b_gate_up.dtype),
        None if b_down is None else db_down.to(b_down.dtype),
    )


@_moe_mlp_backward.register_fake
def _(dy, x, weights, counts, offsets, token_of_row, row_of_slot, w_gate_up, w_down, b_gate_up, b_down,
      activation, h, backend):
    def like(t):
        return t.new_empty(t.shape) if t is not None else x.new_empty(0)

    return like(x), like(weights), like(w_gate_up), like(w_down), like(b_gate_up), like(b_down)


def _moe_mlp_setup(ctx, inputs, output):
    (x, weights, counts, offsets, token_of_row, row_of_slot, w_gate_up, w_down, b_gate_up, b_down,
     ctx.activation, _, ctx.backend) = inputs
    ctx.has_bias = (b_gate_up is not None, b_down is not None)
    ctx.save_for_backward(
        x, weights, counts, offsets, token_of_row, row_of_slot, w_gate_up, w_down, b_gate_up, b_down, output[1]
    )


def _moe_mlp_grad(ctx, dy, _dh):
    x, weights, counts, offsets, token_of_row, row_of_slot, w_gate_up, w_down, b_gate_up, b_down, h = (
        ctx.saved_tensors
    )
    if h.shape[0] != token_of_row.shape[0]:
        raise RuntimeError("moe_mlp ran without saving for backward; call it with autograd enabled")
    dx, dweights, dw_gate_up, dw_down, db_gate_up, db_down = _moe_mlp_backward(
        dy.contiguous(), x, weights, counts, offsets, token_of_row, row_of_slot,
        w_gate_up, w_down, b_gate_up, b_down, ctx.activation, h, ctx.backend,
    )
    return (
        dx, dweights, None, None, None, None, dw_gate_up, dw_down,
        db_gate_up if ctx.has_bias[0] else None,
        db_down if ctx.has_bias[1] else None,
        None, None, None,
    )


_moe_mlp.register_autograd(_moe_mlp_grad, setup_context=_moe_mlp_setup)


class _EagerMoEMLP(torch.autograd.Function):
    """moe_mlp with autograd in eager mode, calling the backend straight: the custom op's
    dispatch each way took a third of a small layer's training step (H=64, E=16: 0.6 of
    1.9 ms)."""

    @staticmethod
    def forward(ctx, x, weights, plan, w_gate_up, w_down, b_gate_up, b_down, activation, backend):
        out, h = get_backend(backend).moe_mlp(x, weights, plan, w_gate_up, w_down, b_gate_up, b_down, activation, True)
        ctx.plan, ctx.activation, ctx.backend = plan, activation, backend
        ctx.save_for_backward(x, weights, w_gate_up, w_down, b_gate_up, b_down, h)
        return out

    @staticmethod
    def backward(ctx, dy):
        x, weights, w_gate_up, w_down, b_gate_up, b_down, h = ctx.saved_tensors
        dx, dweights, dw_gate_up, dw_down, db_gate_up, db_down = _backend_mlp_backward(
            ctx.backend, dy.contiguous(), x, weights, ctx.plan, w_gate_up, w_down, b_gate_up, b_down, ctx.activation, h
        )
        return dx, dweights, None, dw_gate_up, dw_down, db_gate_up, db_down, None, None


def moe_mlp(
    x: Tensor,
    weights: Tensor,
    ids: Tensor,
    w_gate_up: Tensor,
    w_down: Tensor,
    *,
    activation: str = "swiglu",
    b_gate_up: Optional[Tensor] = None,
    b_down: Optional[Tensor] = None,
    plan: Optional[DispatchPlan] = None,
    backend: str = "auto",
) -> Tensor:
    """The routed experts of an MoE layer: out[t] = sum_j weights[t, j] * expert_{ids[t, j]}(x[t]).

    x: [T, H]; weights: [T, k] float; ids: [T, k] int;
    w_gate_up: [E, 2I, H] (gate rows first, then up rows; [E, I, H] for gelu/relu/silu);
    w_down: [E, H, I]; b_gate_up: [E, 2I] or [E, I]; b_down: [E, H].
    expert(v) = w_down[e] @ act(w_gate_up[e] @ v + b_gate_up[e]) + b_down[e].
    plan: the DispatchPlan of ids, when the caller already made it (checked against ids for
    CPU tensors).
    Returns [T, H] in x's dtype.
    """
    check.floating("x", x, ndim=2)
    check.floating("weights", weights, ndim=2)
    check.integer("ids", ids, ndim=2)
    check.same_device("weights", weights, "x", x)
    check.same_device("ids", ids, "x", x)
    if ids.shape[0] != x.shape[0]:
        raise ValueError(f"ids has {ids.shape[0]} tokens but x has {x.shape[0]}")
    check.shape("weights", weights, tuple(ids.shape))
    check.expert_weights(x, w_gate_up, w_down, b_gate_up, b_down, activation)
    name = _backend_name(x.device, backend)
    floating_inputs = (x, weights, w_gate_up, w_down, b_gate_up, b_down)
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in floating_inputs)
    if plan is None:
        check.expert_ids(ids, w_gate_up.shape[0])
        if not save and _direct(*floating_inputs, ids):
            out = get_backend(name).moe_mlp_from_ids(
                x, weights, ids, w_gate_up.shape[0], w_gate_up, w_down, b_gate_up, b_down, activation
            )
            if out is not None:
                return out
        plan = _plan(ids, w_gate_up.shape[0], name)
    else:
        check.plan(plan, "x", x)
        if tuple(plan.row_of_slot.shape) != tuple(ids.shape) or plan.num_experts != w_gate_up.shape[0]:
            raise ValueError(
                f"plan was made for ids {tuple(plan.row_of_slot.shape)} and {plan.num_experts} experts, "
                f"not ids {tuple(ids.shape)} and {w_gate_up.shape[0]} experts"
            )
        check.expert_id_values(ids, w_gate_up.shape[0])
        check.plan_values(plan, ids)
    plan_tensors = (plan.counts, plan.offsets, plan.token_of_row, plan.row_of_slot)
    if _direct(*floating_inputs, *plan_tensors):
        if save:
            return _EagerMoEMLP.apply(x, weights, plan_tensors, w_gate_up, w_down, b_gate_up, b_down, activation, name)
        out, _ = get_backend(name).moe_mlp(x, weights, plan_tensors, w_gate_up, w_down, b_gate_up, b_down, activation,
                                           False)
        return out
    out, _ = _moe_mlp(
        x, weights, plan.counts, plan.offsets, plan.token_of_row, plan.row_of_slot,
        w_gate_up, w_down, b_gate_up, b_down, activation, save, name,
    )
    return out


__all__ = ["route", "make_plan", "permute", "unpermute", "grouped_mm", "moe_mlp"]
