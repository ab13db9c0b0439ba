"""What only a GPU shows, on the Triton backend: no host sync in a training step, CUDA graph
capture (both with quantized experts too), bitwise determinism, bad expert ids reported at the next sync, tuned configs kept on
disk, nothing left to compile after warm_up, and the ops end to end in every dtype. All of it skips without CUDA."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

import moe_dispatch as md
from cases import CASES
from conftest import FLOAT_DTYPES, HAS_CUDA, HAS_TRITON, TRITON_UNAVAILABLE, assert_close, expert_weights, randn
from conftest import random_weights, subprocess_env
from reference import naive_grouped_mm, naive_moe_mlp

if not HAS_TRITON:
    pytest.skip(f"the triton backend cannot run here: {TRITON_UNAVAILABLE}", allow_module_level=True)

from moe_dispatch.backends.torch_backend import TorchBackend  # noqa: E402
from moe_dispatch.backends import triton_tuning as configs  # noqa: E402


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.usefixtures("pinned_configs")
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_gpu_ops_match_the_reference(case, dtype, gen):
    ids = case.ids(gen)
    plan = md.make_plan(ids.cuda(), case.experts, backend="triton")
    assert all(torch.equal(a.cpu(), b) for a, b in zip(
        plan.tensors(), TorchBackend().make_plan(ids, case.experts).tensors()))
    x = randn(case.tokens, case.hidden, gen=gen, dtype=dtype, device="cuda")
    weights = random_weights(case.tokens, case.top_k, gen).cuda()
    xs = md.permute(x, plan, backend="triton")
    assert torch.equal(xs.cpu(), x.cpu()[plan.token_of_row.cpu().long()])
    assert_close(md.unpermute(xs, plan, weights, backend="triton"),
                 (x.double() * weights.double().sum(1, keepdim=True)))
    w = randn(case.experts, case.inter, case.hidden, gen=gen, dtype=dtype, scale=case.hidden ** -0.5, device="cuda")
    ys = md.grouped_mm(xs, w.transpose(1, 2), plan.offsets, backend="triton")
    assert_close(ys, naive_grouped_mm(xs.cpu(), w.cpu().transpose(1, 2), plan.offsets.tolist()))
    w_gate_up, w_down, _, _ = expert_weights(case.experts, case.hidden, case.inter, gen, dtype, device="cuda")
    out = md.moe_mlp(x, weights, ids.cuda(), w_gate_up, w_down, backend="triton")
    assert out.dtype == dtype
    assert_close(out, naive_moe_mlp(*(t.cpu() for t in (x, weights, ids, w_gate_up, w_down))))


@pytest.mark.parametrize("fmt", ["int8", "int4", "fp8", "mxfp4"])
@pytest.mark.usefixtures("pinned_configs")
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_gpu_quantized_experts_in_bfloat16(fmt, gen):
    """The Triton kernels on each format's codes with bf16 activations (a bf16 tl.dot): the
    planned forward and its backward (x, routing weights, biases), the decode forward, and
    grouped_mm on q.mT; fp8 with a partial 128-column block (H = 192)."""
    hidden, inter, experts = 192, 64, 6
    w_gate_up, w_down, b_gate_up, b_down = expert_weights(experts, hidden, inter, gen, torch.float32, bias=True,
                                                          bias_dtype=torch.bfloat16, device="cuda")
    q_gate_up, q_down = (md.quantize(w, fmt, group_size=64 if fmt == "int4" else None, dtype=torch.bfloat16)
                         for w in (w_gate_up, w_down))
    dense = [q.dequantize(torch.float64).cpu() for q in (q_gate_up, q_down)]
    for tokens in (5, 40):  # the decode kernels without autograd, the planned path with it
        ids = torch.stack([torch.arange(tokens) % experts, (torch.arange(tokens) + 1) % experts], dim=1)
        leaves = [t.detach().clone().requires_grad_(tokens == 40) for t in (
            randn(tokens, hidden, gen=gen, dtype=torch.bfloat16, device="cuda"),
            random_weights(tokens, 2, gen).cuda(), b_gate_up, b_down)]
        out = md.moe_mlp(leaves[0], leaves[1], ids.cuda(), md.ExpertWeights(q_gate_up, q_down, *leaves[2:]),
                         backend="triton")
        cpu = [t.detach().cpu().double().requires_grad_() for t in leaves]
        expected = naive_moe_mlp(cpu[0], cpu[1], ids, *dense, cpu[2], cpu[3])
        assert_close(out, expected, torch.bfloat16)
    dy = randn(*out.shape, gen=gen, dtype=torch.bfloat16, scale=hidden**-0.5, device="cuda")  # gradients of order one
    for grad, want in zip(torch.autograd.grad(out, leaves, dy),
                          torch.autograd.grad(expected, cpu, dy.cpu().double())):
        assert_close(grad, want, torch.bfloat16)
    offsets = torch.tensor([0, 10, 10, 25, 30, 40, 40], device="cuda")  # experts 1 and 5 empty
    xs = randn(40, hidden, gen=gen, dtype=torch.bfloat16, device="cuda")
    assert_close(md.grouped_mm(xs, q_gate_up.mT, offsets, backend="triton"),
                 naive_grouped_mm(xs.cpu(), dense[0].transpose(1, 2), offsets.tolist()), torch.bfloat16)


@pytest.mark.usefixtures("pinned_configs")
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_gpu_fp8_w8a8_in_bfloat16(gen):
    """fp8 experts at precision "w8a8" with bf16 activations (float8 dots from sm_89 on, float16
    ones below): the reference's w8a8 within bf16's rounding, through grouped_mm (experts 1 and 5
    empty) and moe_mlp (T = 5, which the decode kernels decline, and T = 300); the error
    against the unquantized float64 layer within tests/test_w8a8.py's bound (MLP_ERROR, 8%)."""
    hidden, inter, experts = 192, 64, 6  # H: a whole 128-column group and a partial one
    w_gate_up, w_down, _, _ = expert_weights(experts, hidden, inter, gen, torch.float32, device="cuda")
    q_gate_up, q_down = (md.quantize(w, "fp8", dtype=torch.bfloat16, precision="w8a8") for w in (w_gate_up, w_down))
    for tokens in (5, 300):
        ids = torch.stack([torch.arange(tokens) % experts, (torch.arange(tokens) + 1) % experts], dim=1).cuda()
        x = randn(tokens, hidden, gen=gen, dtype=torch.bfloat16, device="cuda")
        weights = random_weights(tokens, 2, gen).cuda()
        out = md.moe_mlp(x, weights, ids, q_gate_up, q_down, backend="triton")
        # the fused GEMM1's activation comes from float32 sums, the reference's from h in bf16: an
        # activation one ulp apart may round to another e4m3 value (tests/test_w8a8.py, ACT_ROUNDING)
        expected = md.moe_mlp(x, weights, ids, q_gate_up, q_down, backend="torch").cpu().double()
        assert float((out.cpu().double() - expected).norm() / expected.norm()) < 0.05
        exact = naive_moe_mlp(*(t.cpu() for t in (x, weights, ids, w_gate_up, w_down)))
        assert float((out.cpu().double() - exact).norm() / exact.norm()) < 0.08
    offsets = torch.tensor([0, 10, 10, 25, 30, 40, 40], device="cuda")
    xs = randn(40, hidden, gen=gen, dtype=torch.bfloat16, device="cuda")
    assert_close(md.grouped_mm(xs, q_gate_up.mT, offsets, backend="triton"),
                 md.grouped_mm(xs, q_gate_up.mT, offsets, backend="torch"), torch.bfloat16)


def _layer_and_input(gen, tokens=300, weights=None):
    """A bf16 layer (its experts quantized to the format `weights`, when given) and an input."""
    torch.manual_seed(0)
    layer = md.MoE(256, 128, 16, 4, bias=True, backend="triton", device="cuda", dtype=torch.bfloat16)
    if weights is not None:
        layer.quantize_(weights)
    x = randn(tokens, 256, gen=gen, dtype=torch.bfloat16, device="cuda")
    return layer, x


@pytest.mark.usefixtures("pinned_configs")
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("weights", [None, "int4"], ids=["bf16", "int4"])
def test_gpu_layer_never_syncs_with_the_host(weights, gen):
    layer, x = _layer_and_input(gen, weights=weights)
    x.requires_grad_()
    layer(x).float().square().sum().backward()  # compile outside the checked region
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        layer(x).float().square().sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.usefixtures("pinned_configs")
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("weights", [None, "mxfp4"], ids=["bf16", "mxfp4"])
@pytest.mark.parametrize("tokens", [300, 4], ids=["planned", "decode"])
def test_gpu_layer_forward_captures_in_a_cuda_graph(tokens, weights, gen):
    layer, x = _layer_and_input(gen, tokens, weights)
    static_x = x.clone()
    with torch.no_grad():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            layer(static_x)  # compile before capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = layer(static_x)
        fresh = randn(*x.shape, gen=gen, dtype=x.dtype, device="cuda")
        static_x.copy_(fresh)
        graph.replay()
        torch.testing.assert_close(static_out, layer(fresh), rtol=0, atol=0)


@pytest.mark.usefixtures("pinned_configs")
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_gpu_forward_and_backward_are_bitwise_deterministic(gen):
    layer, x = _layer_and_input(gen, tokens=1000)

    def step():
        layer.zero_grad()
        leaf = x.detach().requires_grad_()
        out = layer(leaf)
        out.float().square().sum().backward()
        return [out, leaf.grad] + [p.grad.clone() for p in layer.parameters() if p.grad is not None]

    first, second = step(), step()
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("call", [
    'md.make_plan(ids, 4, backend="triton")',
    # the decode kernels, no plan
    'md.moe_mlp(torch.randn(2, 8, device="cuda"), torch.ones(2, 2, device="cuda"), ids,'
    ' torch.randn(4, 16, 8, device="cuda"), torch.randn(4, 8, 8, device="cuda"), backend="triton")',
], ids=["plan", "decode"])
def test_gpu_bad_expert_id_surfaces_at_the_next_sync(call):
    # A device-side assert poisons the CUDA context, so it runs in its own process. The call does
    # not wait for it (no host sync: test_gpu_layer_never_syncs_with_the_host); CUDA reports it
    # at the next call into the driver, a later launch of the same call or the sync, whichever
    # comes first once the device has hit it. Not a tile config's failure: no fallback, no warning.
    script = textwrap.dedent(f"""
        import torch, moe_dispatch as md
        ids = torch.tensor([[0, 4], [1, 2]], device="cuda")
        try:
            {call}
            torch.cuda.synchronize()
        except RuntimeError as exc:
            print("SURFACED", exc)
        else:
            print("SILENT")
    """)
    env = subprocess_env(drop="MOE_DISPATCH_CHECKS", MOE_DISPATCH_AUTOTUNE="0")  # tuning would sync first
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    output = result.stdout + result.stderr
    assert "SURFACED" in result.stdout, output
    assert "an expert id outside [0, num_experts) reached the triton backend" in output, output
    assert "tile config" not in output, output


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_gpu_bad_expert_id_raises_eagerly_with_checks(monkeypatch):
    monkeypatch.setenv("MOE_DISPATCH_CHECKS", "1")
    with pytest.raises(ValueError, match="expert id -1"):
        md.make_plan(torch.tensor([[0, -1]], device="cuda"), 4, backend="triton")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_gpu_tune_persists_the_layer_configs(tmp_path, monkeypatch):
    from moe_dispatch.benchmarking.tune import tune

    monkeypatch.setenv(configs.CACHE_DIR_ENV, str(tmp_path))
    monkeypatch.setenv(configs.AUTOTUNE_ENV, "0")  # tune() times the candidates regardless
    tune(64, 128, 64, 8, 2, backward=False)
    path = tune(8, 128, 64, 8, 2, backward=False)  # a decode step: its own kernels too
    table = json.loads(path.read_text())["entries"]
    assert path.parent == tmp_path
    assert {key.split(":")[0] for key in table} >= {"mm", "up", "down", "dec_up", "dec_down"}
    assert all(set(entry) == set(configs.asdict(configs.SAFE)) for entry in table.values())


def _compiled_triton_kernels() -> int:
    """The compiled variants of every Triton kernel of the package so far, on every device."""
    modules = [m for name, m in list(sys.modules.items()) if name.startswith("moe_dispatch.kernels.triton")]
    return sum(len(cache[0]) for module in modules for value in vars(module).values()
               for cache in getattr(value, "device_caches", {}).values())


@pytest.mark.usefixtures("pinned_configs")
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_gpu_after_warm_up_no_call_compiles_a_triton_kernel():
    layer = md.MoE(256, 128, 8, 2, dtype=torch.bfloat16, device="cuda", backend="triton")
    md.warm_up(layer, max_tokens=32, backward=True)
    before = _compiled_triton_kernels()
    assert before > 0, "no compiled Triton kernel found: this Triton keeps them elsewhere than device_caches"
    gen = torch.Generator("cuda").manual_seed(0)
    for tokens in (3, 6, 7, 13, 17, 24, 31, 32):
        x = torch.randn(tokens, 256, dtype=torch.bfloat16, device="cuda", generator=gen)
        with torch.no_grad():
            layer(x)
        out, aux = layer(x.requires_grad_(), return_aux=True)
        (out.float().square().mean() + aux.z_loss).backward()
    torch.cuda.synchronize()
    assert _compiled_triton_kernels() == before
