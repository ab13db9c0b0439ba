"""The MoE layer: shapes, routing, aux losses, balancing, training."""

import pytest
import torch
from torch import nn

import moe_dispatch as md
from conftest import assert_close, skip_if_unsupported
from reference import naive_moe_mlp, naive_route


def _layer(backend, **kwargs):
    torch.manual_seed(0)
    args = dict(hidden_size=16, intermediate_size=12, num_experts=6, top_k=2, backend=backend)
    return md.MoE(**dict(args, **kwargs))


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param(dict(), id="mixtral-like"),
        pytest.param(dict(renormalize=False, activation="geglu"), id="olmoe-like-geglu"),
        pytest.param(dict(scoring="sigmoid", n_groups=3, topk_groups=2, routed_scaling=2.5, n_shared_experts=1),
                     id="deepseek-like"),
        pytest.param(dict(activation="gelu", bias=True, top_k=3), id="plain-gelu-bias"),
    ],
)
def test_matches_naive_layer(backend, kwargs, gen):
    layer = _layer(backend, **kwargs)
    if layer.scoring == "sigmoid":
        layer.expert_bias.copy_(torch.randn(6, generator=gen) * 0.05)
    x = torch.randn(2, 5, 16, generator=gen)
    out = layer(x)
    assert out.shape == x.shape and out.dtype == x.dtype

    flat = x.reshape(-1, 16)
    logits = (flat @ layer.router.weight.T).detach()
    weights, ids = naive_route(
        logits, layer.top_k, layer.scoring, layer.renormalize,
        layer.expert_bias if layer.scoring == "sigmoid" else None,
        layer.n_groups, layer.topk_groups, layer.routed_scaling,
    )
    expected = naive_moe_mlp(flat, weights, ids, layer.w_gate_up.detach(), layer.w_down.detach(),
                             layer.b_gate_up, layer.b_down, layer.activation)
    if layer.shared_experts is not None:
        expected = expected + layer.shared_experts(flat).double()
    assert_close(out.reshape(-1, 16).detach(), expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_half_precision_layer_routes_in_float32(backend, dtype, gen):
    skip_if_unsupported(backend, dtype)
    layer = _layer(backend, dtype=dtype)
    x = torch.randn(7, 16, generator=gen).to(dtype)
    assert layer.router_logits(x).dtype == torch.float32
    out, aux = layer(x, return_aux=True)
    assert out.dtype == dtype and out.shape == x.shape
    assert aux.load_balancing_loss.dtype == torch.float32


def test_aux_losses_and_counts(gen):
    layer = _layer("torch")
    x = torch.randn(40, 16, generator=gen)
    out, aux = layer(x, return_aux=True)
    logits = layer.router_logits(x)
    ids = logits.topk(2).indices
    counts = torch.bincount(ids.flatten(), minlength=6)
    assert aux.counts.tolist() == counts.tolist()
    share = counts.float() / 80
    expected_lb = 6 * (share * logits.softmax(-1).mean(0)).sum()
    torch.testing.assert_close(aux.load_balancing_loss, expected_lb)
    torch.testing.assert_close(aux.z_loss, (torch.logsumexp(logits, -1) ** 2).mean())
    # both losses reach the router
    (aux.load_balancing_loss + aux.z_loss).backward()
    assert layer.router.weight.grad.abs().sum() > 0


def test_balanced_routing_has_unit_load_balancing_loss():
    # Uniform probabilities and equal counts: E * sum(1/E * 1/E) = 1.
    layer = _layer("torch", num_experts=4, top_k=1)
    with torch.no_grad():
        layer.router.weight.zero_()
    _, aux = layer(torch.randn(8, 16), return_aux=True)
    torch.testing.assert_close(aux.load_balancing_loss, torch.tensor(1.0))


def test_expert_bias_balances_sigmoid_routing(gen):
    layer = _layer("torch", scoring="sigmoid", num_experts=4, top_k=1)
    with torch.no_grad():
        layer.router.weight.normal_(0, 0.3, generator=gen)
        layer.router.weight[0] += 1.0  # expert 0 wins for positive inputs
    x = torch.randn(64, 16, generator=gen).abs()
    _, aux = layer(x, return_aux=True)
    assert aux.counts[0] == 64
    for _ in range(200):
        layer.update_expert_bias(aux.counts, rate=0.02)
        _, aux = layer(x, return_aux=True)
    assert aux.counts.max() <= 32
    assert layer.expert_bias[0] < 0


def test_expert_bias_ignored_for_softmax(gen):
    layer = _layer("torch")
    x = torch.randn(5, 16, generator=gen)
    before = layer(x)
    layer.expert_bias.fill_(10.0)
    layer.expert_bias[0] = -10.0
    torch.testing.assert_close(layer(x), before)


def test_empty_batch(backend):
    layer = _layer(backend, n_shared_experts=1)
    out, aux = layer(torch.randn(0, 3, 16), return_aux=True)
    assert out.shape == (0, 3, 16)
    assert aux.counts.tolist() == [0] * 6
    out.sum().backward()


def test_input_is_not_modified(backend, gen):
    x = torch.randn(4, 16, generator=gen)
    before = x.clone()
    _layer(backend)(x)
    assert torch.equal(x, before)


class Block(nn.Module):
    """A pre-norm transformer block with the MoE as its feed-forward."""

    def __init__(self, backend):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.norm1, self.norm2 = nn.LayerNorm(16), nn.LayerNorm(16)
        self.moe = _layer(backend)

    def forward(self, x):
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        out, aux = self.moe(self.norm2(x), return_aux=True)
        return x + out, aux


def test_trains_inside_a_transformer_block(backend, gen):
    block = Block(backend)
    x = torch.randn(4, 6, 16, generator=gen)
    target = torch.randn(4, 6, 16, generator=gen)
    opt = torch.optim.Adam(block.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        out, aux = block(x)
        loss = (out - target).pow(2).mean() + 1e-2 * aux.load_balancing_loss + 1e-3 * aux.z_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    assert all(p.grad is not None for p in block.moe.parameters())
