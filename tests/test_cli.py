"""The `moe-dispatch` command and the benchmarking package behind it, at tiny shapes.

Bad input exits 2 with one line naming the valid choices; --json records carry the keys the
docs promise; the peers compute what moe_mlp computes on the same weights and routing;
Ctrl-C keeps the results so far. Timings here only need to exist, never to be fast.
"""

from __future__ import annotations

import json
import platform
import signal
import subprocess
import sys

import pytest
import torch

import moe_dispatch.benchmarking.bench as bench_module
import moe_dispatch.benchmarking.roofline as roofline_module
from moe_dispatch import cache_files
from moe_dispatch import backends, moe_mlp, quantize
import moe_dispatch.benchmarking.memory as memory_module
from moe_dispatch.benchmarking.bench import BenchSpec, backend_call, prepare
from moe_dispatch.benchmarking.cases import ROUTINGS, make_experts, make_ids, make_inputs, make_layer, quantized_experts
from moe_dispatch.benchmarking.costs import Work
from moe_dispatch.benchmarking.peers import moe_peer, peer_call
from moe_dispatch.benchmarking import summary
from moe_dispatch.benchmarking.presets import DEFAULT_PRESET, DEFAULT_SCALE, DEFAULT_TOKENS, PRESETS, get_preset, scaled
from moe_dispatch.benchmarking.roofline import Roofline, cache_path, device_key
from moe_dispatch.benchmarking.timing import capture_cuda_graphs, measure_many
from moe_dispatch.benchmarking.tune import tune_preset
from moe_dispatch.cli import main, parse_presets, parse_tokens
from conftest import HAS_CUDA, HAS_NUMBA

CPU = torch.device("cpu")
# A tiny olmoe: E=64 k=8 H=48 I=16; every bench below runs it at T in {1, 4}.
TINY = ["--preset", "olmoe-1b-7b", "--scale", "0.02", "--tokens", "1,4", "--device", "cpu", "--budget", "0.005"]
RECORD_KEYS = {"preset", "backend", "dtype", "tokens", "ms", "tflops", "gbps", "roofline", "peers", "speedup",
               "routing", "device", "bound"}
STAGES = ["route", "plan", "permute", "gemm1+act", "gemm2", "combine"]


@pytest.fixture(autouse=True)
def one_thread():
    """These tests time nothing that matters; one thread keeps them quick on a busy machine,
    where parallel regions of many processes fight for the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def roofline_cache(one_thread, tmp_path, monkeypatch):
    """A private cache holding a roofline for this CPU, and bandwidths that read the same
    figures back, so commands do not measure one."""
    monkeypatch.setenv("MOE_DISPATCH_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(roofline_module, "measure_bandwidth", lambda device: (20.0, 15.0))
    roofline = Roofline(device_key(CPU), 20.0, 15.0, {"bfloat16": 0.5, "float16": 0.01, "float32": 0.2},
                        torch.__version__, "test", roofline_module.METHOD)
    path = cache_path()
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({roofline.device: roofline.__dict__}))
    return path


def one_line_error(capsys, argv, *expected):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err, err
    for text in expected:
        assert text in err, err
    return err


# ---- presets and defaults --------------------------------------------------------------------


def test_presets_match_the_public_configs():
    v3 = PRESETS["deepseek-v3"]
    assert (v3.num_experts, v3.top_k, v3.hidden_size, v3.intermediate_size) == (256, 8, 7168, 2048)
    routing = (v3.n_groups, v3.topk_groups, v3.scoring, v3.routed_scaling, v3.n_shared_experts)
    assert routing == (8, 4, "sigmoid", 2.5, 1)
    assert PRESETS["deepseek-v2-lite"].n_shared_experts == 2
    assert PRESETS["gpt-oss-20b"].bias and not PRESETS["mixtral-8x7b"].bias
    assert {p.name for p in PRESETS.values()} == {"mixtral-8x7b", "deepseek-v3", "deepseek-v2-lite", "qwen3-30b-a3b",
                                                 "olmoe-1b-7b", "gpt-oss-20b"}


@pytest.mark.parametrize("factor", [0.25, 0.1, 0.013, 1 / 3])
def test_scale_rounds_h_and_i_to_multiples_of_16(factor):
    for preset in PRESETS.values():
        small = scaled(preset, factor)
        assert small.hidden_size % 16 == 0 and small.intermediate_size % 16 == 0
        assert abs(small.hidden_size - preset.hidden_size * factor) <= 8 or small.hidden_size == 16
        assert (small.num_experts, small.top_k) == (preset.num_experts, preset.top_k)


def test_defaults_without_arguments():
    (preset,) = parse_presets(None, None, CPU)
    assert preset.name == DEFAULT_PRESET and preset.scale == DEFAULT_SCALE["cpu"]
    assert parse_tokens(None, CPU) == list(DEFAULT_TOKENS["cpu"])
    assert parse_tokens("16,1,16", CPU) == [1, 16]


# ---- bad input ---------------------------------------------------------------------------------


def test_the_command_exits_2_on_bad_input():
    """Through the interpreter as the console script runs it: sys.exit(main())."""
    done = subprocess.run([sys.executable, "-m", "moe_dispatch.cli", "bench", "--preset", "nope"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "mixtral-8x7b" in done.stderr


def test_unknown_preset_lists_the_presets(capsys):
    one_line_error(capsys, ["bench", "--preset", "llama-moe", "--device", "cpu"], "llama-moe", *PRESETS)


@pytest.mark.parametrize("tokens", ["1,x", "0", "", "1,,4", "-3", "1.5"])
def test_malformed_tokens(capsys, tokens):
    one_line_error(capsys, ["bench", "--tokens", tokens, "--device", "cpu"], "--tokens", "e.g. 1,16,128")


def test_unknown_backend_lists_the_choices(capsys):
    one_line_error(capsys, ["bench", "--backend", "cuda-fast", "--device", "cpu"], "auto", "torch", "numba", "triton",
                   "all")


def test_unavailable_backend_names_the_available_ones(capsys, monkeypatch):
    real = backends.unavailable_reason
    monkeypatch.setattr(backends, "unavailable_reason",
                        lambda name, device: "switched off for this test" if name == "numba" else real(name, device))
    err = one_line_error(capsys, ["bench", "--backend", "numba", "--device", "cpu"], "switched off", "torch")
    assert "available here" in err


@pytest.mark.parametrize("argv, expected", [
    (["bench", "--dtype", "int8"], ("bfloat16", "float16", "float32")),
    (["bench", "--routing", "random"], ("uniform", "skewed", "zipf")),
    (["bench", "--compare", "vllm", "--device", "cpu"], ("hf-eager", "hf-grouped-mm", "torch-grouped-mm", "dense")),
    (["bench", "--scale", "0", "--device", "cpu"], ("--scale",)),
    (["bench", "--threads", "0", "--device", "cpu"], ("--threads",)),
    (["bench", "--budget", "0", "--device", "cpu"], ("--budget", "positive")),
    (["profile", "--budget", "soon", "--device", "cpu"], ("--budget", "'soon'")),
    (["bench", "--device", "tpu"], ("cpu",)),
    (["bench", "--op", "permute", "--backward", "--device", "cpu"], ("--backward",)),
    (["bench", "--cuda-graph", "--device", "cpu"], ("--cuda-graph", "cpu")),
    (["bench", "--weights", "int3", "--device", "cpu"], ("--weights", "int4", "mxfp4")),
    (["bench", "--weights", "int4", "--op", "permute", "--device", "cpu"], ("--weights", "permute")),
    (["frobnicate"], ("info", "bench", "profile", "tune")),
])
def test_other_bad_arguments(capsys, argv, expected):
    one_line_error(capsys, argv, *expected)


# ---- bench ---------------------------------------------------------------------------------------


def test_bench_json_and_plot(tmp_path, capsys):
    out_json, out_png = tmp_path / "r.json", tmp_path / "r.png"
    assert main(["bench", *TINY, "--backend", "torch", "--json", str(out_json), "--plot", str(out_png)]) == 0
    text = capsys.readouterr().out
    for column in ("median ms", "tokens/s", "TFLOP/s", "GB/s", "roofline", "vs hf-eager", "vs dense", "vs bound"):
        assert column in text
    records = json.loads(out_json.read_text())
    assert [(r["backend"], r["tokens"]) for r in records] == [("torch", 1), ("torch", 4)]
    for r in records:
        assert RECORD_KEYS <= r.keys()
        assert (r["preset"], r["dtype"], r["routing"], r["malloc"]) == ("olmoe-1b-7b", "bfloat16", "uniform", "default")
        assert r["ms"] > 0 and r["tflops"] > 0 and r["gbps"] > 0 and r["roofline"] > 0
        assert set(r["peers"]) == {"hf-eager", "hf-grouped-mm", "torch-grouped-mm", "dense", "bound"}
        for name, ms in r["peers"].items():
            assert ms > 0 and r["speedup"][name] == pytest.approx(ms / r["ms"])
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_keeps_freed_memory_when_asked(tmp_path):
    """--keep-freed-memory sets glibc's malloc to keep freed memory (in a process of its own here:
    the setting outlives the call), and the header and every record say so."""
    out_json = tmp_path / "r.json"
    done = subprocess.run([sys.executable, "-m", "moe_dispatch.cli", "bench", *TINY, "--threads", "1", "--backend",
                           "torch", "--compare", "none", "--keep-freed-memory", "--json", str(out_json)],
                          capture_output=True, text=True, timeout=300)  # the cache fixture's roofline (one thread)
    assert done.returncode == 0, done.stderr
    malloc = "keeps freed memory" if platform.libc_ver()[0] == "glibc" else "default"
    assert f"malloc: {malloc}" in done.stdout
    assert {r["malloc"] for r in json.loads(out_json.read_text())} == {malloc}


def test_bench_quantized_weights_count_their_bytes(tmp_path, capsys):
    """--weights: our experts quantized, the peers on the same values dequantized, the bound on the format's bytes."""
    out_json = tmp_path / "r.json"
    for weights in (None, "int4"):
        argv = ["bench", *TINY, "--scale", "0.0625", "--backend", "torch", "--compare", "torch-grouped-mm,bound",
                "--json", str(out_json)]  # H=128, I=64: int4 groups of 128 and 64
        assert main(argv + (["--weights", weights] if weights else [])) == 0
        records = json.loads(out_json.read_text())
        assert all(r["weights"] == weights for r in records)
        if weights is None:
            float_bytes = [r["bytes"] for r in records]
    assert "int4 weights" in capsys.readouterr().out
    for r, float_record_bytes in zip(records, float_bytes):  # 4.25-4.5 bits a weight against bfloat16's 16
        assert 0.2 < r["bytes"] / float_record_bytes < 0.4 and r["peers"]["torch-grouped-mm"] > 0


# deepseek-v3 at H=128, I=32: its 256 experts, groups, correction bias and shared expert, tiny
TINY_V3 = ["--preset", "deepseek-v3", "--scale", str(1 / 56), "--tokens", "1,4", "--device", "cpu", "--budget", "0.005"]


def test_bench_times_the_whole_layer_beside_the_experts(tmp_path, capsys):
    out_json = tmp_path / "r.json"
    argv = ["bench", *TINY_V3, "--op", "moe_mlp,layer", "--weights", "fp8", "--backend", "torch", "--compare",
            "dense,bound", "--json", str(out_json)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "moe_mlp forward" in text and "layer forward" in text and "before the experts were made" in text
    records = json.loads(out_json.read_text())
    assert [(r["op"], r["tokens"]) for r in records] == [("moe_mlp", 1), ("moe_mlp", 4), ("layer", 1), ("layer", 4)]
    assert set(records[0]["peers"]) == {"dense", "bound"} and set(records[2]["peers"]) == {"bound"}
    # T=1 reaches 8 experts either way; the layer reads the router's and the shared expert's bfloat16
    # weights besides (E*H + 3*H*I elements)
    assert records[0]["experts_touched"] == records[2]["experts_touched"] == 8
    assert records[2]["bytes"] - records[0]["bytes"] == 2 * (256 * 128 + 3 * 128 * 32)
    assert records[0]["stored_bytes"] == 256 * 3 * 128 * 32 + 256 * 4 * (1 + 1)  # fp8 codes, a scale per block


def test_bench_layer_is_deepseek_v3s_around_the_same_experts():
    preset = get_preset("deepseek-v3", 1 / 56)
    experts = quantized_experts(preset, "int4", torch.bfloat16, CPU)
    layer = make_layer(experts)
    assert (layer.scoring, layer.n_groups, layer.topk_groups, layer.routed_scaling) == ("sigmoid", 8, 4, 2.5)
    assert layer.shared_experts is not None and bool(layer.expert_bias.abs().min() > 0)
    assert layer.w_gate_up.codes.data_ptr() == experts.weights.w_gate_up.codes.data_ptr()  # no copy
    spec = BenchSpec([preset], [5], torch.bfloat16, ["torch", "numba"], [], CPU, ops=("layer",), weights="int4")
    batch = prepare(spec, experts, 5, "layer", layer)
    torch.testing.assert_close(backend_call(spec, batch, "numba")(), backend_call(spec, batch, "torch")(),
                               rtol=4e-2, atol=4e-2)


def test_the_layer_bench_counts_its_experts_without_running_the_layer(monkeypatch):
    """The experts a layer's batch touches come from its router alone: running the whole layer
    on its own backend would run (and compile) a backend nobody asked to benchmark."""
    from moe_dispatch.layers import MoE

    preset = get_preset("deepseek-v3", 1 / 56)
    experts = make_experts(preset, torch.float32, CPU)
    layer = make_layer(experts)
    layer.backend = "numba"
    monkeypatch.setattr(MoE, "routed_experts", lambda *args: pytest.fail("the layer ran"))
    spec = BenchSpec([preset], [6], torch.float32, ["torch"], [], CPU, ops=("layer",))
    batch = prepare(spec, experts, 6, "layer", layer)
    _, _, ids = layer.routing(batch.inputs.x)
    assert batch.touched == len(ids.unique()) > 1 and layer.backend == "numba"


@pytest.mark.parametrize("fmt", ["int8", "int4", "fp8", "mxfp4"])
def test_quantized_bench_experts_are_made_in_their_format(fmt):
    """Directly in the format, with quantize's block, values spread over nn.Linear's U(-b, b)."""
    preset = get_preset("olmoe-1b-7b", 1 / 16)  # H=128, I=64: int4 groups of 128 and 64
    experts = quantized_experts(preset, fmt, torch.float32, CPU, seed=5)
    for w, fan_in in ((experts.weights.w_gate_up, 128), (experts.weights.w_down, 64)):
        assert w.format == fmt and w.shape[2] == fan_in
        assert w.block == quantize(torch.randn(1, 8, fan_in), fmt, group_size=fan_in if fmt == "int4" else None).block
        values = w.dequantize(torch.float32)
        bound = 1 / fan_in ** 0.5
        assert float(values.abs().max()) <= bound * 1.0001 and float(values.std()) > bound / 5
        assert not torch.equal(values[0], values[1])  # every expert its own codes


def test_bench_skips_the_peers_whose_float_copy_does_not_fit(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(memory_module, "available_memory", lambda device: 10**6)
    out_json = tmp_path / "r.json"
    argv = ["bench", *TINY_V3, "--weights", "int4", "--backend", "torch", "--json", str(out_json)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "skipped hf-eager, hf-grouped-mm, torch-grouped-mm: needs the experts dequantized to bfloat16" in out
    for r in json.loads(out_json.read_text()):
        assert set(r["skipped"]) == {"hf-eager", "hf-grouped-mm", "torch-grouped-mm"}
        assert r["peers"]["dense"] > 0 and r["peers"]["hf-eager"] is None
    # float experts that cannot fit: a one-line error pointing at the formats
    one_line_error(capsys, ["bench", *TINY_V3], "do not fit", "--weights fp8")


def test_bench_backward_ops_and_routings(tmp_path):
    out_json = tmp_path / "r.json"
    argv = ["bench", *TINY, "--backend", "torch", "--compare", "torch-grouped-mm,bound", "--backward",
            "--routing", "skewed", "--preset", "gpt-oss-20b", "--json", str(out_json)]
    assert main(argv) == 0
    records = json.loads(out_json.read_text())
    assert all(r["backward"] and r["routing"] == "skewed" and r["preset"] == "gpt-oss-20b" for r in records)
    for op in ("grouped_mm", "permute", "unpermute"):
        assert main(["bench", *TINY, "--backend", "torch", "--op", op, "--json", str(out_json)]) == 0
        records = json.loads(out_json.read_text())
        assert [r["op"] for r in records] == [op, op] and all(r["peers"] for r in records)


def test_ctrl_c_prints_the_results_so_far(tmp_path, capsys, monkeypatch):
    real_measure, batches = bench_module.measure_many, []

    def measure_then_interrupt(calls, device, **kwargs):
        batches.append(1)
        if len(batches) == 2:  # T=1 is done; Ctrl-C before T=4 has any sample
            raise KeyboardInterrupt
        return real_measure(calls, device, **kwargs)

    monkeypatch.setattr(bench_module, "measure_many", measure_then_interrupt)
    out_json = tmp_path / "r.json"
    argv = ["bench", *TINY, "--backend", "torch", "--compare", "dense", "--json", str(out_json)]
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    assert main(argv) == 130
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers  # restored
    captured = capsys.readouterr()
    assert "interrupted" in captured.err and "1 results so far" in captured.err
    assert "median ms" in captured.out
    assert [r["tokens"] for r in json.loads(out_json.read_text())] == [1]


def test_a_failing_implementation_is_left_out_with_the_reason():
    def broken():
        raise RuntimeError("CUDA out of memory\nmore detail")

    failed: dict = {}
    times = measure_many({"ok": lambda: None, "broken": broken}, CPU, failed=failed, budget_s=0.0)
    assert list(times) == ["ok"] and len(times["ok"]) == 3
    assert failed == {"broken": "RuntimeError: CUDA out of memory"}
    with pytest.raises(RuntimeError):
        measure_many({"broken": broken}, CPU)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_gpu_cuda_graph_replays_leave_out_what_syncs():
    x = torch.ones(1000, device="cuda")
    failed: dict = {}
    replays = capture_cuda_graphs({"graphable": lambda: x * 2, "syncs": lambda: x[x > 0].sum()}, "cuda",
                                  failed=failed)
    assert list(replays) == ["graphable"] and "syncs with the host" in failed["syncs"]
    x.fill_(3.0)  # a replay reads the captured input's memory and writes the captured output
    assert torch.equal(replays["graphable"](), torch.full_like(x, 6.0))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_gpu_bench_cuda_graph_times_triton_and_the_peers_that_can_be_captured(tmp_path, roofline_cache):
    cuda = Roofline(device_key(torch.device("cuda")), 4000.0, 3000.0, {"bfloat16": 700.0}, torch.__version__,
                    "test", roofline_module.METHOD)
    roofline_cache.write_text(json.dumps({**json.loads(roofline_cache.read_text()), cuda.device: cuda.__dict__}))
    out_json = tmp_path / "r.json"
    argv = ["bench", "--preset", "olmoe-1b-7b", "--scale", "0.05", "--tokens", "1,16", "--device", "cuda",
            "--budget", "0.01", "--backend", "triton", "--cuda-graph", "--compare", "torch-grouped-mm,dense,bound",
            "--json", str(out_json)]
    assert main(argv) == 0
    records = json.loads(out_json.read_text())
    assert [(r["backend"], r["tokens"], r["cuda_graph"]) for r in records] == [("triton", 1, True),
                                                                                ("triton", 16, True)]
    assert all(r["peers"]["dense"] is not None for r in records)


def test_bench_notes_only_the_columns_it_shows(capsys):
    assert main(["bench", *TINY, "--backend", "torch", "--compare", "none"]) == 0
    text = capsys.readouterr().out
    assert "roofline:" in text and "vs X" not in text and "vs bound" not in text


# ---- summary (gpu_check.sh's last table) ---------------------------------------------------------


def _record(op="moe_mlp", tokens=128, ms=1.0, roofline=0.5, **peers):
    """A bench record; peers: name -> ms (the bound among them)."""
    return {"op": op, "preset": "p", "scale": 1.0, "backend": "triton", "tokens": tokens, "ms": ms, "tflops": 1.0,
            "gbps": 1.0, "roofline": roofline, "peers": peers,
            "speedup": {name: t / ms for name, t in peers.items() if name != "bound"}}


@pytest.mark.parametrize("record, expected", [
    ({**_record(tokens=1, ms=1.4, bound=1.0), "cuda_graph": True}, [("<= 1.5x bound", True)]),
    ({**_record(tokens=16, ms=1.6, bound=1.0), "cuda_graph": True}, [("<= 1.5x bound", False)]),
    ({**_record(tokens=17, ms=9.0, bound=1.0), "cuda_graph": True}, []),  # not decode: no bound target
    (_record(tokens=1, ms=9.0, bound=1.0), []),  # eager: the bound is the graph replays'
    (_record(ms=1.0, **{"torch-grouped-mm": 1.31}), [(">= 1.3x t-gmm", True)]),
    (_record(ms=1.0, **{"torch-grouped-mm": 1.4, "hf-grouped-mm": 0.99}), [(">= 1.3x t-gmm", True),
                                                                            ("> hf-gmm", False)]),
    (_record(ms=1.0, **{"torch-grouped-mm": 1.2}), [(">= 1.3x t-gmm", False)]),
    # quantized experts: against the pipeline on their dequantized values
    ({**_record(ms=1.0, **{"torch-grouped-mm": 1.25}), "weights": "int4"}, [(">= 1.2x t-gmm", True)]),
    (_record("grouped_mm", 1024, 1.0, **{"torch-grouped-mm": 0.91}), [(">= 0.9x t-gmm", True)]),
    (_record("grouped_mm", 512, 1.0, **{"torch-grouped-mm": 0.5}), []),  # below 1024 tokens: none
    (_record("permute", roofline=0.71), [(">= 70% copy bw", True)]),
    (_record("unpermute", roofline=0.5), [(">= 70% copy bw", False)]),
    # on a CPU: against the fastest implementation, never the dense or bound yardsticks
    ({**_record(tokens=1, ms=1.0, bound=0.1, dense=0.1, **{"hf-eager": 3.0, "hf-grouped-mm": 1.12}),
      "device": "cpu: x"}, [(">= 1.1x best peer", True)]),
    ({**_record(ms=1.0, **{"hf-eager": 3.0, "torch-grouped-mm": 1.05}), "device": "cpu: x"},
     [(">= 1.1x best peer", False)]),
    ({**_record("permute", roofline=0.5), "device": "cpu: x"}, []),
])
def test_summary_checks_each_target_where_it_applies(record, expected):
    assert summary.targets(record) == expected


def test_summary_reads_bench_records_and_prints_markdown(tmp_path, capsys):
    path = tmp_path / "r.json"
    assert main(["bench", *TINY, "--backend", "torch", "--compare", "torch-grouped-mm,bound", "--json", str(path)]) == 0
    capsys.readouterr()
    assert summary.main([str(path), str(tmp_path / "missing.json"), "--markdown"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "no results in " + str(tmp_path / "missing.json") + ": that step wrote none"
    table = [line for line in lines if line.startswith("|")]
    assert table[0].startswith("| op | preset | dtype | backend | T |") and len(table) == 2 + 2  # header, rule, T=1 and 4
    assert all(">= 1.1x best peer" in row for row in table[2:])  # the CPU's target
    assert " of 2 targets met" in lines[-1]  # one per record; whether the torch backend meets it is its business


@pytest.mark.parametrize("content", ["{}", "3", "[1, 2]", '[{"op": "moe_mlp"}', "\udcff"],
                         ids=["an-object", "a-number", "not-records", "truncated", "not-utf8"])
def test_summary_skips_a_file_that_holds_no_records(tmp_path, capsys, content):
    path = tmp_path / "r.json"
    path.write_bytes(content.encode("utf-8", "surrogateescape"))
    assert summary.main([str(path)]) == 0
    assert capsys.readouterr().out.startswith(f"skipped {path}: ")


def test_sigterm_stops_a_run_like_ctrl_c(tmp_path):
    """A job's time limit (SIGTERM), even with SIGINT ignored as in a background job, keeps
    the results so far."""
    argv = [sys.executable, "-m", "moe_dispatch.cli", "bench", *TINY, "--tokens", ",".join(map(str, range(1, 400))),
            "--threads", "1",
            "--backend", "torch", "--compare", "none", "--budget", "0.05", "--json", str(tmp_path / "r.json")]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,  # the cache fixture's env
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    assert proc.stdout.readline().startswith("moe-dispatch bench:")  # the run has started
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "results so far" in err
    assert isinstance(json.loads((tmp_path / "r.json").read_text()), list)


def test_interrupted_timing_keeps_the_samples_so_far():
    calls = {"a": lambda: None, "b": lambda: None}
    rounds = []

    def b():
        rounds.append(1)
        if len(rounds) == 4:  # two warm-up calls, then the second timed round
            raise KeyboardInterrupt

    calls["b"] = b
    times: dict = {}
    with pytest.raises(KeyboardInterrupt):
        measure_many(calls, CPU, times=times, budget_s=1.0)
    assert len(times["a"]) == 2 and len(times["b"]) == 1


# ---- the peers compute what moe_mlp computes -------------------------------------------------------


@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("peer", ["hf-eager", "hf-grouped-mm", "torch-grouped-mm"])
def test_peers_match_moe_mlp(peer, routing):
    preset = get_preset("qwen3-30b-a3b", 1 / 32)
    experts = make_experts(preset, torch.float32, CPU, seed=3)
    batch = make_inputs(preset, 23, torch.float32, CPU, routing, seed=3)
    expected = moe_mlp(batch.x, batch.weights, batch.ids, experts.weights, backend="torch")
    torch.testing.assert_close(peer_call(moe_peer(peer, experts), batch, backward=False)(), expected,
                               rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("peer", ["hf-eager", "hf-grouped-mm", "torch-grouped-mm"])
def test_peers_with_biases_and_the_clamped_swiglu_match_moe_mlp(peer):
    # gpt-oss: biases, and transformers' own GptOssExperts with its interleaved gate and up columns
    preset = get_preset("gpt-oss-20b", 1 / 32)
    experts = make_experts(preset, torch.float32, CPU, seed=4)
    batch = make_inputs(preset, 9, torch.float32, CPU, "zipf", seed=4)
    expected = moe_mlp(batch.x, batch.weights, batch.ids, experts.weights, backend="torch")
    got = peer_call(moe_peer(peer, experts), batch, backward=False)()
    torch.testing.assert_close(got, expected, rtol=2e-4, atol=2e-4)


def test_routings():
    preset = get_preset("olmoe-1b-7b")
    for routing in ROUTINGS:
        ids = make_ids(1000, preset, routing, CPU)
        assert ids.shape == (1000, 8) and int(ids.sort(-1).values.diff(dim=-1).min()) > 0  # k distinct
    skewed = make_ids(1000, preset, "skewed", CPU)
    assert int((skewed == 0).any(-1).sum()) >= 500
    counts = torch.bincount(make_ids(1000, preset, "zipf", CPU).flatten(), minlength=64).sort(descending=True).values
    assert counts[0] > 4 * counts[32]  # a few experts take most of the load


def test_roofline_bound_is_the_slower_of_memory_and_compute():
    roofline = Roofline("x", read_gbps=10.0, copy_gbps=5.0, peak_tflops={"bfloat16": 1.0}, torch="", measured_at="")
    assert roofline.bound(Work(0.0, 1e7), torch.bfloat16) == (pytest.approx(1.0), "memory")
    assert roofline.bound(Work(1e10, 1e7), torch.bfloat16) == (pytest.approx(10.0), "compute")
    assert roofline.bound(Work(0.0, 1e7, "copy"), torch.bfloat16) == (pytest.approx(2.0), "memory")


# ---- info, profile, tune -------------------------------------------------------------------------


def test_info_measures_the_roofline_once_and_caches_it(capsys, roofline_cache, monkeypatch):
    roofline_cache.unlink()
    assert main(["info"]) == 0
    assert "roofline" in capsys.readouterr().out
    cached = json.loads(roofline_cache.read_text())[device_key(CPU)]
    assert cached["read_gbps"] > 0 and set(cached["peak_tflops"]) == {"bfloat16", "float16", "float32"}
    monkeypatch.setattr(roofline_module, "measure_roofline", lambda device: pytest.fail("measured twice"))
    assert main(["info"]) == 0


def test_bench_measures_the_bandwidth_again_and_keeps_the_cached_peaks(capsys, roofline_cache, monkeypatch):
    monkeypatch.setattr(roofline_module, "measure_bandwidth", lambda device: (33.0, 22.0))
    monkeypatch.setattr(roofline_module, "measure_roofline", lambda device: pytest.fail("peaks measured again"))
    assert main(["bench", *TINY, "--backend", "torch", "--compare", "bound"]) == 0
    assert "read 33 GB/s, copy 22 GB/s" in capsys.readouterr().out
    cached = json.loads(roofline_cache.read_text())[device_key(CPU)]
    assert (cached["read_gbps"], cached["copy_gbps"], cached["peak_tflops"]["bfloat16"]) == (33.0, 22.0, 0.5)


def test_peaks_measured_another_way_are_measured_again(roofline_cache, monkeypatch):
    stale = json.loads(roofline_cache.read_text())
    stale[device_key(CPU)]["method"] = roofline_module.METHOD - 1
    roofline_cache.write_text(json.dumps(stale))
    fresh = Roofline(device_key(CPU), 1.0, 1.0, {"float32": 1.0}, torch.__version__, "now", roofline_module.METHOD)
    monkeypatch.setattr(roofline_module, "measure_roofline", lambda device: fresh)
    assert roofline_module.get_roofline(CPU) == fresh
    assert json.loads(roofline_cache.read_text())[device_key(CPU)]["method"] == roofline_module.METHOD


def _roofline_damage(kind: str, valid: dict) -> bytes:
    """The cache file's bytes after kind of damage; valid: the good file."""
    key = device_key(CPU)
    entry = {"read-gbps-a-string": {**valid[key], "read_gbps": "20"},
             "peaks-a-list": {**valid[key], "peak_tflops": [0.5]},
             "method-a-string": {**valid[key], "method": str(roofline_module.METHOD)},
             "entry-a-list": [1, 2]}.get(kind)
    if entry is not None:
        return json.dumps({key: entry}).encode()
    return {"a-list": b"[]", "a-string": b'"x"', "a-number": b"3", "null": b"null", "truncated": b'{"cpu: ',
            "not-utf8": b"\xff\xfe{}"}[kind]


@pytest.mark.parametrize("kind", ["a-list", "a-string", "a-number", "null", "truncated", "not-utf8",
                                  "read-gbps-a-string", "peaks-a-list", "method-a-string", "entry-a-list"])
def test_a_damaged_roofline_cache_is_measured_again_with_one_warning(kind, roofline_cache, monkeypatch, capsys):
    """info and bench run on; the cache is rewritten whole; a file of the wrong type or with
    wrong-typed figures is not trusted."""
    valid = json.loads(roofline_cache.read_text())
    fresh = Roofline(**valid[device_key(CPU)])
    monkeypatch.setattr(roofline_module, "measure_roofline", lambda device: fresh)
    monkeypatch.setattr(cache_files, "_warned", set())
    for argv in (["info", "--device", "cpu"], ["bench", *TINY, "--backend", "torch", "--compare", "bound"]):
        roofline_cache.write_bytes(_roofline_damage(kind, valid))
        cache_files._warned.clear()
        with pytest.warns(RuntimeWarning) as caught:
            assert main(argv) == 0
        assert len([w for w in caught if str(roofline_cache) in str(w.message)]) == 1, [str(w.message) for w in caught]
        assert json.loads(roofline_cache.read_text())[device_key(CPU)] == fresh.__dict__
    assert not list(roofline_cache.parent.glob("*.tmp"))


def test_an_unwritable_roofline_cache_costs_a_warning_not_the_run(roofline_cache, monkeypatch):
    roofline_cache.unlink()
    roofline_cache.parent.rmdir()
    roofline_cache.parent.write_text("a file where the folder should be")
    monkeypatch.setattr(cache_files, "_warned", set())
    fresh = Roofline(device_key(CPU), 1.0, 1.0, {"float32": 1.0}, torch.__version__, "now", roofline_module.METHOD)
    monkeypatch.setattr(roofline_module, "measure_roofline", lambda device: fresh)
    with pytest.warns(RuntimeWarning) as caught:
        assert roofline_module.get_roofline(CPU) == fresh
    assert any("cannot be written" in str(w.message) for w in caught)


def test_profile_stages_backward_and_trace(tmp_path, capsys):
    trace, out_json = tmp_path / "trace.json", tmp_path / "p.json"
    argv = ["profile", "--preset", "deepseek-v3", "--scale", "0.01", "--tokens", "4", "--device", "cpu",
            "--backend", "torch", "--backward", "--budget", "0.005", "--trace", str(trace), "--json", str(out_json)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    for column in ("fwd ms", "share", "GB/s", "TFLOP/s", "bwd ms"):
        assert column in text
    (profile,) = json.loads(out_json.read_text())
    assert [s["stage"] for s in profile["stages"]] == STAGES + ["shared experts"]
    stages = {s["stage"]: s for s in profile["stages"]}
    assert all(s["forward_ms"] > 0 and s["bytes"] > 0 for s in stages.values())
    assert stages["gemm2"]["flops"] > 0 and stages["plan"]["backward_ms"] is None
    assert stages["gemm1+act"]["backward_ms"] > 0 and profile["fused_moe_mlp_ms"] > 0
    names = {event.get("name") for event in json.loads(trace.read_text())["traceEvents"]}
    assert {f"moe_dispatch.{s}" for s in STAGES} <= names


def test_tune_runs_every_op_of_the_backend():
    """The tuning pass (forward and backward) on the CPU: the triton kernels under the
    interpreter when they can run here."""
    backend = "triton" if backends.unavailable_reason("triton", CPU) is None else "torch"
    steps, results = [], []
    tune_preset(get_preset("gpt-oss-20b", 0.01), [1, 5], torch.float32, CPU, True, steps.append, results.append,
                backend=backend)
    assert len(steps) == 2 and [(r.tokens, r.status) for r in results] == [(1, "tuned"), (5, "tuned")]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU has something to tune")
def test_tune_without_a_gpu_says_there_is_nothing_to_tune(capsys):
    assert main(["tune"]) == 0
    assert "nothing to tune" in capsys.readouterr().out


def test_warm_up_runs_each_preset_and_says_where_the_kernels_went(capsys):
    assert main(["warm-up", "--preset", "olmoe-1b-7b,gpt-oss-20b", "--scale", "0.03", "--max-tokens", "8",
                 "--dtype", "float32", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "1 to 8 tokens" in out and "olmoe-1b-7b@0.03" in out and "gpt-oss-20b@0.03" in out
    assert ("the Numba kernels are cached in" in out) == HAS_NUMBA


@pytest.mark.parametrize("args, message", [
    (["--max-tokens", "0"], "--max-tokens must be positive"),
    (["--preset", "nope"], "unknown preset"),
])
def test_warm_up_refuses_bad_arguments(args, message, capsys):
    one_line_error(capsys, ["warm-up", "--device", "cpu", *args], message)
