"""The public functions: validate, pick the backend, call it. Autograd lives here.

Each op is a torch custom op (torch.library) that takes the resolved backend's name, so
torch.compile (through the fake implementations) and every backend share one definition;
backward formulas call custom ops too, so compiled backward graphs trace. In plain eager
mode (see eager_direct) make_plan and moe_mlp call the backend straight: a custom op's
dispatch costs more than a small step's kernels. moe_mlp's autograd is one
torch.autograd.Function over either route, so its backward is defined once.
"""

from typing import Callable, Optional, Union

import torch
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from . import formats
from . import validation as check
from .backends import get_backend
from .backends.base import ExpertGrads
from .backends import resolve_backend as _backend_name
from .experts import ExpertWeights
from .formats import Weight
from .formats.quantized import QuantizedWeight, Transposed
from .plan import DispatchPlan

Tensor = torch.Tensor


def eager_direct(*tensors: Optional[Tensor]) -> bool:
    """Whether a call may skip its custom op and call the backend: in eager mode, on plain
    tensors or parameters, with no torch function or dispatch mode active. The custom op's
    dispatch costs more than a small step's kernels when caches are cold (a decode step
    between other layers); tracing, fake and meta tensors, modes and other subclasses go
    through it."""
    if torch.compiler.is_compiling() or is_in_torch_dispatch_mode() or torch._C._is_torch_function_mode_enabled():
        return False
    return all(t is None or type(t) in (torch.Tensor, torch.nn.Parameter) for t in tensors)


# ---- make_plan ----------------------------------------------------------------------------


@torch.library.custom_op("moe_dispatch::make_plan", mutates_args=())
def _make_plan(ids: Tensor, num_experts: int, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return get_backend(backend).make_plan(ids, num_experts).tensors()


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
    if eager_direct(ids):
        backend = get_backend(backend_name)
        if not backend.refuses_bad_ids:
            check.expert_id_values(ids, num_experts)
        return backend.make_plan(ids, num_experts)
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


@torch.library.custom_op("moe_dispatch::grouped_mm_quantized", mutates_args=())
def _grouped_mm_quantized(a: Tensor, w: list[Tensor], spec: str, offsets: Tensor, transposed: bool,
                          backend: str) -> Tensor:
    return get_backend(backend).grouped_mm_quantized(a, formats.unflatten(w, spec), offsets, transposed)


@_grouped_mm_quantized.register_fake
def _(a, w, spec, offsets, transposed, backend):
    _, out_features, in_features = formats.unflatten(w, spec).shape
    return a.new_empty(a.shape[0], out_features if transposed else in_features)


def _grouped_mm_quantized_setup(ctx, inputs, output):
    _, ctx.w, ctx.spec, _, ctx.transposed, ctx.backend = inputs
    ctx.save_for_backward(inputs[3])


def _grouped_mm_quantized_grad(ctx, dy):
    (offsets,) = ctx.saved_tensors
    da = _grouped_mm_quantized(dy.contiguous(), ctx.w, ctx.spec, offsets, not ctx.transposed, ctx.backend)
    return da, [None] * len(ctx.w), None, None, None, None


_grouped_mm_quantized.register_autograd(_grouped_mm_quantized_grad, setup_context=_grouped_mm_quantized_setup)


def grouped_mm(xs: Tensor, w: Union[Tensor, Transposed, QuantizedWeight], offsets: Tensor, *,
               backend: str = "auto") -> Tensor:
    """xs: [M, K], w: [E, K, N] (any strides), offsets: [E+1] int -> [M, N].

    Rows offsets[e]:offsets[e+1] are multiplied by w[e] (torch._grouped_mm's semantics with
    offs = offsets[1:]). Pass nn.Linear-layout weights [E, N, K] as w.transpose(1, 2), and a
    quantized one as q.mT (a quantized weight is frozen: the gradient reaches xs only).
    """
    if isinstance(w, (Transposed, QuantizedWeight)):
        return _grouped_mm_on_quantized(xs, w, offsets, backend)
    check.floating("xs", xs, ndim=2)
    check.floating("w", w, ndim=3)
    check.same_dtype("w", w, "xs", xs)
    check.same_device("w", w, "xs", xs)
    if w.shape[1] != xs.shape[1]:
        raise ValueError(f"w must be [E, K={xs.shape[1]}, N] to match xs [M, K]; got w of shape {tuple(w.shape)}")
    check.offsets(offsets, xs.shape[0], w.shape[0], xs.device)
    return _grouped_mm(xs, w, offsets, _backend_name(xs.device, backend))


def _grouped_mm_on_quantized(xs, w, offsets, backend) -> Tensor:
    transposed = isinstance(w, Transposed)
    weight = w.weight if transposed else w
    check.floating("xs", xs, ndim=2)
    weight.check("w", xs)
    if w.shape[1] != xs.shape[1]:
        raise ValueError(f"w must be [E, K={xs.shape[1]}, N] to match xs [M, K]; got w of shape {tuple(w.shape)}"
                         + ("" if transposed else " (pass q.mT for xs @ q[e].T)"))
    check.offsets(offsets, xs.shape[0], w.shape[0], xs.device)
    tensors, spec = formats.flatten(weight)
    return _grouped_mm_quantized(xs, tensors, spec, offsets, transposed, _backend_name(xs.device, backend))


# ---- moe_mlp ------------------------------------------------------------------------------
# The custom ops carry the experts as ExpertWeights.flatten() gives them: a list of tensors
# and a string spec.


@torch.library.custom_op("moe_dispatch::moe_mlp", mutates_args=())
def _moe_mlp(
    x: Tensor, weights: Tensor, counts: Tensor, offsets: Tensor, token_of_row: Tensor, row_of_slot: Tensor,
    experts: list[Tensor], spec: str, save_for_backward: bool, backend: str,
) -> tuple[Tensor, Tensor]:
    plan = DispatchPlan(counts, offsets, token_of_row, row_of_slot)
    return get_backend(backend).moe_mlp(x, weights, plan, ExpertWeights.unflatten(experts, spec), save_for_backward)


@_moe_mlp.register_fake
def _(x, weights, counts, offsets, token_of_row, row_of_slot, experts, spec, save_for_backward, backend):
    rows = token_of_row.shape[0] if save_for_backward else 0
    return x.new_empty(x.shape), x.new_empty(rows, ExpertWeights.unflatten(experts, spec).w_gate_up.shape[1])


@torch.library.custom_op("moe_dispatch::moe_mlp_backward", mutates_args=())
def _moe_mlp_backward(
    dy: Tensor, x: Tensor, weights: Tensor, counts: Tensor, offsets: Tensor, token_of_row: Tensor,
    row_of_slot: Tensor, experts: list[Tensor], spec: str, h: Tensor, backend: str,
) -> list[Tensor]:
    plan = DispatchPlan(counts, offsets, token_of_row, row_of_slot)
    grads = _backward(backend, dy, x, weights, plan, ExpertWeights.unflatten(experts, spec), h)
    return [x.new_empty(0) if g is None else g for g in grads]  # a custom op returns tensors: empty for none


@_moe_mlp_backward.register_fake
def _(dy, x, weights, counts, offsets, token_of_row, row_of_slot, experts, spec, h, backend):
    unflat = ExpertWeights.unflatten(experts, spec)
    like = [None if t is None else t.new_empty(t.shape) for t in unflat.grad_targets()]
    grads = unflat.flat_grads(ExpertGrads(x, weights, *like))
    return [x.new_empty(x.shape), weights.new_empty(weights.shape)] + [x.new_empty(0) if g is None else g for g in grads]


def _backward(backend: str, dy, x, weights, plan, experts, h) -> list[Optional[Tensor]]:
    """[dx, d weights, then a gradient (or None) for each tensor of experts.flatten()], each in its input's dtype."""
    if h.shape[0] != plan.num_rows:
        raise RuntimeError("moe_mlp ran without saving for backward; call it with autograd enabled")
    grads = get_backend(backend).moe_mlp_backward(dy, x, weights, plan, experts, h)
    b_gate_up, b_down = experts.b_gate_up, experts.b_down
    grads = grads._replace(
        weights=grads.weights.to(weights.dtype),
        b_gate_up=None if b_gate_up is None else grads.b_gate_up.to(b_gate_up.dtype),
        b_down=None if b_down is None else grads.b_down.to(b_down.dtype),
    )
    return [grads.x, grads.weights, *experts.flat_grads(grads)]


def _forward(x, weights, plan, experts, flat, spec, backend, save, direct) -> tuple[Tensor, Tensor]:
    """(out, h): the backend's moe_mlp, called straight (direct) or through the custom op."""
    if direct:
        return get_backend(backend).moe_mlp(x, weights, plan, experts, save)
    return _moe_mlp(x, weights, *plan.tensors(), flat, spec, save, backend)


class _MoEMLP(torch.autograd.Function):
    """moe_mlp with autograd: one backward, over the backend (eager) or the custom ops
    (compiled graphs, modes). experts is the ExpertWeights when direct, else None (the custom
    ops rebuild it from flat and spec)."""

    @staticmethod
    def forward(ctx, x, weights, counts, offsets, token_of_row, row_of_slot, experts, spec, backend, direct, *flat):
        plan = DispatchPlan(counts, offsets, token_of_row, row_of_slot)
        out, h = _forward(x, weights, plan, experts, list(flat), spec, backend, True, direct)
        ctx.experts, ctx.spec, ctx.backend, ctx.direct = experts, spec, backend, direct
        ctx.save_for_backward(x, weights, counts, offsets, token_of_row, row_of_slot, h, *flat)
        return out

    @staticmethod
    def backward(ctx, dy):
        x, weights, counts, offsets, token_of_row, row_of_slot, h, *flat = ctx.saved_tensors
        if ctx.direct:
            plan = DispatchPlan(counts, offsets, token_of_row, row_of_slot)
            grads = _backward(ctx.backend, dy.contiguous(), x, weights, plan, ctx.experts, h)
        else:
            grads = _moe_mlp_backward(dy.contiguous(), x, weights, counts, offsets, token_of_row, row_of_slot, flat,
                                      ctx.spec, h, ctx.backend)
            grads = [g if g.numel() or t.numel() == 0 else None for g, t in zip(grads, [x, weights, *flat])]
        dx, dweights, *dflat = grads
        return (dx, dweights, None, None, None, None, None, None, None, None, *dflat)


def moe_mlp(
    x: Tensor,
    weights: Tensor,
    ids: Tensor,
    w_gate_up: Union[Weight, ExpertWeights],
    w_down: Optional[Weight] = None,
    *,
    activation: Optional[str] = None,
    b_gate_up: Optional[Tensor] = None,
    b_down: Optional[Tensor] = None,
    plan: Optional[DispatchPlan] = None,
    backend: str = "auto",
) -> Tensor:
    """The routed experts of an MoE layer: out[t] = sum_j weights[t, j] * expert_{ids[t, j]}(x[t]).

    x: [T, H]; weights: [T, k] float; ids: [T, k] int;
    w_gate_up: [E, 2I, H] (gate rows first, then up rows; [E, I, H] for gelu/relu/silu);
    w_down: [E, H, I]; b_gate_up: [E, 2I] or [E, I]; b_down: [E, H]; activation: "swiglu" when
    not given (see activations.ACTIVATIONS).
    expert(v) = w_down[e] @ act(w_gate_up[e] @ v + b_gate_up[e]) + b_down[e].
    Or the experts as one ExpertWeights in w_gate_up's place, with none of w_down, activation
    and the biases.
    plan: the DispatchPlan of ids, when the caller already made it (checked against ids for
    CPU tensors).
    Returns [T, H] in x's dtype.
    """
    experts = _expert_weights(w_gate_up, w_down, b_gate_up, b_down, activation)
    check.floating("x", x, ndim=2)
    check.floating("weights", weights, ndim=2)
    check.integer("ids", ids, ndim=2)
    check.same_device("weights", weights, "x", x)
    check.same_device("ids", ids, "x", x)
    if ids.shape[0] != x.shape[0]:
        raise ValueError(f"ids has {ids.shape[0]} tokens but x has {x.shape[0]}")
    check.shape("weights", weights, tuple(ids.shape))
    check.experts_take(x, experts)
    name = _backend_name(x.device, backend)
    num_experts = experts.num_experts
    flat, spec = experts.flatten()
    floating_inputs = (x, weights, *flat)
    save = torch.is_grad_enabled() and any(t.requires_grad for t in floating_inputs)
    if plan is None:
        check.expert_ids(ids, num_experts)
        if not save and eager_direct(*floating_inputs, ids):
            out = get_backend(name).moe_mlp_from_ids(x, weights, ids, experts)
            if out is not None:
                return out
        plan = _plan(ids, num_experts, name)
    else:
        check.plan(plan, "x", x)
        if tuple(plan.row_of_slot.shape) != tuple(ids.shape) or plan.num_experts != num_experts:
            raise ValueError(
                f"plan was made for ids {tuple(plan.row_of_slot.shape)} and {plan.num_experts} experts, "
                f"not ids {tuple(ids.shape)} and {num_experts} experts"
            )
        check.expert_id_values(ids, num_experts)
        check.plan_values(plan, ids)
    direct = eager_direct(*floating_inputs, *plan.tensors())
    if not save:
        return _forward(x, weights, plan, experts, flat, spec, name, False, direct)[0]
    return _MoEMLP.apply(x, weights, *plan.tensors(), experts if direct else None, spec, name, direct, *flat)


def routed_decode_step(x: Tensor, router: Tensor, top_k: int, experts: ExpertWeights, *, backend: str = "auto",
                       **route_options) -> Optional[Callable[[Tensor], Optional[Tensor]]]:
    """The backend's decode step for activations like x [T, H] (Backend.routed_decode): a
    function of x that computes moe_mlp(x, *route(x.float() @ router.T, top_k,
    **route_options), experts) in one call of the backend, or returns None where that call
    takes no such step; None where the backend has none. router: [E, H] float32. The MoE
    layer's decode step: its routing's torch operations cost more than their arithmetic on
    cold caches. The caller prepares a step once and keeps it while router and experts stay
    as they are, and calls it only without autograd and where eager_direct holds."""
    check.floating("x", x, ndim=2)
    check.experts_take(x, experts)
    return get_backend(_backend_name(x.device, backend)).routed_decode(x, router, top_k, experts, **route_options)


def _expert_weights(w_gate_up, w_down, b_gate_up, b_down, activation) -> ExpertWeights:
    """The experts moe_mlp was given, as one ExpertWeights."""
    if isinstance(w_gate_up, ExpertWeights):
        given = [n for n, v in (("w_down", w_down), ("activation", activation), ("b_gate_up", b_gate_up),
                                ("b_down", b_down)) if v is not None]
        if given:
            raise TypeError(f"moe_mlp takes the experts as one ExpertWeights or as tensors, not both; "
                            f"drop {', '.join(given)} (the ExpertWeights holds them)")
        return w_gate_up
    if w_down is None:
        raise TypeError("moe_mlp needs w_down beside w_gate_up (or one ExpertWeights in w_gate_up's place)")
    return ExpertWeights(w_gate_up, w_down, b_gate_up, b_down, "swiglu" if activation is None else activation)


__all__ = ["make_plan", "permute", "unpermute", "grouped_mm", "moe_mlp"]
