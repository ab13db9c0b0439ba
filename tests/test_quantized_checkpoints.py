"""Quantized checkpoints as they ship (integrations/checkpoints.py) and quantized experts in
transformers models (integrations/transformers.py: quantize_experts_, load_quantized_experts_,
from_transformers on quantized blocks).

Each format's checkpoint is written here, from codes our `quantize` made, in the format's own
tensor names and layout: the packed ones by the rules docs/formats.md states, written out
independently of the importers. It is saved with safetensors, read back through safe_open (so
nothing loads before it is asked for), run in an MoE, and compared with the float64 reference
on the dequantized weights. No weights are downloaded.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

safetensors = pytest.importorskip("safetensors")
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import moe_dispatch as md  # noqa: E402
from conftest import assert_close  # noqa: E402
from moe_dispatch.integrations.checkpoints import detect_format, read_deepseek_v3_layer, read_experts  # noqa: E402
from moe_dispatch.layers import FrozenQuantized  # noqa: E402

PREFIX = "model.layers.3.mlp"
E, H, TOP_K = 4, 64, 2
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


# ---- writing each format's tensors, by its documented rules ----------------------------------


def _pack8(values: torch.Tensor, order=tuple(range(8))) -> torch.Tensor:
    """int64 values 0..15 [..., L] -> int32 [..., L/8]: bits 4i..4i+3 of word w hold value 8w + order[i]."""
    groups = values.reshape(*values.shape[:-1], -1, 8)
    words = sum(groups[..., position] << (4 * i) for i, position in enumerate(order))
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # the bits as a signed int32


def _values(q, e):
    """Expert e's 4-bit codes, [N, K] int64 (two per byte, the even element low)."""
    return torch.stack((q.codes[e] & 15, q.codes[e] >> 4), -1).flatten(-2).long()


def _zeros(q, e):
    """Expert e's zero points, [N, K/g] int64."""
    return q.zeros[e].long() if q.zeros is not None else torch.full(q.scales[e].shape, 8, dtype=torch.long)


def _fp8(q, e):  # DeepSeek-V3
    return {"weight": q.codes[e], "weight_scale_inv": q.scales[e]}


def _gptq(q, e):  # qweight packed along K; qzeros along N, stored less one; scales [K/g, N]
    in_features = q.shape[2]
    return {"qweight": _pack8(_values(q, e)).T, "qzeros": _pack8((_zeros(q, e) - 1).T & 15),
            "scales": q.scales[e].T.half(), "g_idx": torch.arange(in_features, dtype=torch.int32) // q.group_size}


def _awq(q, e):  # qweight [K, N/8] and qzeros packed along N in AWQ's order
    return {"qweight": _pack8(_values(q, e).T, AWQ_ORDER), "qzeros": _pack8(_zeros(q, e).T, AWQ_ORDER),
            "scales": q.scales[e].T.half()}


def _ct_int4(q, e):  # pack-quantized: q + 8 packed along K; zero points + 8 packed along N
    return {"weight_packed": _pack8(_values(q, e)), "weight_scale": q.scales[e].half(),
            "weight_zero_point": _pack8(_zeros(q, e).T).T}


def _ct_int8(q, e):  # int-quantized, per channel
    return {"weight": q.codes[e], "weight_scale": q.scales[e].half()}


# case -> (our format, quantize's options, read_experts' options, per-expert writer (None:
# gpt-oss's stacked tensors), the checkpoint's code tensors' name suffix, the detected format)
CASES = {
    "fp8": ("fp8", {}, {}, _fp8, "_proj.weight", "fp8"),
    "gptq": ("int4", dict(group_size=32, symmetric=False), dict(group_size=32), _gptq, ".qweight", "gptq"),
    "awq": ("int4", dict(group_size=64, symmetric=False), dict(group_size=64), _awq, ".qweight", "awq"),
    "ct-int4": ("int4", dict(group_size=32, symmetric=False), dict(num_bits=4), _ct_int4, ".weight_packed",
                "compressed-tensors"),
    "ct-int8": ("int8", {}, dict(num_bits=8), _ct_int8, "_proj.weight", "compressed-tensors"),
    "mxfp4": ("mxfp4", {}, {}, None, "_blocks", "mxfp4"),
}


def _quantized(w, case):
    fmt, options, _, write, _, _ = CASES[case]
    q = md.quantize(w, fmt, dtype=torch.float32, **options)
    if write in (_gptq, _awq, _ct_int4, _ct_int8):  # these checkpoints hold float16 scales
        q = type(q)(q.codes, q.scales.half().float(), q.block, zeros=q.zeros, dtype=q.dtype)
    return q


def _checkpoint(case, gen, intermediate=None):
    """(tensors of one MoE layer in the case's names and layout, plus the router's; the float64
    experts they hold, gate rows first)."""
    write = CASES[case][3]
    inter = intermediate or (128 if case == "fp8" else 64)
    tensors = {f"{PREFIX}.gate.weight": torch.randn(E, H, generator=gen)}
    if write is None:  # gpt-oss: stacked, gate and up rows interleaved, biases
        gate_up, down = (_quantized(torch.randn(shape, generator=gen) / 8, case)
                         for shape in ((E, 2 * inter, H), (E, H, inter)))
        biases = torch.randn(E, 2 * inter, generator=gen) / 8, torch.randn(E, H, generator=gen) / 8
        for name, q, bias in (("gate_up_proj", gate_up, biases[0]), ("down_proj", down, biases[1])):
            tensors.update({f"{PREFIX}.experts.{name}_blocks": q.codes.view(*q.shape[:2], -1, 16),
                            f"{PREFIX}.experts.{name}_scales": q.scales, f"{PREFIX}.experts.{name}_bias": bias})
        dense = gate_up.dequantize(torch.float64)
        reference = md.ExpertWeights(torch.cat([dense[:, 0::2], dense[:, 1::2]], 1), down.dequantize(torch.float64),
                                     torch.cat([biases[0][:, 0::2], biases[0][:, 1::2]], 1).double(),
                                     biases[1].double(), "clamped_swiglu")
        return tensors, reference
    projections = {}
    for proj, shape in (("gate_proj", (E, inter, H)), ("up_proj", (E, inter, H)), ("down_proj", (E, H, inter))):
        projections[proj] = q = _quantized(torch.randn(shape, generator=gen) / 8, case)
        for e in range(E):
            tensors.update({f"{PREFIX}.experts.{e}.{proj}.{name}": t for name, t in write(q, e).items()})
    gate_up = torch.cat([projections[p].dequantize(torch.float64) for p in ("gate_proj", "up_proj")], 1)
    return tensors, md.ExpertWeights(gate_up, projections["down_proj"].dequantize(torch.float64))


def _save(tensors, tmp_path):
    path = tmp_path / "layer.safetensors"
    save_file({name: t.contiguous() for name, t in tensors.items()}, path)
    return path


@pytest.mark.parametrize("case", CASES)
def test_a_checkpoint_layer_runs_as_its_dequantized_weights(case, backend, gen, tmp_path):
    tensors, reference = _checkpoint(case, gen)
    path = _save(tensors, tmp_path)
    with safe_open(path, "pt") as f:
        assert detect_format(f, PREFIX) == CASES[case][5]
        experts = read_experts(f, PREFIX, dtype=torch.float32, **CASES[case][2])
    layer = md.MoE.from_experts(experts.gate_then_up(), TOP_K, backend=backend)
    twin = md.MoE.from_experts(reference, TOP_K, backend="torch")
    with torch.no_grad():
        layer.router.weight.copy_(tensors[f"{PREFIX}.gate.weight"])
        twin.router.weight.copy_(tensors[f"{PREFIX}.gate.weight"])
    x = torch.randn(2, 5, H, generator=gen)
    with torch.no_grad():
        assert_close(layer(x), twin(x.double()), torch.float32)

    # The layer holds the format's bytes: the checkpoint's codes, their scales and zero points,
    # no dense copy.
    assert isinstance(layer.w_gate_up, FrozenQuantized) and isinstance(layer.w_down, FrozenQuantized)
    assert not [name for name, p in layer.named_parameters() if p.dim() == 3]
    held = sum(b.nbytes for name, b in layer.named_buffers() if name.startswith(("w_gate_up.", "w_down.")))
    assert held == layer.experts.w_gate_up.nbytes + layer.experts.w_down.nbytes
    codes = sum(t.nbytes for name, t in tensors.items() if name.endswith(CASES[case][4]))
    assert layer.w_gate_up.codes.nbytes + layer.w_down.codes.nbytes == codes
    bfloat16_bytes = 2 * (layer.experts.w_gate_up.shape.numel() + layer.experts.w_down.shape.numel())
    assert held < 0.55 * bfloat16_bytes


def test_a_loaded_dict_and_sharded_handles_read_alike(gen, tmp_path):
    tensors, _ = _checkpoint("gptq", gen)
    names = sorted(tensors)
    halves = [{n: tensors[n] for n in names[: len(names) // 2]}, {n: tensors[n] for n in names[len(names) // 2:]}]
    paths = []
    for i, half in enumerate(halves):
        paths.append(tmp_path / f"model-0000{i}.safetensors")
        save_file({n: t.contiguous() for n, t in half.items()}, paths[-1])
    from_dict = read_experts(load_file(_save(tensors, tmp_path)), PREFIX, "gptq", group_size=32)
    with safe_open(paths[0], "pt") as first, safe_open(paths[1], "pt") as second:
        sharded = read_experts([first, second], PREFIX, group_size=32)
    for ours, theirs in zip(from_dict.flatten()[0], sharded.flatten()[0]):
        assert torch.equal(ours, theirs)


# ---- bad input -------------------------------------------------------------------------------


def test_a_missing_tensor_is_named(gen):
    tensors, _ = _checkpoint("gptq", gen)
    del tensors[f"{PREFIX}.experts.2.up_proj.qzeros"]
    with pytest.raises(KeyError, match=rf"{PREFIX}\.experts\.2\.up_proj\.qzeros.*gptq experts"):
        read_experts(tensors, PREFIX, group_size=32)
    tensors, _ = _checkpoint("mxfp4", gen)
    del tensors[f"{PREFIX}.experts.down_proj_scales"]
    with pytest.raises(KeyError, match=r"experts\.down_proj_scales"):
        read_experts(tensors, PREFIX)
    with pytest.raises(KeyError, match=r"no quantized experts under 'model\.layers\.4\.mlp\.experts'"):
        read_experts(tensors, "model.layers.4.mlp")


def test_act_order_g_idx_is_refused(gen):
    tensors, _ = _checkpoint("gptq", gen)
    name = f"{PREFIX}.experts.1.down_proj.g_idx"
    tensors[name] = tensors[name].flip(0)
    with pytest.raises(ValueError, match="g_idx is not k // group_size.*act-order"):
        read_experts(tensors, PREFIX, group_size=32)


def test_fp8_needs_an_intermediate_size_of_whole_blocks(gen):
    tensors, _ = _checkpoint("fp8", gen, intermediate=64)
    with pytest.raises(ValueError, match="intermediate size I=64 to be a multiple of 128"):
        read_experts(tensors, PREFIX)


@pytest.mark.parametrize("options, message", [
    (dict(format="gptq"), "gptq needs group_size"),
    (dict(format="exl2"), "format must be one of"),
    (dict(format="gptq", group_size=48), "group_size for int4 must be one of"),
])
def test_bad_options_are_named(options, message, gen):
    tensors, _ = _checkpoint("gptq", gen)
    with pytest.raises(ValueError, match=message):
        read_experts(tensors, PREFIX, **options)


# ---- a DeepSeek-V3 checkpoint directory -------------------------------------------------------

V3_LAYER, V3_E, V3_H, V3_I = 3, 8, 192, 128
V3_CONFIG = dict(n_routed_experts=V3_E, num_experts_per_tok=2, n_group=4, topk_group=2, routed_scaling_factor=2.5,
                 norm_topk_prob=True, n_shared_experts=1, first_k_dense_replace=1, scoring_func="sigmoid")


def _v3_directory(tmp_path, gen):
    """A DeepSeek-V3-style directory: config.json, two shards and their index, layer 3's router
    (bfloat16 weight, float32 bias), FP8 routed and shared experts (H=192: partial 128-blocks),
    and the float64 reference layer on the dequantized values."""
    prefix = f"model.layers.{V3_LAYER}.mlp"
    tensors = {f"{prefix}.gate.weight": torch.randn(V3_E, V3_H, generator=gen).bfloat16(),
               f"{prefix}.gate.e_score_correction_bias": torch.rand(V3_E, generator=gen) / 4,
               "model.layers.2.mlp.down_proj.weight": torch.randn(V3_H, V3_H, generator=gen).bfloat16()}  # another layer
    dense = {}
    for proj, shape in (("gate_proj", (V3_E + 1, V3_I, V3_H)), ("up_proj", (V3_E + 1, V3_I, V3_H)),
                        ("down_proj", (V3_E + 1, V3_H, V3_I))):
        q = md.quantize(torch.randn(shape, generator=gen) / 8, "fp8")  # expert V3_E: the shared one
        dense[proj] = q.dequantize(torch.float64)
        for e in range(V3_E + 1):
            name = f"{prefix}.shared_experts.{proj}" if e == V3_E else f"{prefix}.experts.{e}.{proj}"
            tensors.update({f"{name}.{n}": t for n, t in _fp8(q, e).items()})
    names = sorted(tensors, key=lambda n: (not n.startswith(f"{prefix}.gate"), n))  # as the files hold them
    shards = {"model-00001-of-00002.safetensors": names[:len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for file, held in shards.items():
        save_file({n: tensors[n].contiguous() for n in held}, tmp_path / file)
    weight_map = {n: file for file, held in shards.items() for n in held}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (tmp_path / "config.json").write_text(json.dumps(V3_CONFIG))

    experts = md.ExpertWeights(torch.cat([dense["gate_proj"][:V3_E], dense["up_proj"][:V3_E]], 1),
                               dense["down_proj"][:V3_E])
    reference = md.MoE.from_experts(experts, 2, scoring="sigmoid", n_groups=4, topk_groups=2, routed_scaling=2.5,
                                    n_shared_experts=1, backend="torch")
    with torch.no_grad():
        reference.router.weight.copy_(tensors[f"{prefix}.gate.weight"])
        reference.expert_bias.copy_(tensors[f"{prefix}.gate.e_score_correction_bias"])
        reference.shared_experts.gate_up.weight.copy_(torch.cat([dense["gate_proj"][V3_E], dense["up_proj"][V3_E]]))
        reference.shared_experts.down.weight.copy_(dense["down_proj"][V3_E])
    return tensors, weight_map, reference


def test_a_deepseek_v3_layer_is_read_shard_by_shard_as_its_dequantized_layer(backend, gen, tmp_path, monkeypatch):
    tensors, weight_map, reference = _v3_directory(tmp_path, gen)
    opened = []
    real_open = safetensors.safe_open
    monkeypatch.setattr(safetensors, "safe_open", lambda path, *a, **k: opened.append(path.name) or real_open(path, *a,
                                                                                                           **k))
    layer = read_deepseek_v3_layer(tmp_path, V3_LAYER, dtype=torch.float32, backend=backend)
    assert sorted(opened) == sorted(set(weight_map.values()))  # each shard opened once

    # the routed experts hold the checkpoint's FP8 codes and scales, no float copy
    assert isinstance(layer.w_gate_up, FrozenQuantized) and isinstance(layer.w_down, FrozenQuantized)
    assert not [name for name, p in layer.named_parameters() if p.dim() == 3]
    codes = sum(t.nbytes for name, t in tensors.items() if ".experts." in name and name.endswith(".weight"))
    assert layer.w_gate_up.codes.nbytes + layer.w_down.codes.nbytes == codes
    assert (layer.top_k, layer.n_groups, layer.topk_groups, layer.routed_scaling) == (2, 4, 2, 2.5)

    x = torch.randn(3, 4, V3_H, generator=gen)
    with torch.no_grad():
        assert_close(layer(x), reference.double()(x.double()), torch.float32)


@pytest.mark.parametrize("damage, error, message", [
    ("shard", FileNotFoundError, r"shard .*model-00002-of-00002\.safetensors is missing"),
    ("scale", KeyError, r"model\.layers\.3\.mlp\.experts\.5\.up_proj\.weight_scale_inv"),
    ("shape", ValueError, r"model\.layers\.3\.mlp\.experts\.6\.down_proj is .*\(1, 191, 128\).*, unlike"),
    ("router", ValueError, r"model\.layers\.3\.mlp\.gate\.weight must have shape \(8, 192\)"),
    ("config", KeyError, r"config\.json has no 'num_experts_per_tok'"),
    ("dense layer", ValueError, "layer 0 is a dense MLP"),
])
def test_a_damaged_deepseek_v3_directory_names_what_is_wrong(damage, error, message, gen, tmp_path):
    tensors, weight_map, _ = _v3_directory(tmp_path, gen)
    layer = 0 if damage == "dense layer" else V3_LAYER
    if damage == "shard":
        (tmp_path / "model-00002-of-00002.safetensors").unlink()
    elif damage == "config":
        (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in V3_CONFIG.items()
                                                          if k != "num_experts_per_tok"}))
    elif damage != "dense layer":
        name = {"scale": f"model.layers.{V3_LAYER}.mlp.experts.5.up_proj.weight_scale_inv",
                "shape": f"model.layers.{V3_LAYER}.mlp.experts.6.down_proj.weight",
                "router": f"model.layers.{V3_LAYER}.mlp.gate.weight"}[damage]
        file = weight_map[name]
        held = {n: tensors[n] for n, f in weight_map.items() if f == file and n != name}
        if damage != "scale":  # one row fewer
            held[name] = tensors[name][:-1]
        save_file({n: t.contiguous() for n, t in held.items()}, tmp_path / file)
        if damage == "scale":
            del weight_map[name]
            (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(error, match=message):
        read_deepseek_v3_layer(tmp_path, layer)


# ---- transformers models ---------------------------------------------------------------------

transformers = pytest.importorskip("transformers", minversion="5.0")
import test_transformers as tiny  # noqa: E402
from moe_dispatch.integrations import transformers as integration  # noqa: E402


def _sized(config_fn, **sizes):
    """A test_transformers config with experts sized for whole quantization groups."""
    def config():
        c = config_fn()
        for name, value in sizes.items():
            setattr(c, name, value)
        return c
    return config


MODELS = {
    "mixtral": _sized(tiny._mixtral, intermediate_size=64),
    "gpt_oss": _sized(tiny._gpt_oss, intermediate_size=32),
    "deepseek_v3": _sized(tiny._deepseek_v3, moe_intermediate_size=128),
}


def _dequantized_twin(model):
    """A copy of the model whose experts hold the quantized experts' values as float parameters."""
    twin = copy.deepcopy(model)
    for (_, experts), (_, float_experts) in zip(integration._experts_modules(model), _float_experts(twin)):
        for ours, theirs in zip(integration.expert_weights(experts)[:2], integration.expert_weights(float_experts)[:2]):
            with torch.no_grad():
                theirs.copy_(ours.dequantize(theirs.dtype))
    twin.set_experts_implementation("eager")
    return twin


def _float_experts(twin):
    """The twin's experts modules, float again: each FrozenQuantized back to a parameter of its layout."""
    found = integration._experts_modules(twin)
    for _, experts in found:
        for name in ("gate_up_proj", "down_proj"):
            frozen = getattr(experts, name)
            shape = frozen.shape if not integration.flag(experts, "is_transposed") else frozen.shape[:1] + frozen.shape[
                1:][::-1]
            delattr(experts, name)
            setattr(experts, name, torch.nn.Parameter(torch.empty(shape)))
    return found


def _logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids).logits


@pytest.mark.parametrize("family, fmt, options", [
    ("mixtral", "int4", dict(group_size=32)),
    ("gpt_oss", "mxfp4", {}),
    ("deepseek_v3", "fp8", {}),
    ("deepseek_v3", "int8", dict(group_size=32)),
])
def test_quantized_experts_run_as_their_dequantized_values(family, fmt, options, gen):
    model = tiny._tiny_model_from(MODELS[family], gen)
    integration.quantize_experts_(model, fmt, **options)
    model.set_experts_implementation(integration.register())
    twin = _dequantized_twin(model)
    input_ids = torch.randint(0, tiny.VOCAB, (2, 7), generator=gen)
    assert_close(_logits(model, input_ids), _logits(twin, input_ids))
    # .to(dtype) leaves the codes as they are; the experts then multiply bfloat16 activations
    codes = integration._experts_modules(model)[0][1].down_proj.codes
    model.to(torch.bfloat16)
    assert integration._experts_modules(model)[0][1].down_proj.codes.dtype == codes.dtype
    assert _logits(model, input_ids).dtype == torch.bfloat16


def test_from_transformers_keeps_quantized_experts(gen):
    model = tiny._tiny_model_from(MODELS["deepseek_v3"], gen, integration.register())
    integration.quantize_experts_(model, "int4", group_size=32)
    block = model.model.layers[-1].mlp
    layer = from_block = integration.from_transformers(block, backend="torch")
    assert isinstance(layer.w_gate_up, FrozenQuantized) and isinstance(layer.w_down, FrozenQuantized)
    assert layer.w_gate_up.codes.data_ptr() != block.experts.gate_up_proj.codes.data_ptr()  # a copy
    x = torch.randn(2, 5, 32, generator=gen)
    with torch.no_grad():
        assert_close(layer(x), block(x))
    target = tiny._tiny_model_from(MODELS["deepseek_v3"], gen, integration.register()).model.layers[-1].mlp
    integration.to_transformers(from_block, target)
    assert isinstance(target.experts.down_proj, FrozenQuantized)
    with torch.no_grad():
        assert_close(target(x), block(x))


@pytest.mark.parametrize("family, case", [("deepseek_v3", "fp8"), ("gpt_oss", "mxfp4")])
def test_a_model_takes_its_experts_from_a_quantized_checkpoint(family, case, gen, tmp_path):
    """What transformers on a CPU cannot keep: it loads FP8 and MXFP4 checkpoints dequantized."""
    model = tiny._tiny_model_from(MODELS[family], gen, integration.register())
    tensors = {}
    for name, experts in integration._experts_modules(model):
        w1, w2, _, _ = integration.expert_weights(experts)
        prefix = name.removesuffix(".experts")
        if case == "mxfp4":
            for proj, w, bias in (("gate_up_proj", w1, experts.gate_up_proj_bias), ("down_proj", w2,
                                                                                  experts.down_proj_bias)):
                q = md.quantize(w, "mxfp4")
                tensors.update({f"{prefix}.experts.{proj}_blocks": q.codes.view(*q.shape[:2], -1, 16),
                                f"{prefix}.experts.{proj}_scales": q.scales,
                                f"{prefix}.experts.{proj}_bias": bias.detach().to(torch.bfloat16)})
        else:
            inter = w2.shape[2]
            for proj, w in (("gate_proj", w1[:, :inter]), ("up_proj", w1[:, inter:]), ("down_proj", w2)):
                q = md.quantize(w, "fp8")
                for e in range(q.shape[0]):
                    tensors.update({f"{prefix}.experts.{e}.{proj}.{n}": t for n, t in _fp8(q, e).items()})
    with safe_open(_save(tensors, tmp_path), "pt") as f:
        integration.load_quantized_experts_(model, f)
    experts = integration._experts_modules(model)[0][1]
    assert experts.down_proj.format == CASES[case][0]
    twin = _dequantized_twin(model)
    if case == "mxfp4":  # the biases came from the checkpoint, in bfloat16
        assert torch.equal(experts.down_proj_bias, experts.down_proj_bias.bfloat16().float())
    input_ids = torch.randint(0, tiny.VOCAB, (2, 7), generator=gen)
    assert_close(_logits(model, input_ids), _logits(twin, input_ids))
