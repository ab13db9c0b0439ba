"""moe_mlp and the MoE layer on quantized experts (formats/quantized.py): every backend against
the float64 reference on the dequantized weights, each Numba path, gradients around frozen
weights, the layer's quantize_ and state_dict, and the errors. The formats themselves (quantize,
dequantize, the checkpoint importers) are tests/test_formats.py's."""

from __future__ import annotations

import pytest
import torch

import moe_dispatch as md
from conftest import (CPU_BACKENDS, TOLERANCE, assert_close, count_decode_steps, expert_weights,
                      large_groups_everywhere, needs_numba, random_ids, random_weights, register_tiles_everywhere,
                      small_groups_everywhere)
from moe_dispatch.formats.quantized import quantized_formats
from reference import naive_moe_mlp

# (format, quantize options, hidden, intermediate): the 4-bit formats and int8 groups need K
# (H for w_gate_up, I for w_down) in whole groups; fp8 and per-channel int8 take any size,
# and odd ones check the partial blocks. On 16-bit activations the Numba decode step reads K
# in steps of 32 codes, 64 for the 4-bit formats (kernels/numba/packed_dots.py), where K and
# the groups allow, and the float kernels elsewhere (int8-channel, fp8-partial-blocks, the
# down projection of int4-g32, whose K is 32). fp8-chunks' up projection (K = 192) meets
# bfloat16 activations as bfloat16 pairs, its down projection (K = 96) as float32.
FORMATS = [
    pytest.param("int8", {}, 33, 19, id="int8-channel"),
    pytest.param("int8", {"group_size": 32}, 64, 32, id="int8-g32"),
    pytest.param("int4", {"group_size": 32}, 64, 32, id="int4-g32"),
    pytest.param("int4", {"group_size": 64, "symmetric": False}, 128, 64, id="int4-g64-zero-points"),
    pytest.param("fp8", {}, 136, 19, id="fp8-partial-blocks"),
    pytest.param("fp8", {}, 192, 96, id="fp8-chunks"),
    pytest.param("mxfp4", {}, 64, 64, id="mxfp4"),
]


def quantized_case(fmt, options, hidden, inter, gen, dtype, tokens=7, top_k=2, num_experts=5, activation="swiglu",
                   bias=False):
    w_gate_up, w_down, b_gate_up, b_down = expert_weights(num_experts, hidden, inter, gen, torch.float32, activation,
                                                          bias=bias, bias_dtype=torch.float32)
    q_gate_up, q_down = (md.quantize(w, fmt, dtype=dtype, **options) for w in (w_gate_up, w_down))
    x = torch.randn(tokens, hidden, generator=gen).to(dtype)
    ids = random_ids(tokens, top_k, num_experts, gen)
    return x, random_weights(tokens, top_k, gen), ids, q_gate_up, q_down, b_gate_up, b_down


def expected(x, weights, ids, q_gate_up, q_down, b_gate_up=None, b_down=None, activation="swiglu", interleaved=False):
    """The definition: the float64 reference on the dequantized weights."""
    return naive_moe_mlp(x, weights, ids, q_gate_up.dequantize(torch.float64), q_down.dequantize(torch.float64),
                         b_gate_up, b_down, activation, interleaved)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("fmt,options,hidden,inter", FORMATS)
def test_moe_mlp_on_quantized_weights_matches_the_dequantized_reference(fmt, options, hidden, inter, dtype, backend,
                                                                       gen):
    if backend == "triton" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter cannot do a bfloat16 tl.dot")
    x, weights, ids, q_gate_up, q_down, _, _ = quantized_case(fmt, options, hidden, inter, gen, dtype)
    out = md.moe_mlp(x, weights, ids, q_gate_up, q_down, backend=backend)
    assert out.dtype == dtype
    assert_close(out, expected(x, weights, ids, q_gate_up, q_down), dtype)


def test_the_reference_backend_equals_itself_on_the_dequantized_weights(gen):
    """DESIGN.md's contract: quantized weights compute what q.dequantize(x.dtype) computes."""
    x, weights, ids, q_gate_up, q_down, _, _ = quantized_case("int4", {"group_size": 32}, 64, 32, gen, torch.bfloat16)
    out = md.moe_mlp(x, weights, ids, q_gate_up, q_down, backend="torch")
    assert torch.equal(out, md.moe_mlp(x, weights, ids, q_gate_up.dequantize(), q_down.dequantize(), backend="torch"))


@needs_numba
@pytest.mark.parametrize("path", ["decode-direct", "decode", "blocked", "register-tiles"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("fmt,options,hidden,inter", FORMATS)
def test_numba_paths_read_the_packed_codes(fmt, options, hidden, inter, dtype, path, gen, monkeypatch):
    """decode-direct: at most two rows per expert, dot products straight from the codes;
    decode: each weight row converted once into a buffer in L1 and dotted with the expert's
    rows; blocked: one expert at a time dequantized into a reused buffer, then the library
    product; register-tiles: the same buffer, then the expert MLP on register tiles of
    bfloat16 pairs (bfloat16 activations, H and I even, where no AMX takes the blocked path;
    the others blocked)."""
    force = {"blocked": large_groups_everywhere, "register-tiles": register_tiles_everywhere}
    force.get(path, small_groups_everywhere)(monkeypatch)
    steps = count_decode_steps(monkeypatch, "quantized_kernels")
    import moe_dispatch.backends.numba_backend as nb

    tiles, real = [], nb.expert_tiles.expert_mlp_bf16
    monkeypatch.setattr(nb.expert_tiles, "expert_mlp_bf16", lambda *args: tiles.append(1) or real(*args))
    tokens = 2 if path == "decode-direct" else 23  # 2 tokens, top-3 of 5 experts: at most 2 rows each
    x, weights, ids, q_gate_up, q_down, b_gate_up, b_down = quantized_case(fmt, options, hidden, inter, gen, dtype,
                                                                           tokens=tokens, top_k=3, bias=True)
    experts = md.ExpertWeights(q_gate_up, q_down, b_gate_up, b_down)
    out = md.moe_mlp(x, weights, ids, experts, backend="numba")
    assert_close(out, expected(x, weights, ids, q_gate_up, q_down, b_gate_up, b_down), dtype)
    assert bool(steps) == (path not in ("blocked", "register-tiles"))
    pairs = (dtype == torch.bfloat16 and hidden % 2 == inter % 2 == 0
             and not any(nb.takes_quantized_tiles(w, dtype) for w in (q_gate_up, q_down)))
    assert bool(tiles) == (path == "register-tiles" and pairs)


@needs_numba
@pytest.mark.parametrize("fmt,options", [("int4", {"group_size": 32}), ("mxfp4", {}), ("fp8", {})])
def test_numba_decode_carries_a_value_that_is_not_finite_as_the_reference_does(fmt, options, gen,
                                                                                 monkeypatch):
    """Integers cannot carry an infinity: a step whose activations hold one takes the float
    kernels, and its token comes out as the reference's."""
    small_groups_everywhere(monkeypatch)
    x, weights, ids, q_gate_up, q_down, _, _ = quantized_case(fmt, options, 64, 32, gen, torch.bfloat16, tokens=3)
    x[1, 3] = float("inf")
    out = md.moe_mlp(x, weights, ids, q_gate_up, q_down, backend="numba")
    ref = md.moe_mlp(x, weights, ids, q_gate_up, q_down, backend="torch")
    assert torch.equal(out.isfinite(), ref.isfinite()) and not out[1].isfinite().any()
    assert_close(out[[0, 2]], expected(x, weights, ids, q_gate_up, q_down)[[0, 2]], torch.bfloat16)


@needs_numba
@pytest.mark.parametrize("path", ["decode", "blocked"])
@pytest.mark.parametrize("activation,interleaved", [("gelu", False), ("clamped_swiglu", True), ("geglu", False)])
def test_numba_quantized_activations(activation, interleaved, path, gen, monkeypatch):
    """gpt-oss's experts as shipped: mxfp4, gate and up rows interleaved, clamped SwiGLU."""
    (small_groups_everywhere if path == "decode" else large_groups_everywhere)(monkeypatch)
    x, weights, ids, q_gate_up, q_down, b_gate_up, b_down = quantized_case("mxfp4", {}, 64, 32, gen, torch.float32,
                                                                           activation=activation, bias=True)
    experts = md.ExpertWeights(q_gate_up, q_down, b_gate_up, b_down, activation, interleaved)
    out = md.moe_mlp(x, weights, ids, experts, backend="numba")
    assert_close(out, expected(x, weights, ids, q_gate_up, q_down, b_gate_up, b_down, activation, interleaved))


@needs_numba
@pytest.mark.nojit
@pytest.mark.parametrize("fmt,options", [("int8", {"group_size": 32}), ("int4", {"group_size": 32, "symmetric": False}),
                                         ("fp8", {}), ("mxfp4", {})])
def test_nojit_quantized_kernels(fmt, options, gen, monkeypatch):
    """The kernels' Python source, which NUMBA_DISABLE_JIT=1 runs as written (CI's coverage)."""
    small_groups_everywhere(monkeypatch)
    x, weights, ids, q_gate_up, q_down, _, _ = quantized_case(fmt, options, 64, 32, gen, torch.bfloat16, tokens=3)
    out = md.moe_mlp(x, weights, ids, q_gate_up, q_down, backend="numba")
    assert_close(out, expected(x, weights, ids, q_gate_up, q_down), torch.bfloat16)
    register_tiles_everywhere(monkeypatch)  # each expert dequantized into a buffer, then pairs of bfloat16
    out = md.moe_mlp(x, weights, ids, md.ExpertWeights(q_gate_up, q_down), backend="numba")
    assert_close(out, expected(x, weights, ids, q_gate_up, q_down), torch.bfloat16)
    dense = torch.empty(q_down.shape, dtype=torch.bfloat16)
    import moe_dispatch.backends.numba_backend as nb

    nb.quantized_kernels.dequantize_experts(nb.quantized_rows(q_down), torch.arange(5, dtype=torch.int32).numpy(),
                                            nb.as_array(dense))
    assert torch.equal(dense, q_down.dequantize(torch.bfloat16))


@needs_numba
def test_numba_mixes_a_quantized_gate_up_with_a_float_down(gen):
    x, weights, ids, q_gate_up, q_down, _, _ = quantized_case("int8", {}, 33, 19, gen, torch.float32)
    w_down = q_down.dequantize()
    out = md.moe_mlp(x, weights, ids, q_gate_up, w_down, backend="numba")
    assert_close(out, expected(x, weights, ids, q_gate_up, q_down))


# ---- gradients around frozen quantized weights ------------------------------------------------


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "triton"])
def test_gradients_reach_x_the_routing_weights_and_the_biases(backend, gen):
    x, weights, ids, q_gate_up, q_down, b_gate_up, b_down = quantized_case("int4", {"group_size": 32}, 64, 32, gen,
                                                                           torch.float32, bias=True)
    leaves = [t.clone().requires_grad_() for t in (x, weights, b_gate_up, b_down)]
    out = md.moe_mlp(leaves[0], leaves[1], ids, md.ExpertWeights(q_gate_up, q_down, leaves[2], leaves[3]),
                     backend=backend)
    dy = torch.randn(out.shape, generator=gen)
    grads = torch.autograd.grad(out, leaves, dy)
    ref_leaves = [t.double().requires_grad_() for t in (x, weights, b_gate_up, b_down)]
    ref = naive_moe_mlp(ref_leaves[0], ref_leaves[1], ids, q_gate_up.dequantize(torch.float64),
                        q_down.dequantize(torch.float64), ref_leaves[2], ref_leaves[3])
    for grad, ref_grad in zip(grads, torch.autograd.grad(ref, ref_leaves, dy.double())):
        assert_close(grad, ref_grad, torch.float32)


def test_a_gradient_for_a_quantized_weight_is_refused_by_name(gen):
    x, weights, ids, q_gate_up, q_down, _, _ = quantized_case("fp8", {}, 136, 19, gen, torch.float32)
    q_down.scales.requires_grad_()
    with pytest.raises(ValueError, match="w_down is a frozen fp8 weight"):
        md.moe_mlp(x, weights, ids, q_gate_up, q_down)
    with torch.no_grad():  # no gradient asked for: it runs
        md.moe_mlp(x, weights, ids, q_gate_up, q_down)


def test_activations_of_another_dtype_are_refused_by_name(gen):
    x, weights, ids, q_gate_up, q_down, _, _ = quantized_case("int8", {}, 33, 19, gen, torch.bfloat16)
    with pytest.raises(TypeError, match=r"w_gate_up is int8 for torch.bfloat16 activations but x is torch.float32"):
        md.moe_mlp(x.float(), weights, ids, q_gate_up, q_down)
    with pytest.raises(TypeError, match="w_down"):  # a float w_down of another dtype beside a quantized w_gate_up
        md.moe_mlp(x, weights, ids, q_gate_up, q_down.dequantize(torch.float32))


def test_compiled_moe_mlp_carries_quantized_weights(gen):
    """One compiled function over weights of two formats and block sizes (two layers of a
    model, say): the second call recompiles, and a block size dynamo made symbolic must not
    break the spec string."""
    torch._dynamo.reset()

    def step(x, weights, ids, experts):
        return md.moe_mlp(x, weights, ids, experts)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for fmt, options in (("int4", {"group_size": 32}), ("int8", {"group_size": 64})):
        x, weights, ids, q_gate_up, q_down, _, _ = quantized_case(fmt, options, 64, 64, gen, torch.float32)
        out = compiled(x, weights, ids, md.ExpertWeights(q_gate_up, q_down))
        assert_close(out, expected(x, weights, ids, q_gate_up, q_down))


# ---- the MoE layer ---------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", quantized_formats())
def test_layer_quantized_in_place_runs_its_dequantized_twin(fmt, gen):
    torch.manual_seed(0)
    layer = md.MoE(128, 128, 6, 2, n_shared_experts=1)  # K in whole groups of int4's default 128
    x = torch.randn(9, 128, generator=gen)
    layer.quantize_(fmt)
    assert [name for name, _ in layer.named_parameters()] == ["router.weight", "shared_experts.gate_up.weight",
                                                              "shared_experts.down.weight"]
    twin = md.MoE.from_experts(layer.experts.dense(), 2, n_shared_experts=1)
    twin.load_state_dict({k: v for k, v in layer.state_dict().items() if not k.startswith(("w_gate_up", "w_down"))},
                         strict=False)
    assert_close(layer(x), twin(x).double())
    with pytest.raises(ValueError, match="already"):
        layer.quantize_(fmt)


def test_layer_state_dict_round_trips_and_to_keeps_the_codes(gen):
    torch.manual_seed(0)
    layer = md.MoE(64, 32, 6, 2).quantize_("int4", group_size=32, symmetric=False)
    state = layer.state_dict()
    assert {"w_gate_up.codes", "w_gate_up.scales", "w_gate_up.zeros", "w_down.codes"} <= set(state)
    loaded = md.MoE(64, 32, 6, 2).quantize_("int4", group_size=32, symmetric=False)
    loaded.load_state_dict(state)
    x = torch.randn(5, 64, generator=gen)
    assert torch.equal(loaded(x), layer(x))
    half = loaded.to(torch.bfloat16)
    assert half.w_gate_up.scales.dtype == torch.float32 and half.w_gate_up.codes.dtype == torch.uint8
    assert torch.equal(half.w_gate_up.scales, layer.w_gate_up.scales)
    rtol, atol = TOLERANCE[torch.bfloat16]
    torch.testing.assert_close(half(x.bfloat16()).float(), layer(x), rtol=rtol, atol=atol)


def test_layer_from_quantized_experts_holds_them_frozen(gen):
    x, weights, ids, q_gate_up, q_down, _, _ = quantized_case("mxfp4", {}, 64, 32, gen, torch.float32)
    layer = md.MoE.from_experts(md.ExpertWeights(q_gate_up, q_down), top_k=2)
    assert layer.w_gate_up.codes is q_gate_up.codes and not list(layer.w_down.parameters())
    with pytest.raises(ValueError, match="quantized"):
        layer.reset_parameters()


# ---- grouped_mm ------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("fmt,options", [("int4", {"group_size": 32, "symmetric": False}), ("fp8", {}),
                                         ("mxfp4", {})])
def test_grouped_mm_multiplies_by_the_transposed_quantized_weight(fmt, options, backend, gen):
    w = torch.randn(4, 48, 64, generator=gen) / 8
    q = md.quantize(w, fmt, **options)
    xs = torch.randn(10, 64, generator=gen, dtype=torch.float32, requires_grad=True)
    offsets = torch.tensor([0, 3, 3, 7, 10])  # expert 1 empty
    out = md.grouped_mm(xs, q.mT, offsets, backend=backend)
    dense = q.dequantize(torch.float64)
    reference = torch.cat([xs[s:t].double() @ dense[e].T for e, (s, t) in enumerate(zip([0, 3, 3, 7], [3, 3, 7, 10]))])
    assert_close(out, reference)
    dy = torch.randn(out.shape, generator=gen)
    (grad,) = torch.autograd.grad(out, xs, dy)
    assert_close(grad, torch.cat([dy[s:t].double() @ dense[e] for e, (s, t) in enumerate(zip([0, 3, 3, 7],
                                                                                                [3, 3, 7, 10]))]))
    torch._dynamo.reset()  # each case recompiles this lambda: nine would pass dynamo's recompile limit
    compiled = torch.compile(lambda a: md.grouped_mm(a, q.mT, offsets, backend=backend), fullgraph=True,
                             backend="aot_eager")
    assert_close(compiled(xs), reference)
    with pytest.raises(ValueError, match=r"pass q.mT"):
        md.grouped_mm(xs, q, offsets, backend=backend)
