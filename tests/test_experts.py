"""The experts as one declared object (ExpertWeights) and the storage formats a weight may take
(moe_dispatch.formats): what moe_mlp, MoE and every backend receive. The numba section checks
that the backend reads a declared OneDNNPacked weight's packed copies."""

import copy

import pytest
import torch

import moe_dispatch as md
from conftest import CPU_BACKENDS, assert_close, expert_weights, large_groups_everywhere, needs_numba, \
    register_tiles_everywhere
from conftest import random_ids, random_weights, skip_without_onednn
from moe_dispatch.backends.cpu_matmul import onednn_available
from moe_dispatch.experts import ExpertWeights
from moe_dispatch.formats import dense, format_of
from moe_dispatch.formats.onednn import OneDNNPacked, clear_packed_weights
from reference import naive_moe_mlp

T, K, E, H, I = 11, 2, 5, 24, 10
needs_onednn = pytest.mark.skipif(not onednn_available(), reason="this torch has no oneDNN linear op")


def _batch(gen, dtype=torch.float32):
    return (torch.randn(T, H, generator=gen).to(dtype), random_weights(T, K, gen), random_ids(T, K, E, gen))


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_moe_mlp_takes_the_experts_as_one_object(backend, bias, gen):
    x, weights, ids = _batch(gen)
    w_gate_up, w_down, b_gate_up, b_down = expert_weights(E, H, I, gen, activation="geglu", bias=bias)
    experts = ExpertWeights(w_gate_up, w_down, b_gate_up, b_down, activation="geglu")
    out = md.moe_mlp(x, weights, ids, experts, backend=backend)
    same = md.moe_mlp(x, weights, ids, w_gate_up, w_down, activation="geglu", b_gate_up=b_gate_up, b_down=b_down,
                      backend=backend)
    assert torch.equal(out, same)
    assert_close(out, naive_moe_mlp(x, weights, ids, w_gate_up, w_down, b_gate_up, b_down, "geglu"))


def test_the_object_or_the_tensors_not_both(gen):
    x, weights, ids = _batch(gen)
    w_gate_up, w_down, b_gate_up, _ = expert_weights(E, H, I, gen, bias=True)
    experts = ExpertWeights(w_gate_up, w_down)
    for extra in (dict(w_down=w_down), dict(activation="swiglu"), dict(b_gate_up=b_gate_up)):
        with pytest.raises(TypeError, match=f"drop {next(iter(extra))}"):
            md.moe_mlp(x, weights, ids, experts, **extra)
    with pytest.raises(TypeError, match="needs w_down"):
        md.moe_mlp(x, weights, ids, w_gate_up)


BAD_EXPERTS = [
    # (arguments, error, words of the message)
    pytest.param(dict(w_gate_up=torch.randn(E, 2 * I + 1, H)), ValueError, ["w_gate_up", "even"], id="odd-gated"),
    pytest.param(dict(w_down=torch.randn(E, H, I + 1)), ValueError, ["w_down", str(I + 1)], id="down-shape"),
    pytest.param(dict(w_down=torch.randn(E, H)), ValueError, ["w_down", "3-D"], id="down-2d"),
    pytest.param(dict(w_gate_up=[[1.0]]), TypeError, ["w_gate_up", "list"], id="not-a-weight"),
    pytest.param(dict(b_down=torch.randn(E, H + 1)), ValueError, ["b_down", str(H + 1)], id="bias-shape"),
    pytest.param(dict(activation="tanh"), ValueError, ["activation", "tanh", "clamped_swiglu"], id="activation"),
    pytest.param(dict(interleaved="yes"), ValueError, ["interleaved", "yes"], id="interleaved"),
]


@pytest.mark.parametrize("override, error, words", BAD_EXPERTS)
def test_bad_experts_name_the_argument(override, error, words, gen):
    w_gate_up, w_down, b_gate_up, b_down = expert_weights(E, H, I, gen, bias=True)
    args = {**dict(w_gate_up=w_gate_up, w_down=w_down, b_gate_up=b_gate_up, b_down=b_down), **override}
    with pytest.raises(error) as info:
        ExpertWeights(**args)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_flatten_and_unflatten_round_trip(bias, gen):
    """What the custom ops carry: a list of tensors and a string, back to the same experts."""
    w_gate_up, w_down, b_gate_up, b_down = expert_weights(E, H, I, gen, bias=bias)
    for experts in (ExpertWeights(w_gate_up, w_down, b_gate_up, b_down, "clamped_swiglu", interleaved=True),
                    ExpertWeights(w_gate_up[:, :I], w_down, b_gate_up[:, :I] if bias else None, None, "gelu")):
        tensors, spec = experts.flatten()
        back = ExpertWeights.unflatten(tensors, spec)
        assert (back.activation, back.interleaved) == (experts.activation, experts.interleaved)
        assert all(a is b for a, b in zip(back.tensors(), experts.tensors()))


def test_a_layer_runs_given_experts_and_shows_its_own(gen):
    w_gate_up, w_down, b_gate_up, b_down = expert_weights(E, H, I, gen, activation="gelu", bias=True)
    experts = ExpertWeights(w_gate_up, w_down, b_gate_up, b_down, "gelu")
    layer = md.MoE.from_experts(experts, top_k=K, backend="torch")
    assert (layer.num_experts, layer.hidden_size, layer.intermediate_size, layer.activation) == (E, H, I, "gelu")
    assert layer.w_gate_up.data_ptr() == w_gate_up.data_ptr() and layer.b_down.data_ptr() == b_down.data_ptr()
    mine = layer.experts
    assert (mine.w_gate_up, mine.w_down, mine.b_gate_up, mine.b_down) == (layer.w_gate_up, layer.w_down,
                                                                          layer.b_gate_up, layer.b_down)
    x, weights, ids = _batch(gen)
    assert torch.equal(layer.routed_experts(x, weights, ids), md.moe_mlp(x, weights, ids, experts, backend="torch"))
    with pytest.raises(ValueError, match="interleaved must be False"):
        md.MoE.from_experts(ExpertWeights(w_gate_up, w_down, activation="gelu", interleaved=True), top_k=K)


def test_routed_experts_is_the_step_a_subclass_overrides(gen):
    calls = []

    class Recording(md.MoE):
        def routed_experts(self, flat, weights, ids, plan=None):
            calls.append(flat.shape)
            return super().routed_experts(flat, weights, ids, plan)

    layer = Recording(H, I, E, K)
    layer(torch.randn(2, 3, H, generator=gen))
    assert calls == [(6, H)]


# ---- what a backend derives from the experts, kept while they stay as they are -----------------


def test_derived_is_kept_until_a_tensor_changes(gen):
    w_gate_up, w_down, b_gate_up, b_down = expert_weights(E, H, I, gen, bias=True)
    experts = ExpertWeights(w_gate_up, w_down, b_gate_up, b_down)
    made = []

    def derived():
        return experts.derived("key", lambda: made.append(1) or len(made))

    assert (derived(), derived()) == (1, 1)
    assert experts.derived("other key", lambda: "other") == "other"
    b_down.add_(1.0)  # a write in place
    assert derived() == 2
    w_gate_up.data = w_gate_up.data.clone()  # other storage
    assert (derived(), derived()) == (3, 3)
    for copied in (copy.copy(experts), copy.deepcopy(experts)):
        assert copied.derived("key", lambda: "fresh") == "fresh"
    with torch.inference_mode():
        frozen = ExpertWeights(*(t.clone() for t in (w_gate_up, w_down)))
    made.clear()
    assert [frozen.derived("key", lambda: made.append(1) or len(made)) for _ in range(2)] == [1, 2]  # never kept


def test_a_layer_keeps_its_experts_until_its_tensors_change(gen):
    layer = md.MoE(H, I, E, K, bias=True, backend="torch")
    experts = layer.experts
    assert layer.experts is experts
    with torch.no_grad():
        layer.b_down.add_(1.0)
    assert layer.experts is not experts
    experts = layer.experts
    layer.activation = "geglu"
    assert layer.experts is not experts and layer.experts.activation.name == "geglu"
    layer.activation = "swiglu"
    experts = layer.experts
    layer.to(torch.bfloat16)
    assert layer.experts is not experts and layer.experts.w_gate_up.dtype == torch.bfloat16
    experts = layer.experts
    layer.quantize_("int8")
    assert layer.experts is not experts and layer.experts.w_gate_up.format == "int8"
    assert copy.deepcopy(layer).experts.w_gate_up.codes is not layer.experts.w_gate_up.codes


def test_a_layer_widens_its_router_once_until_it_changes(gen):
    layer = md.MoE(H, I, E, K, backend="torch", dtype=torch.bfloat16)
    x = torch.randn(3, H, generator=gen).bfloat16()
    expected = lambda: torch.nn.functional.linear(x.float(), layer.router.weight.float())  # noqa: E731
    with torch.no_grad():
        assert torch.equal(layer.router_logits(x), expected())
        kept_weight = layer._router_float32()
        assert layer._router_float32() is kept_weight
        layer.router.weight.mul_(-1)  # a write in place
        assert torch.equal(layer.router_logits(x), expected())
    logits = layer.router_logits(x)  # with a gradient to reach: widened in the graph
    logits.sum().backward()
    assert layer.router.weight.grad is not None


@needs_numba
@pytest.mark.parametrize("fmt", [None, "int8", "int4"], ids=["bf16", "int8", "int4"])
def test_a_decode_step_sees_weights_written_in_place(fmt, gen):
    """The numba decode step keeps the arrays its kernels read (a bias widened to float32 among
    them): a layer whose weights are written in place, or loaded, computes with the new ones."""
    hidden, inter = 64, 32  # int4's groups are 32 and more

    def make_layer():
        layer = md.MoE(hidden, inter, E, K, bias=True, backend="numba").to(torch.bfloat16)
        return layer.quantize_(fmt, group_size=32 if fmt == "int4" else None) if fmt else layer

    layer, other = make_layer(), make_layer()
    x = torch.randn(2, hidden, generator=gen).to(torch.bfloat16)
    with torch.no_grad():
        layer(x)
        layer.load_state_dict(other.state_dict())
        assert torch.equal(layer(x), other(x))
        for module in (layer, other):
            module.b_gate_up.mul_(2.0)
            module.router.weight.mul_(-1.0)
        out = layer(x)
        assert torch.equal(out, other(x))
        weights, ids = md.route(layer.router_logits(x), K)
        assert_close(out, md.moe_mlp(x, weights, ids, layer.experts.dense(), backend="torch"))


@needs_numba
def test_the_kept_decode_setup_follows_a_replaced_row_limit(gen, monkeypatch):
    """What the numba backend keeps on the experts follows fused_rows_limit, which the tests
    replace to force a path."""
    import moe_dispatch.backends.numba_backend as nb

    experts = ExpertWeights(*expert_weights(E, H, I, gen)[:2])
    x = torch.randn(T, H, generator=gen)
    assert nb.decode_setup(x, experts) is nb.decode_setup(x, experts)
    large_groups_everywhere(monkeypatch)
    assert nb.decode_setup(x, experts).rows_limit == 0


@needs_numba
def test_the_kept_decode_setup_follows_the_thread_count(gen, monkeypatch):
    """Its tiles split the work among the threads: a new count gets tiles of its own."""
    import moe_dispatch.backends.numba_backend as nb

    experts = ExpertWeights(*expert_weights(E, H, 512, gen)[:2])
    x = torch.randn(T, H, generator=gen)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    one = nb.decode_setup(x, experts)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 16)
    sixteen = nb.decode_setup(x, experts)
    assert (one.tiles.block_gate_up, sixteen.tiles.block_gate_up) == (nb.MAX_GATE_UP_BLOCK, 32)


@needs_numba
@pytest.mark.parametrize("threads", [1, 2, 3, 16, 64])
@pytest.mark.parametrize("inter", [1, 10, 24, 200, 512, 4096])
def test_decode_gate_up_tasks_take_even_blocks_of_each_experts_columns(inter, threads, monkeypatch):
    """A multiple of 4 columns (the kernels take columns four or two at a time), within the task
    size's limits, and no more blocks of an expert than threads unless at the largest size."""
    import moe_dispatch.backends.numba_backend as nb

    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    block = nb.gate_up_block(inter)
    assert block % 4 == 0 and nb.BLOCK_NK <= block <= nb.MAX_GATE_UP_BLOCK
    assert -(-inter // block) <= threads or block == nb.MAX_GATE_UP_BLOCK


# ---- OneDNNPacked: a declared storage format ---------------------------------------------------


@needs_onednn
def test_onednn_packed_holds_its_weight_and_checks_what_it_meets(gen):
    w = torch.randn(E, 2 * I, H, generator=gen)
    packed = OneDNNPacked(w)
    assert dense(packed) is w and format_of(packed) == "onednn" and format_of(w) == "dense"
    assert packed.shape == w.shape and packed.nbytes == 2 * w.nbytes
    with pytest.raises(ValueError, match="bfloat16 or float32 CPU weights"):
        OneDNNPacked(w.half())
    experts = ExpertWeights(packed, torch.randn(E, H, I, generator=gen))
    x, weights, ids = _batch(gen, torch.bfloat16)
    with pytest.raises(TypeError, match="w_gate_up has dtype torch.float32 but x has dtype torch.bfloat16"):
        md.moe_mlp(x, weights, ids, experts)


@needs_onednn
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_every_backend_runs_a_packed_weight_and_its_gradient_reaches_the_weight(backend, gen):
    x, weights, ids = _batch(gen)
    w_gate_up, w_down, b_gate_up, b_down = expert_weights(E, H, I, gen, bias=True)
    leaves = [t.clone().requires_grad_() for t in (w_gate_up, w_down)]
    out = md.moe_mlp(x, weights, ids, ExpertWeights(OneDNNPacked(leaves[0]), OneDNNPacked(leaves[1]), b_gate_up,
                                                    b_down), backend=backend)
    assert_close(out, naive_moe_mlp(x, weights, ids, w_gate_up, w_down, b_gate_up, b_down))
    out.sum().backward()
    reference = [t.clone().double().requires_grad_() for t in (w_gate_up, w_down)]
    naive_moe_mlp(x, weights, ids, *reference, b_gate_up, b_down).sum().backward()
    for got, want in zip(leaves, reference):
        assert_close(got.grad, want.grad)


@needs_onednn
def test_packed_experts_through_the_custom_ops(gen):
    """Under a torch function mode (as under torch.compile) the experts travel flattened."""
    x, weights, ids = _batch(gen)
    w_gate_up, w_down, _, _ = expert_weights(E, H, I, gen)
    experts = ExpertWeights(OneDNNPacked(w_gate_up), w_down)

    class PassThrough(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with PassThrough():
        out = md.moe_mlp(x, weights, ids, experts)
    assert_close(out, naive_moe_mlp(x, weights, ids, w_gate_up, w_down))


@pytest.fixture
def reorders(monkeypatch):
    """Counts oneDNN's weight reorders (one per packed expert weight)."""
    clear_packed_weights()
    for dtype in (torch.float32, torch.bfloat16):
        onednn_available(dtype)  # its probe reorders a weight once: before the counting starts
    counted, real = [], torch.ops.mkldnn._reorder_linear_weight
    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", lambda w: counted.append(1) or real(w),
                        raising=False)
    yield counted
    clear_packed_weights()


@needs_numba
@needs_onednn
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_numba_reads_a_declared_packed_weight_without_the_setting(dtype, reorders, gen, monkeypatch):
    skip_without_onednn(dtype)
    monkeypatch.delenv("MOE_DISPATCH_PACK_WEIGHTS", raising=False)
    large_groups_everywhere(monkeypatch)  # the blocked path: library products
    x, weights, ids = _batch(gen, dtype)
    w_gate_up, w_down, _, _ = expert_weights(E, H, I, gen, dtype)
    plain = md.moe_mlp(x, weights, ids, w_gate_up, w_down, backend="numba")
    assert reorders == []
    packed = ExpertWeights(OneDNNPacked(w_gate_up), w_down)
    for _ in range(2):
        assert_close(md.moe_mlp(x, weights, ids, packed, backend="numba"), plain.double(), dtype)
    assert len(reorders) == len(ids.unique())  # w_gate_up's active experts, packed once, then reused


@needs_numba
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_register_tiles_read_a_packed_weights_own_tensor(dtype, reorders, gen, monkeypatch):
    """Where the register tiles serve the experts, they read a OneDNNPacked weight's own tensor
    (faster than oneDNN's copies there), and no copy is made."""
    import moe_dispatch.backends.numba_backend as nb

    register_tiles_everywhere(monkeypatch)
    calls, real = [], nb.expert_tiles.expert_mlp_bf16 if dtype == torch.bfloat16 else nb.expert_tiles.expert_mlp
    monkeypatch.setattr(nb.expert_tiles, real.__name__, lambda *args: calls.append(1) or real(*args))
    x, weights, ids = _batch(gen, dtype)
    w_gate_up, w_down, _, _ = expert_weights(E, H, I, gen, dtype)
    plain = md.moe_mlp(x, weights, ids, w_gate_up, w_down, backend="numba")
    packed = md.moe_mlp(x, weights, ids, ExpertWeights(OneDNNPacked(w_gate_up), OneDNNPacked(w_down)), backend="numba")
    assert torch.equal(packed, plain) and len(calls) == 2 and reorders == []
