"""route: the choice and the weights of the real models' routers."""

import math

import pytest
import torch

import moe_dispatch as md
from reference import naive_route


def _logit(p):
    return math.log(p / (1 - p))


def test_mixtral_hand_worked(backend):
    # softmax, top-2, renormalized: softmax over the two best logits.
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    weights, ids = md.route(logits, 2, backend=backend)
    assert ids.tolist() == [[1, 2]]
    e = math.e
    torch.testing.assert_close(weights, torch.tensor([[e / (e + 1), 1 / (e + 1)]]))


def test_olmoe_hand_worked_no_renormalize(backend):
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    weights, ids = md.route(logits, 2, renormalize=False, backend=backend)
    total = math.exp(1) + math.exp(3) + math.exp(2) + 1
    assert ids.tolist() == [[1, 2]]
    torch.testing.assert_close(weights, torch.tensor([[math.exp(3) / total, math.exp(2) / total]]))


# DeepSeek-V3 style: 8 experts in 4 groups of 2, keep 2 groups, top-2, sigmoid, scale 2.5.
DS_SCORES = [0.9, 0.1, 0.6, 0.5, 0.8, 0.7, 0.2, 0.3]
DS_BIAS = [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.5, 0.45]


def _deepseek_route(bias, backend):
    logits = torch.tensor([[_logit(p) for p in DS_SCORES]])
    return md.route(logits, 2, scoring="sigmoid", bias=bias, n_groups=4, topk_groups=2, scale=2.5, backend=backend)


def test_deepseek_hand_worked(backend):
    # Biased scores 0.9 .1 | .6 .5 | .8 .7 | .7 .75: group sums 1.0, 1.1, 1.5, 1.45 keep groups
    # 2 and 3, so expert 0 (the best single score) is out; experts 4 (0.8) and 7 (0.75) win.
    # Weights use the unbiased scores 0.8 and 0.3, renormalized, times 2.5.
    weights, ids = _deepseek_route(torch.tensor(DS_BIAS), backend)
    assert ids.tolist() == [[4, 7]]
    torch.testing.assert_close(weights, torch.tensor([[2.5 * 0.8 / 1.1, 2.5 * 0.3 / 1.1]]))


def test_deepseek_bias_changes_choice_only(backend):
    # Without the bias, groups 2 (1.5) and 1 (1.1) win and experts 4 and 5 are chosen.
    weights, ids = _deepseek_route(None, backend)
    assert ids.tolist() == [[4, 5]]
    torch.testing.assert_close(weights, torch.tensor([[2.5 * 0.8 / 1.5, 2.5 * 0.7 / 1.5]]))


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param(dict(), id="softmax-renorm"),
        pytest.param(dict(scale=2.5), id="softmax-renorm-scaled"),
        pytest.param(dict(renormalize=False), id="softmax-raw"),
        pytest.param(dict(scoring="sigmoid", scale=2.5), id="sigmoid-scaled"),
        pytest.param(dict(scoring="sigmoid", n_groups=4, topk_groups=2, bias=True), id="grouped-biased"),
        pytest.param(dict(n_groups=8, topk_groups=3), id="groups-of-one"),
    ],
)
def test_matches_naive_route(backend, kwargs, gen):
    logits = torch.randn(13, 8, generator=gen)
    if kwargs.get("bias"):
        kwargs = dict(kwargs, bias=torch.randn(8, generator=gen) * 0.1)
    weights, ids = md.route(logits, 3, backend=backend, **kwargs)
    ref_weights, ref_ids = naive_route(logits, 3, **kwargs)
    assert torch.equal(ids, ref_ids)
    assert weights.dtype == torch.float32
    torch.testing.assert_close(weights.double(), ref_weights, rtol=1e-6, atol=1e-6)


def test_logits_in_half_precision_route_in_float32(backend, gen):
    logits = torch.randn(5, 6, generator=gen).bfloat16()
    weights, ids = md.route(logits, 2, backend=backend)
    ref_weights, ref_ids = naive_route(logits.float(), 2)
    assert weights.dtype == torch.float32 and torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights.double(), ref_weights)


@pytest.mark.parametrize("renormalize", [True, False], ids=["renormalized", "raw"])
def test_experts_far_below_the_best_keep_their_rank(backend, renormalize):
    # Their float32 softmax scores all underflow to 0, yet the choice is by the logits.
    logits = torch.tensor([[-300.0, 0.0, -200.0, -250.0]])
    weights, ids = md.route(logits, 3, renormalize=renormalize, backend=backend)
    assert ids.tolist() == [[1, 2, 3]]
    assert weights.tolist() == [[1.0, 0.0, 0.0]]


def test_empty_batch(backend):
    weights, ids = md.route(torch.zeros(0, 8), 2, backend=backend)
    assert weights.shape == ids.shape == (0, 2)


def test_gradient_flows_to_logits_not_bias(gen):
    logits = torch.randn(4, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(8, dtype=torch.float64, requires_grad=True)
    weights, _ = md.route(logits, 2, scoring="sigmoid", bias=bias)
    (weights * torch.randn_like(weights)).sum().backward()
    assert logits.grad.abs().sum() > 0
    assert bias.grad is None
    for renormalize in (True, False):
        torch.autograd.gradcheck(lambda z: md.route(z, 2, renormalize=renormalize)[0],
                                 (logits.detach().requires_grad_(),))
