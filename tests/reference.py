"""The one naive MoE: loops per token and per expert, in float64. Ground truth for every backend.

Shared with benchmarks/ so the numbers and the tests check the same definition.
"""

from __future__ import annotations

import torch

from moe_dispatch.activations import ACTIVATIONS

Tensor = torch.Tensor


def naive_plan(ids: Tensor, num_experts: int):
    """(counts, offsets, token_of_row, row_of_slot) as Python lists, by walking the slots."""
    num_tokens, top_k = ids.shape
    rows_of_expert = [[] for _ in range(num_experts)]
    for t in range(num_tokens):
        for j in range(top_k):
            rows_of_expert[int(ids[t, j])].append((t, j))
    counts = [len(r) for r in rows_of_expert]
    offsets = [0]
    for c in counts:
        offsets.append(offsets[-1] + c)
    token_of_row, row_of_slot = [], [[0] * top_k for _ in range(num_tokens)]
    for slots in rows_of_expert:
        for t, j in slots:
            row_of_slot[t][j] = len(token_of_row)
            token_of_row.append(t)
    return counts, offsets, token_of_row, row_of_slot


def naive_expert(x: Tensor, w_gate_up: Tensor, w_down: Tensor, b_gate_up, b_down, activation: str,
                 interleaved: bool = False) -> Tensor:
    """One token through one expert, float64: w_down @ act(w_gate_up @ x + b) + b_down, the
    activation by its registry entry's definition (tests/test_activations.py checks those
    against torch's own functions and the models' code); a gated one reads the gate rows
    first, then the up rows, or the two alternating when interleaved.

    Differentiable, so autograd through this loop gives the reference gradients.
    """
    h = w_gate_up.double() @ x.double()
    if b_gate_up is not None:
        h = h + b_gate_up.double()
    entry = ACTIVATIONS[activation]
    if not entry.gated:
        a = entry.forward(h, None)
    elif interleaved:
        a = entry.forward(h[0::2], h[1::2])
    else:
        a = entry.forward(h[: h.shape[0] // 2], h[h.shape[0] // 2:])
    out = w_down.double() @ a
    if b_down is not None:
        out = out + b_down.double()
    return out


def naive_moe_mlp(x, weights, ids, w_gate_up, w_down, b_gate_up=None, b_down=None, activation="swiglu",
                  interleaved=False) -> Tensor:
    """[T, H] float64: out[t] = sum_j weights[t, j] * expert_{ids[t, j]}(x[t]) (differentiable)."""
    num_tokens, top_k = ids.shape
    rows = []
    for t in range(num_tokens):
        acc = torch.zeros(x.shape[1], dtype=torch.float64)
        for j in range(top_k):
            e = int(ids[t, j])
            acc = acc + weights[t, j].double() * naive_expert(
                x[t], w_gate_up[e], w_down[e],
                None if b_gate_up is None else b_gate_up[e],
                None if b_down is None else b_down[e], activation, interleaved,
            )
        rows.append(acc)
    return torch.stack(rows) if rows else torch.zeros(0, x.shape[1], dtype=torch.float64)


def naive_grouped_mm(xs: Tensor, w: Tensor, offsets) -> Tensor:
    """[M, N] float64: rows offsets[e]:offsets[e+1] times w[e], one row at a time (differentiable)."""
    offsets = [int(o) for o in offsets]
    rows = [xs[r].double() @ w[e].double() for e in range(w.shape[0]) for r in range(offsets[e], offsets[e + 1])]
    return torch.stack(rows) if rows else torch.zeros(0, w.shape[2], dtype=torch.float64)


def naive_route(logits: Tensor, top_k: int, scoring="softmax", renormalize=True, bias=None,
                n_groups=None, topk_groups=None, scale=1.0):
    """(weights [T, k] float64, ids [T, k]) one token at a time: the bias shifts the choice, never
    the weights; with n_groups, only the topk_groups groups whose two best biased scores sum
    highest compete (DeepSeek-V3); the chosen scores are renormalized if asked, then scaled."""
    num_tokens, num_experts = logits.shape
    all_weights, all_ids = [], []
    for t in range(num_tokens):
        row = logits[t].double()
        scores = row.softmax(-1) if scoring == "softmax" else row.sigmoid()
        choice = [float(scores[e]) + (float(bias[e]) if bias is not None else 0.0) for e in range(num_experts)]
        allowed = set(range(num_experts))
        if n_groups is not None:
            size = num_experts // n_groups
            group_scores = []
            for g in range(n_groups):
                best = sorted(choice[g * size:(g + 1) * size], reverse=True)[:2]
                group_scores.append((sum(best), g))
            kept = [g for _, g in sorted(group_scores, key=lambda s: -s[0])[:topk_groups]]
            allowed = {g * size + i for g in kept for i in range(size)}
        chosen = sorted(allowed, key=lambda e: -choice[e])[:top_k]
        w = [float(scores[e]) for e in chosen]
        if renormalize:
            total = sum(w)
            w = [v / total for v in w]
        all_weights.append([v * scale for v in w])
        all_ids.append(chosen)
    weights = torch.tensor(all_weights, dtype=torch.float64).view(num_tokens, top_k)
    return weights, torch.tensor(all_ids).view(num_tokens, top_k)


def naive_permute(x: Tensor, token_of_row) -> Tensor:
    return torch.stack([x[int(t)] for t in token_of_row]) if len(token_of_row) else x[:0]


def naive_unpermute(ys: Tensor, row_of_slot, weights=None) -> Tensor:
    """[T, N] float64: y[t] = sum_j weights[t, j] * ys[row_of_slot[t][j]] (differentiable)."""
    rows = []
    for t, slots in enumerate(row_of_slot):
        acc = torch.zeros(ys.shape[1], dtype=torch.float64)
        for j, r in enumerate(slots):
            w = weights[t, j].double() if weights is not None else 1.0
            acc = acc + w * ys[int(r)].double()
        rows.append(acc)
    return torch.stack(rows) if rows else torch.zeros(0, ys.shape[1], dtype=torch.float64)
