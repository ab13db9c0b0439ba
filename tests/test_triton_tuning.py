"""The Triton backend's tile choice, which no op test can see: the autotuner and its cache, the
tile candidates and their shared-memory budgets, split-K, the float32 dot (TF32 or FMA)."""

import json
import logging
import os

import pytest
import torch

from conftest import HAS_TRITON, TRITON_UNAVAILABLE

if not HAS_TRITON:
    pytest.skip(f"the triton backend cannot run here: {TRITON_UNAVAILABLE}", allow_module_level=True)

from moe_dispatch.backends import triton_tuning as configs  # noqa: E402
from moe_dispatch.kernels.triton.tiles import TileConfig  # noqa: E402


def _fake_bench(times):
    """A bench that reports the given time per config (by block_n) and records the calls."""
    calls = []

    def bench(fn):
        config = fn()
        calls.append(config)
        return times[config.block_n]

    return bench, calls


def test_tuner_persists_the_fastest_config_and_reuses_it(tmp_path, monkeypatch):
    monkeypatch.setenv(configs.AUTOTUNE_ENV, "1")
    options = [TileConfig(16, 16, 16), TileConfig(16, 32, 16), TileConfig(16, 64, 16)]
    bench, calls = _fake_bench({16: 3.0, 32: 1.0, 64: 2.0})
    path = tmp_path / "cache.json"
    tuner = configs.Tuner(bench)
    assert tuner.select("k1", lambda: options, lambda c: c, path, may_tune=True) == options[1]
    assert calls == options
    assert json.loads(path.read_text()) == {"stamp": configs.cache_stamp(), "entries": {"k1": configs.asdict(options[1])}}
    # a new process (a new tuner) reads the file and times nothing
    fresh, fresh_calls = _fake_bench({16: 0.0, 32: 9.0, 64: 9.0})
    assert configs.Tuner(fresh).select("k1", lambda: options, lambda c: c, path, may_tune=True) == options[1]
    assert fresh_calls == []


def _damaged_tuning_cache(kind: str) -> bytes:
    """The cache file's bytes after kind of damage (every kind holds an entry for k1)."""
    good = configs.asdict(TileConfig(16, 16, 16))
    stamp = configs.cache_stamp()
    other = {"another-package": {**stamp, "moe_dispatch": "0.0.1"}, "another-triton": {**stamp, "triton": "2.0.0"},
             "another-gpu": {**stamp, "device": "NVIDIA GeForce RTX 3090"}}.get(kind)
    if other is not None:
        return json.dumps({"stamp": other, "entries": {"k1": good}}).encode()
    entry = {"fields-of-another-version": {"block_m": 16, "tile_shape": [1, 2]},
             "a-string-size": {**good, "block_m": "16"}, "a-negative-size": {**good, "block_n": -16},
             "not-a-power-of-two": {**good, "block_k": 24}, "a-float-count": {**good, "num_stages": 2.5},
             "tma-a-number": {**good, "tma": 1}, "entry-a-list": [16, 16, 16]}.get(kind)
    if entry is not None:
        return json.dumps({"stamp": stamp, "entries": {"k1": entry}}).encode()
    return {"a-list": b"[]", "a-string": b'"x"', "a-number": b"3", "truncated": b'{"stamp": {"moe_d',
            "not-utf8": b"\xff\xfe", "unstamped": json.dumps({"k1": good}).encode(),
            "entries-a-list": json.dumps({"stamp": stamp, "entries": [good]}).encode()}[kind]


@pytest.mark.parametrize("kind", [
    "a-list", "a-string", "a-number", "truncated", "not-utf8", "entries-a-list",
    "unstamped",  # the flat key -> config files of earlier versions
    "another-package", "another-triton", "another-gpu",
    "fields-of-another-version", "a-string-size", "a-negative-size", "not-a-power-of-two", "a-float-count",
    "tma-a-number", "entry-a-list"])
def test_a_damaged_or_foreign_tuning_cache_is_tuned_again_with_one_warning(kind, tmp_path, monkeypatch):
    """Never trusted, never a crash: k1 is timed again, once warned about, and the rewritten
    file holds the new winner under this package's stamp."""
    monkeypatch.setenv(configs.AUTOTUNE_ENV, "1")
    monkeypatch.setattr(configs.cache_files, "_warned", set())
    options = [TileConfig(16, 16, 16), TileConfig(16, 32, 16)]
    bench, calls = _fake_bench({16: 2.0, 32: 1.0})
    path = tmp_path / "cache.json"
    path.write_bytes(_damaged_tuning_cache(kind))
    with pytest.warns(RuntimeWarning) as caught:
        assert configs.Tuner(bench).select("k1", lambda: options, lambda c: c, path, may_tune=True) == options[1]
    assert len([w for w in caught if str(path) in str(w.message)]) == 1, [str(w.message) for w in caught]
    assert calls == options
    assert json.loads(path.read_text()) == {"stamp": configs.cache_stamp(), "entries": {"k1": configs.asdict(options[1])}}
    assert [p.name for p in tmp_path.iterdir()] == ["cache.json"]  # no temporary file left


def test_two_tuners_on_one_file_keep_each_other_s_results(tmp_path, monkeypatch):
    """Two processes tuning at once: each write keeps what the other wrote since it read."""
    monkeypatch.setenv(configs.AUTOTUNE_ENV, "1")
    options = [TileConfig(16, 16, 16), TileConfig(16, 32, 16)]
    path = tmp_path / "cache.json"
    first, second = configs.Tuner(_fake_bench({16: 2.0, 32: 1.0})[0]), configs.Tuner(_fake_bench({16: 1.0, 32: 2.0})[0])
    second.select("k0", lambda: options, lambda c: c, path, may_tune=True)  # reads the file now
    first.select("k1", lambda: options, lambda c: c, path, may_tune=True)
    second.select("k2", lambda: options, lambda c: c, path, may_tune=True)
    entries = json.loads(path.read_text())["entries"]
    assert entries == {"k0": configs.asdict(options[0]), "k1": configs.asdict(options[1]),
                       "k2": configs.asdict(options[0])}


def test_an_unwritable_tuning_cache_costs_a_warning_not_the_call(tmp_path, monkeypatch):
    monkeypatch.setenv(configs.AUTOTUNE_ENV, "1")
    monkeypatch.setattr(configs.cache_files, "_warned", set())
    (tmp_path / "dir").write_text("a file where the folder should be")
    options = [TileConfig(16, 16, 16), TileConfig(16, 32, 16)]
    with pytest.warns(RuntimeWarning) as caught:
        config = configs.Tuner(_fake_bench({16: 2.0, 32: 1.0})[0]).select(
            "k1", lambda: options, lambda c: c, tmp_path / "dir" / "cache.json", may_tune=True)
    assert config == options[1] and any("cannot be written" in str(w.message) for w in caught)


def test_tuner_says_once_why_a_first_call_pauses_and_logs_each_winner(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(configs.AUTOTUNE_ENV, "1")
    options = [TileConfig(16, 16, 16), TileConfig(16, 32, 16)]
    bench, _ = _fake_bench({16: 2.0, 32: 1.0})
    tuner, path = configs.Tuner(bench), tmp_path / "cache.json"
    with caplog.at_level(logging.INFO, logger="moe_dispatch"):
        for key in ("k1", "k2", "k1"):
            tuner.select(key, lambda: options, lambda c: c, path, may_tune=True)
    notices = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(notices) == 1 and str(path) in notices[0].getMessage() and "moe-dispatch tune" in notices[0].getMessage()
    tuned = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert len(tuned) == 2 and all(str(options[1]) in m for m in tuned), tuned


def test_tuning_asked_for_overrides_the_pin_and_the_notice_then_restores_both(monkeypatch):
    monkeypatch.setenv(configs.AUTOTUNE_ENV, "0")
    monkeypatch.setattr(configs.TUNER, "announced", False)
    with configs.tuning_asked_for():
        assert os.environ[configs.AUTOTUNE_ENV] == "1" and configs.TUNER.announced
    assert os.environ[configs.AUTOTUNE_ENV] == "0" and not configs.TUNER.announced
    monkeypatch.delenv(configs.AUTOTUNE_ENV)
    with configs.tuning_asked_for():
        pass
    assert configs.AUTOTUNE_ENV not in os.environ


def test_tuner_never_times_when_pinned_or_not_allowed(tmp_path, monkeypatch):
    options = [TileConfig(16, 16, 16), TileConfig(16, 32, 16)]
    bench, calls = _fake_bench({16: 5.0, 32: 1.0})
    tuner = configs.Tuner(bench)
    monkeypatch.setenv(configs.AUTOTUNE_ENV, "0")
    assert tuner.select("k", lambda: options, lambda c: c, tmp_path / "a.json", may_tune=True) == options[0]
    monkeypatch.setenv(configs.AUTOTUNE_ENV, "1")  # inside a graph capture or sync debug mode
    assert tuner.select("k", lambda: options, lambda c: c, tmp_path / "a.json", may_tune=False) == options[0]
    assert calls == [] and not (tmp_path / "a.json").exists()


def test_tuner_falls_back_to_the_safe_config_with_a_warning():
    launched = []

    def launch(config):
        launched.append(config)
        if config != configs.SAFE:
            raise RuntimeError("out of resources: shared memory")
        return "ran safe"

    tuner = configs.Tuner()
    big = TileConfig(128, 256, 64, num_warps=8, num_stages=4)
    with pytest.warns(UserWarning, match="safe config"):
        assert tuner.launch("k", big, launch) == "ran safe"
    launched.clear()
    assert tuner.launch("k", big, launch) == "ran safe"
    assert launched == [configs.SAFE]  # remembered: the failing config is not tried again


def test_tuner_skips_candidates_that_fail_to_compile(tmp_path, monkeypatch):
    monkeypatch.setenv(configs.AUTOTUNE_ENV, "1")
    options = [TileConfig(16, 16, 16), TileConfig(16, 32, 16)]

    def bench(fn):
        config = fn()
        if config.block_n == 16:
            raise RuntimeError("compile error")
        return 1.0

    with pytest.warns(UserWarning, match="failed"):
        assert configs.Tuner(bench).select("k", lambda: options, lambda c: c, tmp_path / "c.json", True) == options[1]


def test_run_remembers_a_settled_choice_and_only_that(tmp_path, monkeypatch):
    """A cached, tuned or pinned config is looked up once per key, device and settings; a
    default taken while tuning is not allowed (a CUDA graph capture) is asked for again."""
    asked = []
    monkeypatch.setattr(configs, "cache_path", lambda device: asked.append(device) or tmp_path / "c.json")
    monkeypatch.setattr(configs, "cache_stamp", lambda device=None: {"device": "test"})
    may_tune = [False]
    monkeypatch.setattr(configs, "_may_tune", lambda: may_tune[0])
    options = [TileConfig(16, 16, 16), TileConfig(16, 32, 16)]
    bench, timed = _fake_bench({16: 2.0, 32: 1.0})
    tuner, gpu = configs.Tuner(bench), torch.device("cuda", 0)

    def run(key="k"):
        return tuner.run(key, lambda: options, lambda config: config, gpu)

    monkeypatch.setenv(configs.AUTOTUNE_ENV, "1")
    assert run() == run() == options[0] and len(asked) == 2 and timed == []  # not settled: asked each time
    may_tune[0] = True
    assert run() == options[1] and len(timed) == 2  # tuned, then remembered
    assert run() == run() == options[1] and len(asked) == 3 and len(timed) == 2
    monkeypatch.setenv(configs.AUTOTUNE_ENV, "0")  # other settings: chosen again, then remembered
    assert run() == run() == options[0] and len(asked) == 4
    monkeypatch.setenv(configs.CACHE_DIR_ENV, str(tmp_path / "elsewhere"))
    assert run() == options[0] and len(asked) == 5


def test_an_error_left_on_the_device_is_raised_as_it_came(tmp_path, monkeypatch):
    """A device-side assert of an earlier kernel fails whatever launches next: no config is to
    blame, so none is set aside, no fallback runs and no winner is cached."""
    monkeypatch.setenv(configs.AUTOTUNE_ENV, "1")
    launched = []

    def launch(config):
        launched.append(config)
        raise RuntimeError("Triton Error [CUDA]: device-side assert triggered")

    tuner, big = configs.Tuner(lambda fn: fn()), TileConfig(128, 256, 64, num_warps=8, num_stages=4)
    for _ in range(2):
        with pytest.raises(RuntimeError, match="device-side assert"):
            tuner.launch("k", big, launch)
    assert launched == [big, big]
    with pytest.raises(RuntimeError, match="device-side assert"):
        tuner.select("k", lambda: [big, configs.SAFE], launch, tmp_path / "c.json", True)
    assert not (tmp_path / "c.json").exists()


def test_split_k_fills_the_gpu_within_its_limits():
    # 2 rows on 8 experts: 8 tiles of 16 x 64 want 33 splits on 132 SMs; each keeps 4 K-blocks
    assert configs._split_k(TileConfig(16, 64, 128), 2, 8, 1024, 256, 132) == 2
    assert configs._split_k(TileConfig(16, 64, 64), 2, 8, 4096, 256, 132) == 8  # at most 8
    assert configs._split_k(TileConfig(64, 128, 32), 4096, 8, 4096, 4096, 132) == 1  # tiles enough


def test_tile_candidates_fit_their_shared_memory_budget():
    for budget in (configs.SMALL_SMEM, configs.LARGE_SMEM):
        for elem, fma in ((2, False), (4, False), (4, True)):
            lists = [(configs.wgrad_tiles(elem, budget, fma), 1)]
            for rows_per_expert in (1, 32, 1024):
                lists += [(configs.gemm_tiles(rows_per_expert, True, elem, budget, fma), 2),
                          (configs.gemm_tiles(rows_per_expert, False, elem, budget, fma), 1),
                          (configs.act_backward_tiles(rows_per_expert, elem, budget, fma), 1)]
            for tiles, operands in lists:
                assert tiles
                for c in tiles:
                    per_stage = (c.block_m * c.block_k + operands * c.block_k * c.block_n) * elem
                    assert 2 <= c.num_stages <= 4 and c.num_stages * per_stage <= budget, (c, budget)


def test_float32_uses_tf32_only_when_torch_allows_it():
    cuda, matmul = torch.device("cuda"), torch.backends.cuda.matmul
    before = matmul.fp32_precision
    try:
        assert configs.dot_precision(torch.float32, cuda) == ("tf32" if before == "tf32" else "ieee")
        matmul.fp32_precision = "tf32"
        assert configs.dot_precision(torch.float32, cuda) == "tf32"
        assert configs.dot_precision(torch.float32, torch.device("cpu")) == "ieee"
        assert not configs.uses_fma(torch.float32, cuda)
        assert configs.dtype_tag(torch.float32, cuda) == "float32-tf32"
        matmul.fp32_precision = "ieee"
        assert configs.dot_precision(torch.float32, cuda) == "ieee"
        # the FMA dot: its own candidates, and its own autotune keys
        assert configs.uses_fma(torch.float32, cuda) and not configs.uses_fma(torch.bfloat16, cuda)
        assert configs.dtype_tag(torch.float32, cuda) == "float32-ieee"
        assert configs.dtype_tag(torch.bfloat16, cuda) == "bfloat16"
    finally:
        matmul.fp32_precision = before


def test_fma_candidates_are_the_small_ones():
    # float32 without TF32: short K-steps, 8 warps or more, at most 8192 outputs, no TMA
    for budget in (configs.SMALL_SMEM, configs.LARGE_SMEM):
        lists = [(configs.wgrad_tiles(4, budget, fma=True), 32)]
        for rows_per_expert in (1, 32, 1024):
            lists += [(configs.gemm_tiles(rows_per_expert, True, 4, budget, fma=True), 16),
                      (configs.gemm_tiles(rows_per_expert, False, 4, budget, fma=True), 16),
                      (configs.act_backward_tiles(rows_per_expert, 4, budget, fma=True), 32)]
        for tiles, block_k in lists:
            assert tiles and len(set(tiles)) == len(tiles)
            for c in tiles:
                assert c.block_k <= block_k and c.num_warps >= 8 and c.block_m * c.block_n <= 8192, c
                assert not c.tma, c
        for two in (True, False):
            tiles = configs.decode_tiles(2048, 8, two, 4, budget, 132, fma=True)
            assert tiles and all(c.block_n * c.block_k <= 4096 and c.num_warps == 8 for c in tiles)
    # the tensor-core candidates keep their large tiles
    tf32 = configs.gemm_tiles(1024, True, 4, configs.LARGE_SMEM)
    assert tf32[0].block_m * tf32[0].block_n == 128 * 128 and any(c.tma for c in tf32)
