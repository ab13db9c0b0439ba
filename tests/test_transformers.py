"""moe-dispatch as a transformers experts implementation, and MoE <-> transformers blocks.

Tiny random models built from configs (no download) must give the logits and every
gradient that experts_implementation="eager" gives, on every backend.
"""

import copy
import inspect
import subprocess
import sys
import types

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers", minversion="5.0")

from transformers import AutoModelForCausalLM  # noqa: E402
from transformers.integrations.moe import use_experts_implementation  # noqa: E402

import moe_dispatch.integrations.transformers as integration  # noqa: E402
from conftest import assert_close  # noqa: E402
from moe_dispatch import MoE, warm_up  # noqa: E402
from moe_dispatch.integrations.transformers import from_transformers, to_transformers  # noqa: E402

VOCAB = 64
# Small enough for the Triton interpreter: hidden 32, 2 layers, a handful of experts.
COMMON = dict(
    vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=64, bos_token_id=0, eos_token_id=1, pad_token_id=2,
)


def _mixtral():
    return transformers.MixtralConfig(**COMMON, intermediate_size=24, num_local_experts=5, num_experts_per_tok=2)


def _qwen3_moe():
    return transformers.Qwen3MoeConfig(
        **COMMON, moe_intermediate_size=24, num_experts=6, num_experts_per_tok=2, head_dim=8, norm_topk_prob=True
    )


def _olmoe():
    # norm_topk_prob=False: the weights are the raw softmax scores
    return transformers.OlmoeConfig(**COMMON, intermediate_size=24, num_experts=7, num_experts_per_tok=3)


def _deepseek_v3():
    # groups, sigmoid scores + correction bias, a shared expert, routed scaling; layer 0 is dense
    return transformers.DeepseekV3Config(
        **{**COMMON, "num_key_value_heads": 4}, intermediate_size=48, moe_intermediate_size=16,
        n_routed_experts=8, num_experts_per_tok=3, n_group=4, topk_group=2, n_shared_experts=1,
        first_k_dense_replace=1, routed_scaling_factor=2.5, kv_lora_rank=16, q_lora_rank=16,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
        rope_parameters={"rope_type": "default", "rope_theta": 1e4},
    )


def _gpt_oss(swiglu_limit=7.0):
    # biases, [E, in, out] weights, clamped SwiGLU over interleaved gate/up columns
    return transformers.GptOssConfig(
        **COMMON, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2, head_dim=8,
        sliding_window=8, swiglu_limit=swiglu_limit, rope_parameters={"rope_type": "default", "rope_theta": 1e4},
    )


def _gpt_oss_other_limit():
    # a limit other than the released models' 7: not the registered clamped SwiGLU's constants
    return _gpt_oss(swiglu_limit=0.5)


def _qwen2_moe():
    # a shared expert scaled by a sigmoid gate
    return transformers.Qwen2MoeConfig(
        **COMMON, moe_intermediate_size=24, shared_expert_intermediate_size=32, num_experts=6, num_experts_per_tok=2
    )


def _aria():
    # experts stored [E, in, out] (is_transposed) on the fused path
    return transformers.AriaTextConfig(
        **COMMON, intermediate_size=24, moe_num_experts=5, moe_topk=2, moe_num_shared_experts=2
    )


def _glm4_moe():
    return transformers.Glm4MoeConfig(
        **COMMON, intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2,
        n_group=2, topk_group=1, n_shared_experts=2, first_k_dense_replace=1, head_dim=8,
    )


# family -> (config, the path its experts take: the fused moe_mlp or the composed ops)
FAMILIES = {
    "mixtral": (_mixtral, "fused"),
    "qwen3_moe": (_qwen3_moe, "fused"),
    "olmoe": (_olmoe, "fused"),
    "deepseek_v3": (_deepseek_v3, "fused"),
    "gpt_oss": (_gpt_oss, "fused"),
    "gpt_oss_other_limit": (_gpt_oss_other_limit, "composed"),
    "qwen2_moe": (_qwen2_moe, "fused"),
    "aria": (_aria, "fused"),
}


def _randomize(model: nn.Module, gen: torch.Generator) -> None:
    """Weights of order one over sqrt(fan-in), random router weights and correction biases
    (their default zeros would make every routing choice a tie)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.1 * noise if "norm" in name else 0.2 * noise)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn(b.shape, generator=gen))


def _tiny_model(family: str, gen: torch.Generator, implementation: str = "eager") -> nn.Module:
    return _tiny_model_from(FAMILIES[family][0], gen, implementation)


def _tiny_model_from(config_fn, gen: torch.Generator, implementation: str = "eager") -> nn.Module:
    model = AutoModelForCausalLM.from_config(config_fn(), experts_implementation=implementation)
    if not any(hasattr(module, "has_gate") for module in model.modules()):
        # e.g. Aria before its experts moved to the ExpertsInterface
        pytest.skip(f"{type(model).__name__} of transformers {transformers.__version__} has no experts module")
    _randomize(model, gen)
    return model


def _logits_and_grads(model: nn.Module, input_ids: torch.Tensor):
    model.zero_grad()
    logits = model(input_ids).logits
    logits.sin().sum().backward()
    params = getattr(model, "_orig_mod", model).named_parameters()  # a compiled model wraps the original
    return logits.detach(), {n: p.grad.clone() for n, p in params if p.grad is not None}


def _assert_same(actual, expected):
    (logits, grads), (ref_logits, ref_grads) = actual, expected
    assert_close(logits, ref_logits)
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        assert_close(grads[name], ref_grads[name])


@pytest.fixture
def path_spy(monkeypatch):
    """Counts which path the experts took."""
    calls = {"fused": 0, "composed": 0}
    fused, composed = integration.moe_mlp, integration._composed_forward

    def counting_fused(*args, **kwargs):
        calls["fused"] += 1
        return fused(*args, **kwargs)

    def counting_composed(*args, **kwargs):
        calls["composed"] += 1
        return composed(*args, **kwargs)

    monkeypatch.setattr(integration, "moe_mlp", counting_fused)
    monkeypatch.setattr(integration, "_composed_forward", counting_composed)
    return calls


@pytest.mark.parametrize("family", FAMILIES)
def test_model_matches_eager(family, backend, gen, path_spy):
    model = _tiny_model(family, gen)
    input_ids = torch.randint(0, VOCAB, (2, 7), generator=gen)
    expected = _logits_and_grads(model, input_ids)
    model.set_experts_implementation(integration.register(f"moe_dispatch_{backend}", backend=backend))
    actual = _logits_and_grads(model, input_ids)
    _assert_same(actual, expected)
    path = FAMILIES[family][1]
    other = "composed" if path == "fused" else "fused"
    assert path_spy[path] > 0 and path_spy[other] == 0


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss", "gpt_oss_other_limit"])  # fused paths, the composed one
def test_bfloat16_model_matches_eager(family, backend, gen):
    if backend == "triton" and not torch.cuda.is_available():
        pytest.skip("the Triton interpreter cannot run bfloat16 tl.dot")
    model = _tiny_model(family, gen).to(torch.bfloat16)
    input_ids = torch.randint(0, VOCAB, (2, 7), generator=gen)
    with torch.no_grad():
        expected = model(input_ids).logits
        model.set_experts_implementation(integration.register(f"moe_dispatch_{backend}", backend=backend))
        actual = model(input_ids).logits
    assert actual.dtype == torch.bfloat16
    assert_close(actual, expected)


def test_from_pretrained_with_the_implementation(tmp_path, gen):
    integration.register()
    model = _tiny_model("qwen3_moe", gen)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation="moe_dispatch")
    assert loaded.config._experts_implementation == "moe_dispatch"
    input_ids = torch.randint(0, VOCAB, (3, 5), generator=gen)
    with torch.no_grad():
        assert_close(loaded(input_ids).logits, model.eval()(input_ids).logits)


# ---- every flag, on experts modules of our own ---------------------------------------------


class _GeluTanh(nn.Module):
    """An activation no fused kernel has: the composed path must call it."""

    def forward(self, x):
        return nn.functional.gelu(x, approximate="tanh")


class _RowNorm(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


def _experts_class(has_gate, is_transposed, has_bias, has_post_expert_norm, act):
    flags = dict(has_gate=has_gate, is_transposed=is_transposed, has_bias=has_bias)
    if has_post_expert_norm:
        if "has_post_expert_norm" not in inspect.signature(use_experts_implementation).parameters:
            pytest.skip(f"transformers {transformers.__version__} has no has_post_expert_norm flag")
        flags["has_post_expert_norm"] = True

    @use_experts_implementation(**flags)
    class Experts(nn.Module):
        def __init__(self, config, num_experts=5, hidden=12, inter=10):
            super().__init__()
            self.num_experts = num_experts
            width = 2 * inter if has_gate else inter
            first, second = ((hidden, width), (inter, hidden)) if is_transposed else ((width, hidden), (hidden, inter))
            name = "gate_up_proj" if has_gate else "up_proj"
            setattr(self, name, nn.Parameter(torch.empty(num_experts, *first)))
            self.down_proj = nn.Parameter(torch.empty(num_experts, *second))
            if has_bias:
                setattr(self, name + "_bias", nn.Parameter(torch.empty(num_experts, width)))
                self.down_proj_bias = nn.Parameter(torch.empty(num_experts, hidden))
            if has_post_expert_norm:
                self.post_expert_norm = _RowNorm(hidden)
            self.act_fn = act()

    return Experts


# (has_gate, is_transposed, has_bias, has_post_expert_norm, activation, the path); each
# combination says why it exists.
FLAG_CASES = {
    "ungated-relu": (False, False, False, False, nn.ReLU, "fused"),  # up_proj only, plain activation
    "ungated-gelu-bias": (False, False, True, False, transformers.activations.GELUActivation, "fused"),
    "transposed-bias": (True, True, True, False, nn.SiLU, "fused"),  # [E, in, out] views, no copies
    "geglu": (True, False, False, False, transformers.activations.GELUActivation, "fused"),
    "post-norm": (True, False, False, True, nn.SiLU, "composed"),  # a norm between expert and weight
    "gated-relu": (True, False, True, False, nn.ReLU, "composed"),  # no fused relu-GLU
    "gelu-tanh": (True, True, False, False, _GeluTanh, "composed"),
}


def _flag_experts(case, gen, implementation):
    *flags, act, _ = FLAG_CASES[case]
    experts = _experts_class(*flags, act)(types.SimpleNamespace(_experts_implementation=implementation))
    with torch.no_grad():
        for p in experts.parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.1 * noise if p.dim() == 1 else noise / 3)
    return experts


def _experts_outputs_and_grads(experts, x, ids, weights):
    x, weights = x.clone().requires_grad_(), weights.clone().requires_grad_()
    experts.zero_grad()
    out = experts(x, ids, weights)
    out.sin().sum().backward()
    grads = {n: p.grad.clone() for n, p in experts.named_parameters()}
    return out.detach(), dict(grads, x=x.grad, weights=weights.grad)


@pytest.mark.parametrize("case", FLAG_CASES)
def test_every_flag_matches_transformers(case, backend, gen, path_spy):
    # transformers' batched_mm implementation honours every flag: it is the reference here
    experts = _flag_experts(case, gen, "batched_mm")
    num_tokens, top_k = 9, 2
    x = torch.randn(num_tokens, 12, generator=gen)
    ids = torch.rand(num_tokens, experts.num_experts, generator=gen).topk(top_k, dim=-1).indices
    weights = torch.rand(num_tokens, top_k, generator=gen)
    expected = _experts_outputs_and_grads(experts, x, ids, weights)
    experts.config._experts_implementation = integration.register(f"moe_dispatch_{backend}", backend=backend)
    actual = _experts_outputs_and_grads(experts, x, ids, weights)
    _assert_same(actual, expected)
    path = FLAG_CASES[case][-1]
    assert path_spy[path] == 1 and path_spy["composed" if path == "fused" else "fused"] == 0


def test_the_experts_are_kept_until_the_module_changes(backend, gen):
    """What experts_forward reads off a module is kept (so that what a backend derives from it
    is too) until a weight is written or replaced, the activation changes, or gradients are
    asked for after a call under no_grad (whose views of [E, in, out] weights carry none)."""
    experts = _flag_experts("transposed-bias", gen, "batched_mm")
    x = torch.randn(5, 12, generator=gen)
    ids = torch.rand(5, experts.num_experts, generator=gen).topk(2, dim=-1).indices
    weights = torch.rand(5, 2, generator=gen)
    ours = integration.register(f"moe_dispatch_{backend}", backend=backend)

    def outputs():
        with torch.no_grad():
            experts.config._experts_implementation = "batched_mm"
            expected = experts(x, ids, weights)
            experts.config._experts_implementation = ours
            return experts(x, ids, weights), expected

    assert_close(*outputs())
    fused = integration._module_experts(experts, x.dtype)[0]
    assert integration._module_experts(experts, x.dtype)[0] is fused
    with torch.no_grad():
        experts.down_proj.mul_(-2.0)
    assert_close(*outputs())
    experts.gate_up_proj = nn.Parameter(experts.gate_up_proj.detach() * 0.5)
    assert_close(*outputs())
    experts.act_fn = transformers.activations.GELUActivation()
    assert_close(*outputs())
    assert integration._module_experts(experts, x.dtype)[0].activation.name == "geglu"
    experts.config._experts_implementation = "batched_mm"
    expected = _experts_outputs_and_grads(experts, x, ids, weights)
    outputs()  # kept under no_grad
    _assert_same(_experts_outputs_and_grads(experts, x, ids, weights), expected)


def test_expert_parallel_slots_of_other_ranks_add_nothing(backend, gen):
    # Expert parallelism marks the slots of other ranks' experts with id num_experts, weight 0.
    experts = _flag_experts("transposed-bias", gen, "batched_mm")
    experts._is_expert_parallel = True
    x = torch.randn(6, 12, generator=gen)
    ids = torch.tensor([[0, 5], [5, 5], [3, 1], [5, 4], [2, 0], [1, 5]])
    weights = torch.rand(6, 2, generator=gen).masked_fill(ids == 5, 0.0)
    expected = _experts_outputs_and_grads(experts, x, ids, weights)
    experts.config._experts_implementation = integration.register(f"moe_dispatch_{backend}", backend=backend)
    _assert_same(_experts_outputs_and_grads(experts, x, ids, weights), expected)


# ---- registration and the version guard ----------------------------------------------------


@pytest.mark.parametrize("backward", [False, True])
def test_warm_up_runs_the_experts_modules_through_the_implementation(backward, gen, path_spy):
    model = _tiny_model("gpt_oss", gen, integration.register("moe_dispatch_numba", backend="numba"))
    before = copy.deepcopy(model.state_dict())
    seconds = warm_up(model, max_tokens=16, backward=backward)
    assert list(seconds) == ["model.layers.0.mlp.experts"]  # layer 1's experts are alike
    assert path_spy["fused"] >= (10 if backward else 5)  # T = 1, 2, 4, 8, 16 at least, each under autograd too
    assert all(p.grad is None for p in model.parameters())
    after = model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_importing_moe_dispatch_does_not_import_transformers():
    code = (
        "import sys, moe_dispatch, moe_dispatch.integrations.transformers\n"
        "assert 'transformers' not in sys.modules, 'transformers was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(backend="cuda"), "backend must be one of auto, torch"),
        (dict(name=""), "name must be a non-empty str"),
    ],
    ids=["unknown-backend", "empty-name"],
)
def test_register_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        integration.register(**kwargs)


def test_an_unknown_implementation_name_is_refused(gen):
    model = _tiny_model("mixtral", gen)
    with pytest.raises(ValueError, match="not supported"):
        model.set_experts_implementation("moe_dispatch_never_registered")


def test_register_without_transformers_says_what_to_install(monkeypatch):
    monkeypatch.setattr(integration, "_LOADED", None)
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match=r"pip install 'transformers>=5.0'"):
        integration.register()


def test_register_with_transformers_4_says_what_to_install(monkeypatch):
    monkeypatch.setattr(integration, "_LOADED", None)
    # transformers may replace its own sys.modules entry after import: patch the live one
    monkeypatch.setattr(sys.modules["transformers"], "__version__", "4.57.3")
    with pytest.raises(ImportError, match=r"found transformers 4\.57\.3.*pip install -U 'transformers>=5.0'"):
        integration.register()


# ---- torch.compile -------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss", "gpt_oss_other_limit"])  # fused paths, the composed one
def test_compiled_model_has_no_graph_break(family, backend, gen):
    model = _tiny_model(family, gen, integration.register(f"moe_dispatch_{backend}", backend=backend))
    input_ids = torch.randint(0, VOCAB, (2, 7), generator=gen)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(input_ids)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    expected = _logits_and_grads(model, input_ids)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    _assert_same(_logits_and_grads(compiled, input_ids), expected)


@pytest.mark.slow
def test_inductor_compiles_qwen3_moe(gen):
    model = _tiny_model("qwen3_moe", gen, integration.register())
    input_ids = torch.randint(0, VOCAB, (2, 7), generator=gen)
    expected = _logits_and_grads(model, input_ids)
    torch._dynamo.reset()
    _assert_same(_logits_and_grads(torch.compile(model), input_ids), expected)


# ---- MoE <-> transformers blocks -----------------------------------------------------------

# family -> its MoE block's configuration (the last layer's: DeepSeek-V3's first is dense)
BLOCK_FAMILIES = {
    "mixtral": _mixtral,
    "qwen3_moe": _qwen3_moe,
    "olmoe": _olmoe,
    "deepseek_v3": _deepseek_v3,
    "glm4_moe": _glm4_moe,
    "aria": _aria,
}


def _tiny_block(config_fn, gen) -> nn.Module:
    return _tiny_model_from(config_fn, gen).model.layers[-1].mlp


@pytest.mark.parametrize("family", BLOCK_FAMILIES)
def test_from_transformers_matches_the_block(family, backend, gen):
    block = _tiny_block(BLOCK_FAMILIES[family], gen)
    layer = from_transformers(block, backend=backend)
    x = torch.randn(2, 5, 32, generator=gen)
    with torch.no_grad():
        assert_close(layer(x), block(x))


@pytest.mark.parametrize("family", BLOCK_FAMILIES)
def test_round_trip_through_the_layer(family, gen):
    block = _tiny_block(BLOCK_FAMILIES[family], gen)
    layer = from_transformers(block, backend="torch")
    with torch.no_grad():  # new weights, as if trained
        for p in layer.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
        if layer.scoring == "sigmoid":  # the only scoring whose choice uses the correction bias
            layer.expert_bias.add_(0.05 * torch.randn(layer.expert_bias.shape, generator=gen))
    target = copy.deepcopy(block)
    assert to_transformers(layer, target) is target
    x = torch.randn(3, 4, 32, generator=gen)
    with torch.no_grad():
        assert_close(target(x), layer(x))
    back = from_transformers(target, backend="torch")
    for (name, mine), theirs in zip(layer.state_dict().items(), back.state_dict().values()):
        assert torch.equal(mine, theirs), name


@pytest.mark.parametrize("family", ["gpt_oss", "qwen2_moe"])
def test_from_transformers_refuses_what_moe_cannot_compute(family, gen):
    # gpt-oss: router bias and clamped SwiGLU; Qwen2-MoE: a sigmoid-gated shared expert
    block = _tiny_block(FAMILIES[family][0], gen)
    with pytest.raises(ValueError, match="block must be one of"):
        from_transformers(block)


def test_from_transformers_refuses_router_jitter(gen):
    config = _mixtral()
    config.router_jitter_noise = 0.1
    block = _tiny_block(lambda: config, gen)
    with pytest.raises(ValueError, match="jitter_noise=0.1"):
        from_transformers(block)


def test_to_transformers_refuses_a_different_configuration(gen):
    block = _tiny_block(_qwen3_moe, gen)
    layer = MoE(32, 24, 6, top_k=3)
    with pytest.raises(ValueError, match="top_k: layer 3, block 2"):
        to_transformers(layer, block)


def test_from_transformers_refuses_a_block_built_otherwise(gen):
    # Another transformers release may build a block of the same name differently (older
    # Aria: a plain nn.Linear router, experts as fc1/fc2): a clear error, never a wrong copy.
    block = _tiny_block(_mixtral, gen)
    block.gate = nn.Linear(32, 5, bias=False)
    with pytest.raises(ValueError, match="MixtralSparseMoeBlock .* is not built as the one MoE knows"):
        from_transformers(block)


def test_gpt_oss_experts_run_fused_reading_interleaved_weights_in_place(backend, gen, path_spy):
    """gpt-oss's experts through the registered clamped SwiGLU, with inputs large enough that both
    clamps cut, and no copy of a weight."""
    model = _tiny_model("gpt_oss", gen)
    experts = model.model.layers[0].mlp.experts
    with torch.no_grad():
        experts.gate_up_proj.mul_(8)  # the clamps are at +-7
    fused = integration.fused_experts(experts)
    assert fused.activation.name == "clamped_swiglu" and fused.interleaved
    assert fused.w_gate_up.data_ptr() == experts.gate_up_proj.data_ptr()
    x = torch.randn(9, 32, generator=gen)
    h = x @ experts.gate_up_proj[0] + experts.gate_up_proj_bias[0]
    assert (h[:, 0::2] > experts.limit).any() and (h[:, 1::2].abs() > experts.limit).any()
    ids = torch.rand(9, 4, generator=gen).topk(2, dim=-1).indices
    weights = torch.rand(9, 2, generator=gen)
    expected = _experts_outputs_and_grads(experts, x, ids, weights)
    experts.config._experts_implementation = integration.register(f"moe_dispatch_{backend}", backend=backend)
    _assert_same(_experts_outputs_and_grads(experts, x, ids, weights), expected)
    assert path_spy == {"fused": 1, "composed": 0}
