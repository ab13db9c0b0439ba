"""Triton-specific tests: what the backend-generic suite cannot see.

On CPU these run the kernels under TRITON_INTERPRET=1 (conftest sets it): the plan kernels
at sizes that need several chunks and steps, the split-K decode variant, every fused
epilogue against its unfused definition, memory safety around out-of-range indices, bf16
through the interpreter's float32 path, and the autotune cache. Tests marked gpu repeat the
cases on CUDA with bf16 and check what only a GPU shows: no host sync, CUDA graph capture,
the device-side report of bad expert ids, bitwise determinism, persisted autotuning.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from dataclasses import replace

import pytest
import torch
import triton
import triton.language as tl

import moe_dispatch as md
from cases import CASES
from conftest import HAS_CUDA, assert_close, random_ids, random_weights
from moe_dispatch.backends import unavailable_reason
from reference import naive_grouped_mm, naive_moe_mlp, naive_plan

_UNAVAILABLE = unavailable_reason("triton", torch.device("cuda" if HAS_CUDA else "cpu"))
if _UNAVAILABLE is not None:
    pytest.skip(f"the triton backend cannot run here: {_UNAVAILABLE}", allow_module_level=True)

from moe_dispatch.backends.torch_backend import TorchBackend  # noqa: E402
from moe_dispatch.kernels.triton import configs  # noqa: E402
from moe_dispatch.kernels.triton import decode as kdecode  # noqa: E402
from moe_dispatch.kernels.triton import grouped_gemm as kgemm  # noqa: E402
from moe_dispatch.kernels.triton import permute as kmove  # noqa: E402
from moe_dispatch.kernels.triton import plan as kplan  # noqa: E402
from moe_dispatch.kernels.triton.configs import TileConfig  # noqa: E402

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
FLOAT_DTYPES = [pytest.param(d, id=str(d).split(".")[1]) for d in (torch.float32, torch.float16, torch.bfloat16)]


def _randn(*shape, gen, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(DEVICE)


def _expert_weights(experts, hidden, inter, gen, dtype, activation="swiglu"):
    width = (2 if activation in ("swiglu", "geglu") else 1) * inter
    return (_randn(experts, width, hidden, gen=gen, dtype=dtype, scale=hidden**-0.5),
            _randn(experts, hidden, inter, gen=gen, dtype=dtype, scale=inter**-0.5))


def _bias(*shape, gen, dtype):
    return _randn(*shape, gen=gen, dtype=dtype, scale=0.5)


def _subprocess_env(drop: str) -> dict:
    """This process's environment without `drop`, with the repository importable."""
    env = {k: v for k, v in os.environ.items() if k != drop}
    repository = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([repository, env.get("PYTHONPATH", "")])
    return env


# ---- the plan kernels ------------------------------------------------------------------------

PLAN_SHAPES = [
    # several chunks of one step each (E small: 128 slots a step)
    pytest.param(150, 3, 7, 512, 0, id="chunks"),
    # E wider than a step's one-hot (16 slots a step) and more steps than chunks: 8 steps a chunk
    pytest.param(150, 3, 300, 4, 0, id="wide-E-multistep"),
    # one launch (decode): 4 steps of 128 slots, the last one partial
    pytest.param(150, 3, 7, 512, 4, id="one-launch"),
    # one launch with E wider than a step's one-hot: 4 steps of 16 slots
    pytest.param(20, 3, 300, 512, 4, id="one-launch-wide-E"),
    # one expert, every slot on it
    pytest.param(33, 1, 1, 512, 4, id="E=1"),
    # 29 chunks, more than the scan reads in one pass (16 with E_PAD = 512): a running total across passes
    pytest.param(150, 3, 300, 512, 0, id="two-scan-passes"),
]


@pytest.fixture
def garbage_memory(monkeypatch):
    """torch.empty returns 77s: a kernel that leaves an output element unwritten shows."""
    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *args, **kwargs: empty(*args, **kwargs).fill_(77))


@pytest.mark.usefixtures("garbage_memory")
@pytest.mark.parametrize("tokens,top_k,experts,max_chunks,one_launch_steps", PLAN_SHAPES)
def test_plan_kernels_match_the_naive_plan(tokens, top_k, experts, max_chunks, one_launch_steps, gen, monkeypatch):
    monkeypatch.setattr(kplan, "MAX_CHUNKS", max_chunks)
    monkeypatch.setattr(kplan, "ONE_LAUNCH_STEPS", one_launch_steps)
    ids = random_ids(tokens, top_k, experts, gen).to(DEVICE)
    counts, offsets, token_of_row, row_of_slot, all_placed = kplan.make_plan(ids, experts)
    ref = naive_plan(ids.cpu(), experts)
    assert all_placed.tolist() == [True]
    assert counts.tolist() == ref[0] and offsets.tolist() == ref[1]
    assert token_of_row.tolist() == ref[2] and row_of_slot.tolist() == ref[3]
    assert {t.dtype for t in (counts, offsets, token_of_row, row_of_slot)} == {torch.int32}


def test_plan_accepts_int32_ids(gen):
    ids = random_ids(25, 3, 6, gen)
    got = kplan.make_plan(ids.to(torch.int32).to(DEVICE), 6)[:4]
    assert all(torch.equal(a.cpu(), b) for a, b in zip(got, TorchBackend().make_plan(ids, 6)))


@pytest.mark.usefixtures("garbage_memory")
@pytest.mark.parametrize("one_launch_steps", [0, 4], ids=["three-launches", "one-launch"])
def test_plan_kernels_skip_out_of_range_ids(one_launch_steps, monkeypatch):
    # What CUDA relies on (CPU callers get a ValueError before any kernel): bad slots are
    # placed nowhere, get row -1, and offsets[E] counts only the good ones.
    monkeypatch.setattr(kplan, "ONE_LAUNCH_STEPS", one_launch_steps)
    ids = torch.tensor([[0, 5], [2, -1], [1, 2], [7, 0]], device=DEVICE)
    counts, offsets, token_of_row, row_of_slot, all_placed = kplan.make_plan(ids, 3)
    assert all_placed.tolist() == [False]
    assert counts.tolist() == [2, 1, 2]
    assert offsets.tolist() == [0, 2, 3, 5]
    assert row_of_slot.tolist() == [[0, -1], [3, -1], [2, 4], [-1, 1]]
    assert token_of_row.tolist() == [0, 3, 2, 1, 2, 0, 0, 0]  # unplaced rows still name a real token


def test_bad_ids_raise_before_any_kernel_on_cpu():
    if HAS_CUDA:
        pytest.skip("CPU tensors only")
    with pytest.raises(ValueError, match="expert id 4"):
        md.make_plan(torch.tensor([[0, 4]]), 4, backend="triton")


# ---- the grouped GEMM's fusions and its decode (split-K) variant -----------------------------

GEMM_CONFIGS = [
    pytest.param(TileConfig(16, 16, 16), id="16x16x16"),
    # the decode variant: K split over 3 programs, partials summed by a second kernel
    pytest.param(TileConfig(16, 16, 16, split_k=3), id="split-k=3"),
    # taller tiles than any expert's rows, wider than N
    pytest.param(TileConfig(32, 32, 32, split_k=2), id="32x32x32-split-k=2"),
]


def _fused_reference(x, weights, plan, w_gate_up, w_down, b_gate_up, b_down, activation):
    """The unfused composition on the torch backend: (h, act, per-slot outputs)."""
    ref = TorchBackend()
    xs = ref.permute(x.cpu(), plan.token_of_row.cpu())
    h = ref.grouped_mm(xs, w_gate_up.cpu().transpose(1, 2), plan.offsets.cpu(), b_gate_up.cpu())
    act = md.activations.activate(h, activation).to(x.dtype)
    o = ref.grouped_mm(act, w_down.cpu().transpose(1, 2), plan.offsets.cpu(), b_down.cpu())
    slots = o.float()[plan.row_of_slot.cpu().reshape(-1).long()] * weights.cpu().reshape(-1, 1)
    return h, act, slots


def _check_epilogues(config, activation, dtype, gen, sizes=(13, 3, 5, 37, 19)):
    # GEMM1: gathered rows, bias, activation, h stored; GEMM2: bias, routing weight, scatter to slots
    tokens, top_k, experts, hidden, inter = sizes
    gated = activation == "swiglu"
    ids = random_ids(tokens, top_k, experts, gen).to(DEVICE)
    plan = md.make_plan(ids, experts, backend="triton")
    x = _randn(tokens, hidden, gen=gen, dtype=dtype)
    weights = random_weights(tokens, top_k, gen).to(DEVICE)
    w_gate_up, w_down = _expert_weights(experts, hidden, inter, gen, dtype, activation)
    b_gate_up = _bias(experts, w_gate_up.shape[1], gen=gen, dtype=dtype)
    b_down = _bias(experts, hidden, gen=gen, dtype=dtype)
    slot_of_row, weight_of_row = kmove.invert_rows(plan.row_of_slot, weights)

    act, h = kgemm.grouped_gemm(x, w_gate_up.transpose(1, 2), plan.offsets, config, bias=b_gate_up,
                                a_rows=plan.token_of_row, activation="silu" if gated else "relu", gated=gated,
                                store_h=True)
    slots, _ = kgemm.grouped_gemm(act, w_down.transpose(1, 2), plan.offsets, config, bias=b_down,
                                  slot_of_row=slot_of_row, weight_of_row=weight_of_row)
    ref_h, ref_act, ref_slots = _fused_reference(x, weights, plan, w_gate_up, w_down, b_gate_up, b_down, activation)
    assert_close(h, ref_h)
    assert_close(act, ref_act)
    assert_close(slots, ref_slots, dtype=dtype)


@pytest.mark.parametrize("activation", ["swiglu", "relu"])
@pytest.mark.parametrize("config", GEMM_CONFIGS)
def test_gemm_epilogues_match_the_unfused_composition(config, activation, gen):
    _check_epilogues(config, activation, torch.float32, gen)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)  # bf16 through the interpreter's float32 path
@pytest.mark.parametrize("config", [TileConfig(16, 16, 16, tma=True), TileConfig(16, 16, 16, split_k=3, tma=True)],
                         ids=["tma", "tma-split-k=3"])
def test_tma_weight_tiles_match_the_unfused_composition(config, dtype, gen):
    # H = 40 and I = 24 make 16-byte weight rows, so both GEMMs load W through a TMA descriptor;
    # N = 24 leaves a partial last N-tile whose rows run into the next expert's (gated: the up half)
    for shape in ((5, 48, 40), (5, 40, 24)):  # w_gate_up and w_down as the GEMMs see them
        assert kgemm.weight_descriptor(torch.empty(shape, dtype=dtype).transpose(1, 2), config) is not None
    _check_epilogues(config, "swiglu", dtype, gen, sizes=(13, 3, 5, 40, 24))


def test_weights_tma_cannot_read_go_through_pointers():
    config = TileConfig(16, 16, 16, tma=True)
    assert kgemm.weight_descriptor(torch.empty(5, 48, 37).transpose(1, 2), config) is None  # rows of 148 bytes
    assert kgemm.weight_descriptor(torch.empty(5, 40, 48), config) is None  # N contiguous, not K
    assert kgemm.weight_descriptor(torch.empty(5, 48, 40).transpose(1, 2), TileConfig(16, 16, 16)) is None


# K = 45 masks the last K-block; K = 48 is whole blocks, loaded without a K mask; K = 64 is four
# whole blocks of 16, which three K-splits share unevenly
@pytest.mark.parametrize("k_dim", [45, 48, 64])
@pytest.mark.parametrize("config", GEMM_CONFIGS)
def test_split_k_grouped_mm_with_empty_experts(config, k_dim, gen):
    # strided (transposed) weights, experts 0, 2 and 4 without rows, int64 offsets
    offsets = torch.tensor([0, 0, 7, 7, 18, 18], dtype=torch.int64, device=DEVICE)
    a = _randn(18, k_dim, gen=gen)
    w = _randn(5, 21, k_dim, gen=gen, scale=0.2).transpose(1, 2)
    out, _ = kgemm.grouped_gemm(a, w, offsets, config)
    assert_close(out, naive_grouped_mm(a.cpu(), w.cpu(), offsets.tolist()))


@triton.jit
def _tile_coords_kernel(out_ptr, num_m_tiles, num_n_tiles, GROUP_M: tl.constexpr):
    pid_m, pid_n = kgemm.tile_coords(tl.program_id(0), num_m_tiles, num_n_tiles, GROUP_M)
    tl.store(out_ptr + 2 * tl.program_id(0), pid_m)
    tl.store(out_ptr + 2 * tl.program_id(0) + 1, pid_n)


# a last group shorter than GROUP_M, fewer M-tiles than one group, one N-tile
@pytest.mark.parametrize("m_tiles,n_tiles,group_m", [(19, 5, 8), (3, 7, 8), (16, 1, 8), (5, 4, 1)])
def test_tile_order_takes_every_tile_once_a_group_of_m_tiles_at_a_time(m_tiles, n_tiles, group_m):
    coords = torch.full((m_tiles * n_tiles, 2), -1, dtype=torch.int32, device=DEVICE)
    _tile_coords_kernel[(m_tiles * n_tiles,)](coords, m_tiles, n_tiles, GROUP_M=group_m)
    coords = [tuple(c) for c in coords.tolist()]
    assert sorted(coords) == [(m, n) for m in range(m_tiles) for n in range(n_tiles)]
    # program order: the M-tiles of a group sweep every N-tile before the next group starts
    groups = [m // group_m for m, _ in coords]
    assert groups == sorted(groups)
    first_group = [c for c in coords if c[0] < group_m]
    assert [n for _, n in first_group] == sorted(n for _, n in first_group)


@pytest.mark.parametrize("config", GEMM_CONFIGS[:2])
def test_gemm_writes_into_an_output_whose_rows_are_strided(config, gen):
    offsets = torch.tensor([0, 5, 5, 12], dtype=torch.int32, device=DEVICE)
    a = _randn(12, 20, gen=gen)
    w = _randn(3, 20, 24, gen=gen, scale=0.2)
    guard = torch.full((12, 31), 7.0, device=DEVICE)
    kgemm.grouped_gemm(a, w, offsets, config, out=guard[:, 3:27])
    assert_close(guard[:, 3:27], naive_grouped_mm(a.cpu(), w.cpu(), offsets.tolist()))
    assert (guard[:, :3] == 7).all() and (guard[:, 27:] == 7).all()


def test_gemm_never_writes_outside_its_output_even_with_inconsistent_offsets(gen):
    # Offsets are not checked on CUDA (it would sync): decreasing ones, and ones past the
    # rows, must still keep every store inside the output, here a slice of a guarded buffer.
    a = _randn(10, 20, gen=gen)
    w = _randn(3, 20, 24, gen=gen)
    for offsets in ([0, 50, 3, 1000], [7, 2, 2, 10], [-5, 4, 4, 9]):
        for config in (TileConfig(16, 16, 16), TileConfig(16, 16, 16, split_k=2)):
            guard = torch.full((30, 24), 7.0, device=DEVICE)
            kgemm.grouped_gemm(a, w, torch.tensor(offsets, device=DEVICE), config, out=guard[10:20])
            assert (guard[:10] == 7).all() and (guard[20:] == 7).all(), (offsets, config)


# ---- data movement around out-of-range rows ---------------------------------------------------


def test_gather_rows_gives_zeros_for_an_index_out_of_range(gen):
    src = torch.full((8, 5), float("nan"), device=DEVICE)[1:7]  # a read past src would show as NaN
    src.copy_(_randn(6, 5, gen=gen))
    out = kmove.gather_rows(src, torch.tensor([0, -1, 6, 5, 7, 2], dtype=torch.int32, device=DEVICE))
    zero = torch.zeros(5, device=DEVICE)
    assert torch.equal(out, torch.stack([src[0], zero, zero, src[5], zero, src[2]]))


def test_slot_major_combine_skips_unplaced_slots(gen):
    # moe_mlp's combine of the down GEMM's slot-order output: a slot whose id was bad was never
    # written (NaN here) and must not be read
    row_of_slot = torch.tensor([[0, -1], [2, 1], [-1, 3]], dtype=torch.int32, device=DEVICE)
    slots = _randn(6, 5, gen=gen)
    slots[1] = slots[4] = float("nan")
    y = kmove.combine(slots, row_of_slot, None, slot_major=True)
    assert_close(y, torch.stack([slots[0], slots[2] + slots[3], slots[5]]).double())


def test_combine_and_its_backward_skip_unplaced_slots(gen):
    # row -1 (a bad id on CUDA) contributes nothing and is written nowhere
    row_of_slot = torch.tensor([[0, -1], [2, 1], [-1, 3]], dtype=torch.int32, device=DEVICE)
    ys = _randn(4, 5, gen=gen)
    weights = random_weights(3, 2, gen).to(DEVICE)
    y = kmove.combine(ys, row_of_slot, weights)
    expected = torch.stack([weights[0, 0] * ys[0], weights[1, 0] * ys[2] + weights[1, 1] * ys[1],
                            weights[2, 1] * ys[3]])
    assert_close(y, expected.double())
    dy = _randn(3, 5, gen=gen)
    dys, dweights = kmove.combine_backward(dy, ys, row_of_slot, weights)
    assert dweights[0, 1] == 0 and dweights[2, 0] == 0
    assert_close(dweights[1, 1], (dy[1] * ys[1]).sum().double())
    assert_close(dys[3], (weights[2, 1] * dy[2]).double())


# ---- the decode forward: two kernels, no plan -------------------------------------------------

DECODE_CASES = [
    # one token, one choice
    pytest.param(1, 1, 3, "swiglu", False, id="T=1-k=1"),
    # a full tile of tokens, sizes that are multiples of nothing, more experts than slots
    pytest.param(16, 3, 61, "swiglu", True, id="T=16-odd"),
    # every expert chosen by many tokens
    pytest.param(11, 4, 4, "gelu", True, id="k=E"),
    pytest.param(5, 2, 7, "relu", False, id="relu"),
]


@pytest.fixture
def only_decode_kernels(monkeypatch):
    """The plan, grouped GEMM and combine launchers raise: what runs is the decode path."""
    def refuse(*args, **kwargs):
        raise AssertionError("the decode forward took the planned path")

    for module, name in ((kplan, "make_plan"), (kgemm, "grouped_gemm"), (kmove, "combine")):
        monkeypatch.setattr(module, name, refuse)


def _decode_inputs(tokens, top_k, experts, activation, bias, dtype, gen, hidden=37, inter=21):
    ids = random_ids(tokens, top_k, experts, gen)
    if tokens > 2:
        ids[2, -1] = ids[2, 0]  # a token that chose one expert twice: both weights count
    w_gate_up, w_down = _expert_weights(experts, hidden, inter, gen, dtype, activation)
    # strided weights: every other expert of a twice-as-long stack, rows padded
    w_gate_up = torch.cat([w_gate_up, w_gate_up], 2).repeat_interleave(2, 0)[::2, :, :hidden]
    assert not w_gate_up.is_contiguous()
    b = [_bias(experts, w_gate_up.shape[1], gen=gen, dtype=dtype), _bias(experts, hidden, gen=gen, dtype=dtype)]
    return (_randn(tokens, hidden, gen=gen, dtype=dtype), random_weights(tokens, top_k, gen).to(DEVICE),
            ids.to(torch.int32).to(DEVICE), w_gate_up, w_down, *(b if bias else [None, None]))


@pytest.mark.usefixtures("garbage_memory", "only_decode_kernels")
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)  # bf16 through the interpreter's float32 path
@pytest.mark.parametrize("tokens,top_k,experts,activation,bias", DECODE_CASES)
def test_decode_forward_matches_the_reference(tokens, top_k, experts, activation, bias, dtype, gen):
    x, weights, ids, w_gate_up, w_down, b_gate_up, b_down = inputs = _decode_inputs(
        tokens, top_k, experts, activation, bias, dtype, gen)
    copies = [t.clone() for t in inputs if t is not None]
    out = md.moe_mlp(x, weights, ids, w_gate_up, w_down, activation=activation, b_gate_up=b_gate_up,
                     b_down=b_down, backend="triton")
    assert out.dtype == dtype and out.shape == x.shape
    assert_close(out, naive_moe_mlp(*(t.cpu() if t is not None else None for t in inputs), activation))
    assert all(torch.equal(a, b) for a, b in zip(copies, (t for t in inputs if t is not None)))


# H and I of odd sizes; and multiples of 16 and 32, which some K-steps divide (no K mask, the
# down kernel's last K-block ending at K)
@pytest.mark.parametrize("hidden,inter", [(37, 21), (32, 48)])
@pytest.mark.parametrize("config", [TileConfig(16, 16, 16), TileConfig(16, 32, 32), TileConfig(16, 16, 64)])
def test_decode_kernels_with_every_tile_shape(config, hidden, inter, gen):
    # K-steps longer than K, partial column tiles, tiles wider than N
    x, weights, ids, w_gate_up, w_down, b_gate_up, b_down = inputs = _decode_inputs(
        9, 2, 5, "swiglu", True, torch.float32, gen, hidden, inter)
    act, routes, ok = kdecode.decode_up(x, ids, weights, w_gate_up.transpose(1, 2), b_gate_up, "silu", True, config)
    out = kdecode.decode_down(act, ids, routes, w_down.transpose(1, 2), b_down, config)
    assert ok.tolist() == [True]
    assert_close(out, naive_moe_mlp(*(t.cpu() for t in inputs)))


def test_decode_kernels_skip_and_report_bad_ids(gen):
    # the kernels' own guard (the ops raise before them on CPU): a bad id's slot adds nothing
    x, weights, ids, w_gate_up, w_down, _, _ = _decode_inputs(4, 2, 5, "swiglu", False, torch.float32, gen)
    bad = ids.clone()
    bad[1, 0], bad[3, 1] = 5, -1
    config = TileConfig(16, 16, 16)
    act, routes, ok = kdecode.decode_up(x, bad, weights, w_gate_up.transpose(1, 2), None, "silu", True, config)
    out = kdecode.decode_down(act, bad, routes, w_down.transpose(1, 2), None, config)
    kept = weights.clone()
    kept[1, 0] = kept[3, 1] = 0
    assert ok.tolist() == [False]
    assert_close(out, naive_moe_mlp(*(t.cpu() for t in (x, kept, ids, w_gate_up, w_down))))


def test_decode_up_writes_each_experts_tile_once(gen):
    # the owners (first slots of valid ids) flagged; each owner's tile of act holds its expert's
    # activations for the tokens that chose it; the routing weights of a token on the expert
    # summed, 0 for the tokens that did not choose it
    x, weights, ids, w_gate_up, _, _, _ = _decode_inputs(7, 3, 5, "swiglu", False, torch.float32, gen)
    ids[4, 1] = 9  # a bad id owns nothing
    x = torch.cat([x, torch.full_like(x, float("nan"))])[:7]  # NaNs past x: a read of them shows
    act, routes, ok = kdecode.decode_up(x, ids, weights, w_gate_up.transpose(1, 2), None, "silu", True,
                                        TileConfig(16, 16, 16))
    flat = ids.reshape(-1).tolist()
    owners = [s for s, e in enumerate(flat) if 0 <= e < 5 and e not in flat[:s]]
    assert ok.tolist() == [False]
    assert routes.owner.tolist() == [int(s in owners) for s in range(len(flat))]
    tile = act.view(len(flat), kdecode.MAX_TOKENS, -1)
    for slot in owners:
        gate, up = (x.double() @ w_gate_up[flat[slot]].double().T).chunk(2, dim=-1)
        chose = (ids == flat[slot]).to(torch.float64)  # [T, k]
        tokens = chose.sum(1).nonzero().squeeze(1)
        assert_close(tile[slot, tokens], (torch.nn.functional.silu(gate) * up)[tokens])
        assert tile[slot].isfinite().all()
        expected_weights = torch.zeros(kdecode.MAX_TOKENS, dtype=torch.float64)
        expected_weights[:7] = (weights.double() * chose).sum(1)
        assert_close(routes.weights[slot], expected_weights)


def test_decode_down_stays_inside_its_inputs_whatever_the_routes_say(gen):
    # routes that are not the up kernel's: any nonzero flag an owner, bad experts. act and
    # w_down are views into NaN-filled memory, and the flags sit before entries that would
    # count: any read outside them shows.
    slots, tokens, experts, inter, hidden = 6, 3, 4, 20, 24
    rows = slots * kdecode.MAX_TOKENS
    act = torch.full((rows + 32, inter), float("nan"), device=DEVICE)[16:16 + rows]
    act.copy_(_randn(rows, inter, gen=gen))
    w_down = torch.full((experts + 3, hidden, inter), float("nan"), device=DEVICE)[1:1 + experts]
    w_down.copy_(_randn(experts, hidden, inter, gen=gen))
    ids = torch.tensor([[0, 3], [5, 1], [2, -1]], device=DEVICE)
    owner = torch.tensor([1, 7, 1, 0, -3, 1] + [1] * 10, dtype=torch.int32, device=DEVICE)[:slots]
    weights = torch.rand(slots, kdecode.MAX_TOKENS, generator=gen).to(DEVICE)
    out = kdecode.decode_down(act, ids, kdecode.Routes(owner, weights), w_down.transpose(1, 2), None,
                              TileConfig(16, 16, 16))
    expected = torch.zeros(tokens, hidden, dtype=torch.float64)
    for slot, expert in enumerate(ids.reshape(-1).tolist()):
        if owner[slot] != 0 and 0 <= expert < experts:
            for token in range(tokens):
                row = act[slot * kdecode.MAX_TOKENS + token].double()
                expected[token] += weights[slot, token].double() * (row @ w_down[expert].double().T)
    assert_close(out, expected)


@pytest.mark.usefixtures("only_decode_kernels")
def test_decode_forward_raises_on_bad_ids_before_any_kernel_on_cpu():
    if HAS_CUDA:
        pytest.skip("CPU tensors only")
    x, w_gate_up, w_down = torch.randn(2, 8), torch.randn(4, 16, 8), torch.randn(4, 8, 8)
    with pytest.raises(ValueError, match="expert id 4"):
        md.moe_mlp(x, torch.ones(2, 2), torch.tensor([[0, 4], [1, 2]]), w_gate_up, w_down, backend="triton")


def test_more_tokens_than_a_tile_take_the_planned_path(gen):
    tokens = kdecode.MAX_TOKENS + 1
    x, weights, ids, w_gate_up, w_down, _, _ = inputs = _decode_inputs(tokens, 2, 5, "swiglu", False,
                                                                       torch.float32, gen)
    backend = md.backends.get_backend("triton")
    assert backend.moe_mlp_from_ids(x, weights, ids, 5, w_gate_up, w_down, None, None, "swiglu") is None
    out = md.moe_mlp(x, weights, ids, w_gate_up, w_down, backend="triton")
    assert_close(out, naive_moe_mlp(*(t.cpu() for t in inputs[:5])))


# ---- bf16 under the interpreter, fp16 gradients ---------------------------------------------


@pytest.mark.parametrize("case", [c for c in CASES if c.id in ("odd-sizes", "empty-experts", "T=1")])
def test_bf16_moe_mlp_forward(case, gen):
    # On CPU the kernels multiply bf16 through float32 (the interpreter cannot do a bf16 tl.dot)
    ids = case.ids(gen).to(DEVICE)
    x = _randn(case.tokens, case.hidden, gen=gen, dtype=torch.bfloat16)
    weights = random_weights(case.tokens, case.top_k, gen).to(DEVICE)
    w_gate_up, w_down = _expert_weights(case.experts, case.hidden, case.inter, gen, torch.bfloat16)
    out = md.moe_mlp(x, weights, ids, w_gate_up, w_down, backend="triton")
    assert out.dtype == torch.bfloat16
    assert_close(out, naive_moe_mlp(*(t.cpu() for t in (x, weights, ids, w_gate_up, w_down))))


def _moe_mlp_grads(dtype, activation, bias, gen, tokens=19, top_k=2, experts=5, hidden=29, inter=17):
    """(ours, reference) outputs and gradients of x, weights, both weight tensors and biases."""
    ids = random_ids(tokens, top_k, experts, gen).to(DEVICE)
    w_gate_up, w_down = _expert_weights(experts, hidden, inter, gen, dtype, activation)
    tensors = [_randn(tokens, hidden, gen=gen, dtype=dtype), random_weights(tokens, top_k, gen).to(DEVICE),
               w_gate_up, w_down]
    if bias:
        tensors += [_bias(experts, w_gate_up.shape[1], gen=gen, dtype=dtype),
                    _bias(experts, hidden, gen=gen, dtype=dtype)]
    dy = _randn(tokens, hidden, gen=gen, dtype=dtype)

    def run(fn, device):
        leaves = [t.detach().to(device).requires_grad_() for t in tensors]
        out = fn(leaves, ids.to(device))
        out.backward(dy.to(device, out.dtype))
        return [out.detach()] + [t.grad for t in leaves]

    def ours(leaves, ids):
        b = leaves[4:] + [None, None]
        return md.moe_mlp(leaves[0], leaves[1], ids, leaves[2], leaves[3], activation=activation,
                          b_gate_up=b[0], b_down=b[1], backend="triton")

    def naive(leaves, ids):
        b = leaves[4:] + [None, None]
        return naive_moe_mlp(leaves[0], leaves[1], ids, leaves[2], leaves[3], b[0], b[1], activation)

    return run(ours, DEVICE), run(naive, "cpu")


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_fp16_training_step(activation, gen):
    ours, ref = _moe_mlp_grads(torch.float16, activation, True, gen)
    for name, got, expected in zip(("out", "x", "weights", "w_gate_up", "w_down", "b_gate_up", "b_down"), ours, ref):
        assert_close(got, expected, dtype=torch.float16)


# ---- availability and the autotune cache -----------------------------------------------------


def test_cpu_needs_the_interpreter(monkeypatch):
    backend = md.backends.get_backend("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "TRITON_INTERPRET=1" in backend.unavailable_reason(torch.device("cpu"))
    assert "CUDA" in backend.unavailable_reason(torch.device("meta"))


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
    assert json.loads(path.read_text()) == {"k1": configs.asdict(options[1])}
    # a new process (a new tuner) reads the file and times nothing
    fresh, fresh_calls = _fake_bench({16: 0.0, 32: 9.0, 64: 9.0})
    assert configs.Tuner(fresh).select("k1", lambda: options, lambda c: c, path, may_tune=True) == options[1]
    assert fresh_calls == []
    # an unreadable entry is tuned again, not trusted
    path.write_text(json.dumps({"k1": {"block_m": 16, "tile_shape": [1, 2]}}))
    assert configs.Tuner(bench).select("k1", lambda: options, lambda c: c, path, may_tune=True) == options[1]


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


# ---- on a GPU ---------------------------------------------------------------------------------

@pytest.fixture
def pinned_configs(monkeypatch):
    """Default tile configs, no timing: keeps the GPU tests to one compile per kernel variant."""
    monkeypatch.setenv(configs.AUTOTUNE_ENV, "0")
    monkeypatch.delenv("MOE_DISPATCH_CHECKS", raising=False)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.usefixtures("pinned_configs")
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_gpu_ops_match_the_reference(case, dtype, gen):
    ids = case.ids(gen)
    plan = md.make_plan(ids.cuda(), case.experts, backend="triton")
    assert all(torch.equal(a.cpu(), b) for a, b in zip(
        (plan.counts, plan.offsets, plan.token_of_row, plan.row_of_slot), TorchBackend().make_plan(ids, case.experts)))
    x = _randn(case.tokens, case.hidden, gen=gen, dtype=dtype)
    weights = random_weights(case.tokens, case.top_k, gen).cuda()
    xs = md.permute(x, plan, backend="triton")
    assert torch.equal(xs.cpu(), x.cpu()[plan.token_of_row.cpu().long()])
    assert_close(md.unpermute(xs, plan, weights, backend="triton"),
                 (x.double() * weights.double().sum(1, keepdim=True)))
    w = _randn(case.experts, case.inter, case.hidden, gen=gen, dtype=dtype, scale=case.hidden ** -0.5)
    ys = md.grouped_mm(xs, w.transpose(1, 2), plan.offsets, backend="triton")
    assert_close(ys, naive_grouped_mm(xs.cpu(), w.cpu().transpose(1, 2), plan.offsets.tolist()))
    w_gate_up, w_down = _expert_weights(case.experts, case.hidden, case.inter, gen, dtype)
    out = md.moe_mlp(x, weights, ids.cuda(), w_gate_up, w_down, backend="triton")
    assert out.dtype == dtype
    assert_close(out, naive_moe_mlp(*(t.cpu() for t in (x, weights, ids, w_gate_up, w_down))))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("activation,bias", [("swiglu", True), ("gelu", False)])
@pytest.mark.usefixtures("pinned_configs")
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_gpu_training_step(dtype, activation, bias, gen):
    ours, ref = _moe_mlp_grads(dtype, activation, bias, gen)
    for got, expected in zip(ours, ref):
        assert got.dtype == dtype or got.dtype == torch.float32
        assert_close(got, expected, dtype=dtype)


@pytest.mark.parametrize("config", GEMM_CONFIGS)
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_gpu_bf16_epilogues_and_split_k(config, gen):
    _check_epilogues(config, "swiglu", torch.bfloat16, gen)


@pytest.mark.usefixtures("pinned_configs")
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_gpu_decode_picks_split_k_and_matches(gen):
    # one token, K = 1024: the default config splits K so the few row tiles fill the GPU
    tokens, top_k, experts, hidden, inter = 1, 2, 8, 1024, 256
    assert configs.gemm_candidates(2, experts, hidden, inter, True, torch.bfloat16, DEVICE)[0].split_k > 1
    ids = random_ids(tokens, top_k, experts, gen).cuda()
    x = _randn(tokens, hidden, gen=gen, dtype=torch.bfloat16)
    weights = random_weights(tokens, top_k, gen).cuda()
    w_gate_up, w_down = _expert_weights(experts, hidden, inter, gen, torch.bfloat16)
    plan = md.make_plan(ids, experts, backend="triton")  # with a plan: the grouped GEMMs, not the decode kernels
    out = md.moe_mlp(x, weights, ids, w_gate_up, w_down, plan=plan, backend="triton")
    assert_close(out, naive_moe_mlp(*(t.cpu() for t in (x, weights, ids, w_gate_up, w_down))))


@pytest.fixture
def fma_float32():
    """float32 without TF32 (torch's default), whatever an earlier test set: the FMA dot."""
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    matmul.fp32_precision = "ieee"
    yield
    matmul.fp32_precision = before


# bf16 tl.dot runs only on a GPU; float32 without TF32 has its own candidates (the FMA dot)
TUNED_DTYPES = [torch.bfloat16, torch.float32]


@pytest.mark.parametrize("dtype", TUNED_DTYPES)
@pytest.mark.usefixtures("pinned_configs")
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_gpu_every_decode_candidate_matches(dtype, gen, request):
    # 16 tokens, a duplicate choice, strided weights, biases
    if dtype == torch.float32:
        request.getfixturevalue("fma_float32")
    x, weights, ids, w_gate_up, w_down, b_gate_up, b_down = inputs = _decode_inputs(
        16, 4, 12, "swiglu", True, dtype, gen, hidden=384, inter=200)
    expected = naive_moe_mlp(*(t.cpu() for t in inputs))
    budget = configs.shared_memory_budget(DEVICE)
    fma = configs.uses_fma(dtype, DEVICE)
    for config in configs.decode_tiles(200, 12, True, dtype.itemsize, budget, 132, fma):
        act, routes, ok = kdecode.decode_up(x, ids, weights, w_gate_up.transpose(1, 2), b_gate_up, "silu", True,
                                            config)
        out = kdecode.decode_down(act, ids, routes, w_down.transpose(1, 2), b_down, config)
        try:
            assert ok.tolist() == [True]
            assert_close(out, expected)
        except AssertionError as exc:
            raise AssertionError(f"{config}: {exc}") from exc


@pytest.mark.parametrize("rows_per_expert", [1, 32, 1024])
@pytest.mark.parametrize("dtype", TUNED_DTYPES)
@pytest.mark.usefixtures("pinned_configs")
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_gpu_every_tuning_candidate_matches(dtype, rows_per_expert, gen, request):
    # Autotuning keeps the fastest candidate unchecked, so every one must compute the same: the
    # decode tiles (with split-K) and the large ones (up to 128x256 and 16 warps on sm_90), over
    # several M-tiles per expert and a partial last N-tile.
    if dtype == torch.float32:
        request.getfixturevalue("fma_float32")
    budget = configs.shared_memory_budget(DEVICE)
    fma = configs.uses_fma(dtype, DEVICE)
    candidates = [c for gated in (True, False)
                  for c in configs.gemm_tiles(rows_per_expert, gated, dtype.itemsize, budget, fma)]
    if rows_per_expert == 1:
        candidates += [replace(c, split_k=3) for c in configs.gemm_tiles(1, True, dtype.itemsize, budget, fma)]
    for config in dict.fromkeys(candidates):
        try:
            _check_epilogues(config, "swiglu", dtype, gen, sizes=(300, 2, 3, 256, 200))
        except AssertionError as exc:
            raise AssertionError(f"{config}: {exc}") from exc


def _layer_and_input(gen, tokens=300):
    torch.manual_seed(0)
    layer = md.MoE(256, 128, 16, 4, bias=True, backend="triton", device="cuda", dtype=torch.bfloat16)
    x = _randn(tokens, 256, gen=gen, dtype=torch.bfloat16)
    return layer, x


@pytest.mark.usefixtures("pinned_configs")
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_gpu_layer_never_syncs_with_the_host(gen):
    layer, x = _layer_and_input(gen)
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
@pytest.mark.parametrize("tokens", [300, 4], ids=["planned", "decode"])
def test_gpu_layer_forward_captures_in_a_cuda_graph(tokens, gen):
    layer, x = _layer_and_input(gen, tokens)
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
        fresh = _randn(*x.shape, gen=gen, dtype=x.dtype)
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
    # A device-side assert poisons the CUDA context, so it runs in its own process.
    script = textwrap.dedent(f"""
        import torch, moe_dispatch as md
        ids = torch.tensor([[0, 4], [1, 2]], device="cuda")
        {call}
        try:
            torch.cuda.synchronize()
        except RuntimeError as exc:
            print("SURFACED", exc)
        else:
            print("SILENT")
    """)
    env = dict(_subprocess_env(drop="MOE_DISPATCH_CHECKS"), MOE_DISPATCH_AUTOTUNE="0")  # tuning would sync first
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert "SURFACED" in result.stdout, result.stdout + result.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_gpu_bad_expert_id_raises_eagerly_with_checks(monkeypatch):
    monkeypatch.setenv("MOE_DISPATCH_CHECKS", "1")
    with pytest.raises(ValueError, match="expert id -1"):
        md.make_plan(torch.tensor([[0, -1]], device="cuda"), 4, backend="triton")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_gpu_tune_persists_the_layer_configs(tmp_path, monkeypatch):
    from moe_dispatch.backends import triton_backend

    monkeypatch.setenv(configs.CACHE_DIR_ENV, str(tmp_path))
    monkeypatch.setenv(configs.AUTOTUNE_ENV, "0")  # tune() times the candidates regardless
    triton_backend.tune(64, 128, 64, 8, 2, backward=False)
    path = triton_backend.tune(8, 128, 64, 8, 2, backward=False)  # a decode step: its own kernels too
    table = json.loads(path.read_text())
    assert path.parent == tmp_path
    assert {key.split(":")[0] for key in table} >= {"mm", "up", "down", "dec_up", "dec_down"}
    assert all(set(entry) == set(configs.asdict(configs.SAFE)) for entry in table.values())


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


# ---- compiled for real GPUs, without one ---------------------------------------------------

COMPILE_HELPERS = textwrap.dedent("""
    import json, os, re, subprocess, tempfile
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from moe_dispatch.kernels.triton import configs, decode, grouped_gemm, wgrad

    CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")

    def machine_code(cubin):
        # (stack frame bytes, spills inside a loop, the matrix instruction used, whether TMA
        # loads are used) from the cubin's resource usage and SASS
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(cubin)
            f.flush()
            usage = subprocess.run([CUOBJDUMP, "-res-usage", f.name], capture_output=True, text=True, check=True)
            sass = subprocess.run([CUOBJDUMP, "-sass", f.name], capture_output=True, text=True, check=True)
        mma = next((op for op in ("HGMMA", "HMMA") if re.search(rf"\\b{op}\\.", sass.stdout)), "none")
        tma = re.search(r"\\bUTMALDG\\b", sass.stdout) is not None
        # local-memory accesses (spilled registers) between a backward branch and its target
        code = [(int(m.group(1), 16), line) for line in sass.stdout.splitlines()
                if (m := re.search(r"/\\*([0-9a-f]+)\\*/", line))]
        loops = [(int(m.group(1), 16), at) for at, line in code
                 if (m := re.search(r"\\bBRA\\s+0x([0-9a-f]+)", line)) and int(m.group(1), 16) < at]
        loop_spills = sum(1 for at, line in code
                          if re.search(r"\\b(STL|LDL)\\b", line) and any(lo <= at <= hi for lo, hi in loops))
        return int(re.search(r"STACK:(\\d+)", usage.stdout).group(1)), loop_spills, mma, tma

    # arguments real launches pass as constants: K-contiguous weights, no TMA descriptor
    FIXED = {"stride_wk": 1, "stride_ak": 1, "w_desc": None}

    def compiled(fn, arch, pointers, constants, config):
        # ints divisible by 16, as Triton specializes real launches
        signature, constexprs = {}, {}
        for i, p in enumerate(fn.params):
            if p.is_constexpr or (p.name in FIXED and p.name not in pointers):
                signature[p.name] = "constexpr"
                constexprs[(i,)] = constants[p.name] if p.name in constants else FIXED.get(p.name, 1)
            else:
                signature[p.name] = pointers.get(p.name, "i32")
        attrs = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(fn.params) if signature[p.name] != "constexpr"}
        source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
        options = dict(num_warps=config.num_warps, num_stages=config.num_stages)
        kernel = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
        # the most cp.async groups a loop leaves in flight while it computes (0: loads and math
        # take turns)
        ahead = max(map(int, re.findall(r"cp\\.async\\.wait_group\\s+(\\d+)", kernel.asm["ptx"])), default=0)
        return (kernel.metadata.shared, *machine_code(kernel.asm["cubin"]), ahead)

    bf16 = {p: "*bf16" for p in ("a_ptr", "w_ptr", "bias_ptr", "out_ptr", "h_ptr", "dy_ptr", "dh_ptr", "act_ptr",
                                 "b_ptr")}
    pointers = dict(bf16, a_rows_ptr="*i32", offsets_ptr="*i32", slot_of_row_ptr="*i32", token_of_row_ptr="*i32",
                    b_rows_ptr="*i32", weight_of_row_ptr="*fp32", ws_ptr="*fp32", drow_ptr="*fp32",
                    a_scale_ptr="*fp32", x_ptr="*bf16", ids_ptr="*i64", ok_ptr="*i1", weights_ptr="*fp32",
                    owner_ptr="*i32", route_weights_ptr="*fp32")
""")

COMPILE_GEMMS = COMPILE_HELPERS + textwrap.dedent("""
    # the consumer GPUs (about 100 KB of shared memory) and Hopper
    ARCHS = ((80, configs.SMALL_SMEM), (86, configs.SMALL_SMEM), (90, configs.LARGE_SMEM), (120, configs.SMALL_SMEM))
    common = dict(E_PAD=64, GROUP_M=grouped_gemm.GROUP_M, PRECISION="ieee", UPCAST=False, EVEN_K=True,
                  HAS_BIAS=True, ACT=1, W_TMA=False)
    fp32 = {name: "*fp32" if kind == "*bf16" else kind for name, kind in pointers.items()}
    report = []
    for arch, budget in ARCHS:
        def check(fn, config, fma=False, **flags):
            tile = dict(BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, W_TMA=config.tma)
            descriptor = {"w_desc": f"tensordesc<bf16[{config.block_n},{config.block_k}]>"} if config.tma else {}
            types = {**(fp32 if fma else pointers), **descriptor}
            report.append((arch, budget, fma, config.block_m, config.tma, config.num_stages, str(config),
                           *compiled(fn, arch, types, {**common, **tile, **flags}, config)))

        # bf16: the defaults of each regime, and on sm_90 the first TMA candidate of the largest;
        # float32 without TF32 (fma, the FMA dot): the defaults
        for elem, fma in ((2, False), (4, True)):
            for rows_per_expert in (1, 32, 1024):
                ups, downs = (configs.gemm_tiles(rows_per_expert, gated, elem, budget, fma) for gated in (True, False))
                for up in [ups[0]] + [c for c in ups if c.tma][:1]:
                    check(grouped_gemm.grouped_gemm_kernel, up, fma, SPLIT_K=2, GATHER=True, GATED=True,
                          STORE_H=True, SCATTER=False, SCALE=False)
                for down in [downs[0]] + [c for c in downs if c.tma][:1]:
                    check(grouped_gemm.grouped_gemm_kernel, down, fma, SPLIT_K=1, GATHER=False, GATED=False,
                          STORE_H=False, SCATTER=True, SCALE=True)
            for rows_per_expert in (1, 1024):
                config = configs.act_backward_tiles(rows_per_expert, elem, budget, fma)[0]
                check(grouped_gemm.grouped_gemm_act_backward_kernel, config, fma, GATED=True)
            # the two the backward runs: dW_down (dy rows gathered and scaled), dW_gate_up (x
            # rows gathered), with the stage the launcher adds for a gather
            config = configs.wgrad_tiles(elem, budget, fma)[0]
            config = configs.replace(config, num_stages=wgrad.pipeline_stages(config, gathered=True))
            check(wgrad.grouped_wgrad_kernel, config, fma, GATHER_A=True, SCALE_A=True, GATHER_B=False)
            check(wgrad.grouped_wgrad_kernel, config, fma, GATHER_A=False, SCALE_A=False, GATHER_B=True)
            # every bf16 decode candidate (the tuner may keep any), the float32 defaults; DeepSeek-V3 at
            # T=16: 128 slots, 8 choices
            ups = configs.decode_tiles(2048, 8, True, elem, budget, 132, fma)
            downs = configs.decode_tiles(7168, 1, False, elem, budget, 132, fma)
            for config in ups[:1] if fma else ups:
                check(decode.decode_up_kernel, config, fma, GATED=True, BLOCK_T=decode.MAX_TOKENS, S_PAD=128,
                      K_PAD=8)
            for config in downs[:1] if fma else downs:
                check(decode.decode_down_kernel, config, fma, BLOCK_T=decode.MAX_TOKENS, S_PAD=128)
    print(json.dumps(report))
""")

# every other kernel, with the constants of a DeepSeek-V3 layer (E = 256, H = 7168)
COMPILE_OTHERS = COMPILE_HELPERS + textwrap.dedent("""
    from moe_dispatch.kernels.triton import permute, plan
    more = dict(pointers, counts_ptr="*i32", chunk_counts_ptr="*i32", chunk_base_ptr="*i32",
                row_of_slot_ptr="*i32", index_ptr="*i32", rows_ptr="*i32", src_ptr="*bf16", dst_ptr="*bf16",
                ys_ptr="*bf16", dys_ptr="*bf16", dweights_ptr="*fp32", parts_ptr="*fp32",
                scale_ptr="*fp32", all_placed_ptr="*i1")
    rows, width = permute._tile(7168)
    kernels = [
        (plan.plan_one_launch_kernel, {}, dict(SUB=32, E_PAD=256)),
        (plan.plan_count_kernel, {}, dict(SUB=32, E_PAD=256)),
        (plan.plan_scan_kernel, {}, dict(CB=32, E_PAD=256)),
        (plan.plan_scatter_kernel, {}, dict(SUB=32, E_PAD=256)),
        (permute.gather_rows_kernel, {}, dict(BLOCK_R=rows, BLOCK_W=width)),
        (permute.combine_kernel, {}, dict(HAS_WEIGHTS=True, SLOT_MAJOR=False, BLOCK_T=rows, BLOCK_W=width)),
        (permute.combine_backward_kernel, {}, dict(BLOCK_S=rows, BLOCK_W=width)),
        (permute.invert_rows_kernel, {}, dict(HAS_WEIGHTS=True, BLOCK=256)),
        (grouped_gemm.splitk_reduce_kernel, {}, dict(SPLIT_K=3, BLOCK_M=16, BLOCK_N=64, ACT=1, GATED=True,
                                                      STORE_H=True, SCATTER=True, SCALE=True)),
        (grouped_gemm.row_parts_to_slots_kernel, dict(out_ptr="*fp32"), dict(BLOCK=256)),
        (wgrad.expert_sums_kernel, dict(out_ptr="*fp32"), dict(BLOCK_R=16, BLOCK_N=256, GATHER=True, SCALE=True)),
    ]
    report = [(fn.__name__, arch, *compiled(fn, arch, {**more, **own}, constants, configs.SAFE))
              for arch in (86, 90) for fn, own, constants in kernels]
    print(json.dumps(report))
""")


def _compile_report(script: str) -> list:
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                            env=_subprocess_env(drop="TRITON_INTERPRET"))
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_default_configs_compile_for_consumer_gpus_and_hopper():
    # ptxas and cuobjdump ship with Triton: compile for sm_80, sm_86 and sm_120 (about 100 KB of
    # shared memory) and sm_90 without a GPU, outside the interpreter, and check each default
    # config's machine code:
    # - the shared memory it needs;
    # - spills: none inside a loop, and none at all for bf16 on sm_86 and sm_90. Elsewhere ptxas
    #   keeps a value or two in local memory around the main loop for some tiles, of one
    #   architecture or Triton version and not another, at no cost (float32 without TF32 on
    #   sm_90, bf16 decode tiles on sm_80 with Triton 3.6); a tile that is too large spills
    #   inside the loop instead (3 KB a thread for the FMA dot's gated 64x128x32 on sm_80);
    # - the MMA: on sm_90 the warpgroup MMA (HGMMA) for bf16 tiles of 64 rows and more, the older
    #   HMMA otherwise, none for the FMA dot;
    # - the TMA candidates load their weight tiles with the TMA (UTMALDG);
    # - with 3 stages or more, the main loop computes while loads are in flight.
    report = _compile_report(COMPILE_GEMMS)
    assert len(report) == 130
    for arch, budget, fma, block_m, tma, stages, config, shared, stack, loop_spills, mma, tma_loads, ahead in report:
        assert 0 < shared <= budget, (arch, config, shared)
        assert loop_spills == 0, (arch, fma, config, loop_spills)
        assert stack == 0 or fma or arch not in (86, 90), (arch, config, stack)
        expected = "none" if fma else "HGMMA" if arch == 90 and block_m >= 64 else "HMMA"
        assert mma == expected, (arch, fma, config, mma)
        assert tma_loads == tma, (arch, config)
        assert ahead > 0 or stages < 3, (arch, fma, config)
    assert sum(row[4] for row in report) == 2
    assert sum(row[2] for row in report) == 48


def test_every_other_kernel_compiles_for_consumer_gpus_and_hopper():
    # the interpreter accepts some programs the compiler rejects: the plan, data-movement and
    # reduction kernels compile for sm_86 and sm_90 too, without spilling
    report = _compile_report(COMPILE_OTHERS)
    assert len(report) == 22
    for name, arch, shared, stack, _, mma, tma_loads, _ in report:
        assert shared <= configs.SMALL_SMEM and stack == 0 and mma == "none", (name, arch, shared, stack, mma)
