"""Every bad input raises ValueError or TypeError naming the argument and the value."""

import re
from dataclasses import replace

import pytest
import torch

import moe_dispatch as md

T, K, E, H, I = 6, 2, 4, 8, 5


@pytest.fixture
def good(gen):
    ids = torch.rand(T, E, generator=gen).topk(K).indices
    return dict(
        x=torch.randn(T, H, generator=gen),
        weights=torch.rand(T, K, generator=gen),
        ids=ids,
        w_gate_up=torch.randn(E, 2 * I, H, generator=gen),
        w_down=torch.randn(E, H, I, generator=gen),
        plan=md.make_plan(ids, E),
    )


def _mlp(g, **override):
    args = dict(g, **override)
    if "plan" not in override:
        del args["plan"]
    x, weights, ids, w_gate_up, w_down = (args.pop(n) for n in ("x", "weights", "ids", "w_gate_up", "w_down"))
    return md.moe_mlp(x, weights, ids, w_gate_up, w_down, **args)


BAD_MOE_MLP = [
    # (override, error type, words the message must contain)
    pytest.param(dict(x=torch.randn(T, H + 1)), ValueError, ["w_gate_up", str(H + 1)], id="x-hidden-mismatch"),
    pytest.param(dict(x=torch.randn(T, H, 1)), ValueError, ["x", "2-D"], id="x-3d"),
    pytest.param(dict(x=torch.randint(0, 3, (T, H))), TypeError, ["x", "int64"], id="x-int"),
    pytest.param(dict(weights=torch.rand(T, K + 1)), ValueError, ["weights", str(K + 1)], id="weights-shape"),
    pytest.param(dict(ids=torch.rand(T, K)), TypeError, ["ids", "float32"], id="ids-float"),
    pytest.param(dict(ids=torch.full((T, K), E)), ValueError, ["ids", str(E)], id="id-too-big"),
    pytest.param(dict(ids=torch.full((T, K), -1)), ValueError, ["ids", "-1"], id="id-negative"),
    pytest.param(dict(ids=torch.zeros(T + 1, K, dtype=torch.long)), ValueError, ["ids", str(T + 1)], id="ids-tokens"),
    pytest.param(dict(w_gate_up=torch.randn(E, 2 * I, H).double()), TypeError, ["w_gate_up", "float64"], id="w-dtype"),
    pytest.param(dict(w_gate_up=torch.randn(E, 2 * I + 1, H)), ValueError, ["w_gate_up", str(2 * I + 1)], id="w-odd"),
    pytest.param(dict(w_down=torch.randn(E, H, I + 1)), ValueError, ["w_down", str(I + 1)], id="w-down-shape"),
    pytest.param(dict(w_down=torch.randn(E + 1, H, I)), ValueError, ["w_down", str(E + 1)], id="w-down-experts"),
    pytest.param(dict(b_gate_up=torch.randn(E, I)), ValueError, ["b_gate_up", str(I)], id="bias-shape"),
    pytest.param(dict(b_down=torch.randn(E, H).long()), TypeError, ["b_down", "int64"], id="bias-int"),
    pytest.param(dict(activation="tanh"), ValueError, ["activation", "tanh", "swiglu"], id="activation"),
    pytest.param(dict(backend="cuda-magic"), Exception, ["cuda-magic", "torch"], id="backend-unknown"),
    pytest.param(dict(plan="not a plan"), TypeError, ["plan", "str"], id="plan-type"),
]


@pytest.mark.parametrize("override, error, words", BAD_MOE_MLP)
def test_moe_mlp_rejects(good, override, error, words):
    before = {n: t.clone() for n, t in good.items() if isinstance(t, torch.Tensor)}
    with pytest.raises(error) as info:
        _mlp(good, **override)
    for word in words:
        assert word in str(info.value), (word, str(info.value))
    assert all(torch.equal(good[n], t) for n, t in before.items())


def test_moe_mlp_rejects_a_plan_for_other_ids(good):
    other = md.make_plan(torch.zeros(T + 2, K, dtype=torch.long), E)
    with pytest.raises(ValueError, match="plan was made for ids"):
        _mlp(good, plan=other)


def test_moe_mlp_rejects_a_stale_plan(good, backend):
    """A plan of other ids of the same shape (the last batch's, say) would mix up the experts."""
    other = md.make_plan(torch.roll(good["ids"], 1, dims=0), E)
    with pytest.raises(ValueError, match=r"plan is not the plan of ids: ids\[\d+, \d\]"):
        _mlp(good, plan=other, backend=backend)
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 4\): found expert id 99"):
        _mlp(good, ids=torch.full((T, K), 99), plan=good["plan"], backend=backend)


def _one_row_twice(plan):
    rows = plan.row_of_slot.clone()
    rows[1, 0] = rows[0, 0]
    return replace(plan, row_of_slot=rows)


def _rows_swapped(plan):
    tokens = plan.token_of_row.clone()
    tokens[[0, -1]] = tokens[[-1, 0]]
    return replace(plan, token_of_row=tokens)


def _counts_off(plan):
    counts = plan.counts.clone()
    counts[0] += 1
    counts[1] -= 1
    return replace(plan, counts=counts)


BAD_PLANS = {  # how a hand-made plan goes wrong -> what the error says
    "token-range": (lambda p: replace(p, token_of_row=p.token_of_row + T), "plan.token_of_row must lie in [0, 6)"),
    "row-range": (lambda p: replace(p, row_of_slot=p.row_of_slot - 1), "plan.row_of_slot must lie in [0, 12)"),
    "row-twice": (_one_row_twice, "a row of its own"),
    "not-inverse": (_rows_swapped, "must invert plan.row_of_slot"),
    "counts": (_counts_off, "plan.offsets must rise from 0 to 12 by plan.counts"),
}


@pytest.mark.parametrize("bad", BAD_PLANS)
def test_permute_unpermute_and_moe_mlp_reject_an_inconsistent_plan(good, backend, bad):
    """Every backend (the torch one included, whose indexing would fail without naming the
    plan) says which field is wrong."""
    make, message = BAD_PLANS[bad]
    plan = make(good["plan"])
    for call in (lambda: md.permute(good["x"], plan, backend=backend),
                 lambda: md.unpermute(torch.randn(T * K, H), plan, backend=backend),
                 lambda: _mlp(good, plan=plan, backend=backend)):
        with pytest.raises(ValueError, match=re.escape(message)):
            call()


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        pytest.param(dict(top_k=E + 1), ValueError, ["top_k=5", "E=4"], id="top_k>E"),
        pytest.param(dict(top_k=0), ValueError, ["top_k", "0"], id="top_k=0"),
        pytest.param(dict(top_k=1.5), TypeError, ["top_k", "1.5"], id="top_k-float"),
        pytest.param(dict(scoring="tanh"), ValueError, ["scoring", "tanh"], id="scoring"),
        pytest.param(dict(bias=torch.zeros(E + 1)), ValueError, ["bias", str(E + 1)], id="bias-shape"),
        pytest.param(dict(n_groups=3, topk_groups=1), ValueError, ["n_groups=3", "E=4"], id="groups-divide"),
        pytest.param(dict(n_groups=2), ValueError, ["topk_groups"], id="groups-pair"),
        pytest.param(dict(n_groups=2, topk_groups=3), ValueError, ["topk_groups=3"], id="topk_groups>n"),
        pytest.param(dict(n_groups=4, topk_groups=1, top_k=2), ValueError, ["top_k=2"], id="top_k>kept"),
    ],
)
def test_route_rejects(kwargs, error, words, gen):
    kwargs = dict(dict(top_k=K), **kwargs)
    with pytest.raises(error) as info:
        md.route(torch.randn(T, E, generator=gen), **kwargs)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_route_rejects_integer_logits():
    with pytest.raises(TypeError, match="logits"):
        md.route(torch.zeros(T, E, dtype=torch.long), 2)


def test_make_plan_rejects():
    with pytest.raises(TypeError, match="ids"):
        md.make_plan(torch.zeros(T, K), E)
    with pytest.raises(ValueError, match="ids must be 2-D"):
        md.make_plan(torch.zeros(T, dtype=torch.long), E)
    with pytest.raises(ValueError, match="found expert id 9"):
        md.make_plan(torch.tensor([[0, 9]]), E)
    with pytest.raises(ValueError, match="num_experts"):
        md.make_plan(torch.zeros(T, K, dtype=torch.long), 0)


def test_permute_and_unpermute_reject(good):
    plan = good["plan"]
    with pytest.raises(ValueError, match="x has 7 tokens but the plan was made for 6"):
        md.permute(torch.randn(T + 1, H), plan)
    with pytest.raises(ValueError, match="ys has 11 rows but the plan has 12"):
        md.unpermute(torch.randn(T * K - 1, H), plan)
    with pytest.raises(ValueError, match=r"weights must have shape \(6, 2\)"):
        md.unpermute(torch.randn(T * K, H), plan, torch.rand(T, K + 1))
    with pytest.raises(TypeError, match="plan must be a DispatchPlan"):
        md.permute(good["x"], plan.counts)


@pytest.mark.parametrize(
    "args, error, words",
    [
        pytest.param(((12, 8), (4, 7, 3), [0, 3, 6, 9, 12]), ValueError, ["w", "K=8"], id="K-mismatch"),
        pytest.param(((12, 8), (4, 8, 3), [0, 3, 6, 12]), ValueError, ["offsets", "(5,)"], id="offsets-length"),
        pytest.param(((12, 8), (4, 8, 3), [0, 3, 6, 9, 11]), ValueError, ["offsets", "12"], id="offsets-end"),
        pytest.param(((12, 8), (4, 8, 3), [0, 6, 3, 9, 12]), ValueError, ["offsets", "rise"], id="offsets-fall"),
        pytest.param(((12, 8), (4, 8, 3), [1, 3, 6, 9, 12]), ValueError, ["offsets"], id="offsets-start"),
        pytest.param(((12, 8), (8, 3), [0, 12]), ValueError, ["w", "3-D"], id="w-2d"),
    ],
)
def test_grouped_mm_rejects(args, error, words):
    xs_shape, w_shape, offsets = args
    with pytest.raises(error) as info:
        md.grouped_mm(torch.randn(xs_shape), torch.randn(w_shape), torch.tensor(offsets, dtype=torch.int32))
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_grouped_mm_rejects_float_offsets_and_mixed_dtypes():
    with pytest.raises(TypeError, match="offsets"):
        md.grouped_mm(torch.randn(4, 8), torch.randn(1, 8, 3), torch.tensor([0.0, 4.0]))
    with pytest.raises(TypeError, match="w has dtype torch.float16 but xs has dtype torch.float32"):
        md.grouped_mm(torch.randn(4, 8), torch.randn(1, 8, 3).half(), torch.tensor([0, 4]))


@pytest.mark.parametrize(
    "kwargs, words",
    [
        pytest.param(dict(top_k=5), ["top_k=5", "num_experts=4"], id="top_k>E"),
        pytest.param(dict(activation="tanh"), ["activation"], id="activation"),
        pytest.param(dict(hidden_size=0), ["hidden_size"], id="hidden=0"),
        pytest.param(dict(scoring="max"), ["scoring"], id="scoring"),
        pytest.param(dict(n_groups=3, topk_groups=1), ["n_groups=3"], id="groups"),
        pytest.param(dict(n_groups=2), ["topk_groups"], id="groups-pair"),
        pytest.param(dict(n_groups=2, topk_groups=3), ["topk_groups=3"], id="topk_groups>n"),
        pytest.param(dict(backend="gpu"), ["backend", "'gpu'", "'triton'"], id="backend"),
    ],
)
def test_layer_rejects(kwargs, words):
    """At construction, not at the first forward."""
    args = dict(dict(hidden_size=H, intermediate_size=I, num_experts=E, top_k=2), **kwargs)
    with pytest.raises(ValueError) as info:
        md.MoE(**args)
    for word in words:
        assert word in str(info.value)


def test_layer_rejects_wrong_hidden_size():
    layer = md.MoE(H, I, E, 2)
    with pytest.raises(ValueError, match=r"hidden_size=8.*\(3, 9\)"):
        layer(torch.randn(3, H + 1))
