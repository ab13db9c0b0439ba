"""Routing: choose each token's top-k experts from the router's logits.

Routing is a few vectorized tensor operations over [T, E] scores, the same PyTorch code on
every backend and every device: `backend` is checked like every op's, and routing never syncs
with the host. (The MoE layer's decode step on the numba backend makes the same choice inside
its experts' call, kernels/numba/routing.py, where these operations cost more than the step's
arithmetic.)
"""

from typing import Optional

import torch

from . import validation as check
from .backends import resolve_backend

Tensor = torch.Tensor


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
    Returns weights [T, k] float32 (float64 for float64 logits): the chosen scores,
    renormalized to sum to one if asked, times scale; and ids [T, k] int64. With n_groups, only the topk_groups best groups
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
    resolve_backend(logits.device, backend)  # a bad or unavailable backend fails here as in every op

    # At least float32 whatever the logits' dtype; float64 stays float64 (gradcheck).
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if scoring == "softmax" and bias is None and n_groups is None:
        # The softmax's top-k are the logits' top-k, and renormalized they are the softmax of
        # the top-k logits: two or three ops where the general path takes eight (a decode
        # step's routing is all op overhead), and no ties among scores that underflow.
        best, ids = logits.topk(top_k, dim=-1)
        weights = best.softmax(-1) if renormalize else logits.softmax(-1).gather(1, ids)
    else:
        weights, ids = _chosen_scores(logits, top_k, scoring, renormalize, bias, n_groups, topk_groups)
    return (weights if scale == 1.0 else weights * scale), ids


def _chosen_scores(logits, top_k, scoring, renormalize, bias, n_groups, topk_groups) -> tuple[Tensor, Tensor]:
    """route's weights before the scale, and its ids: the general path."""
    num_tokens, num_experts = logits.shape
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
    return weights, ids
