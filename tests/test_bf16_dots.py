"""The bfloat16 dot products of moe_dispatch/kernels/numba/bf16_dots.py, which the decode
kernels take on packed bfloat16 weights where the CPU has AVX512-BF16: two weight rows at a
time and four, compiled for this CPU and for none (the generic vector code), against their
numpy definition, and that against float64."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import needs_numba

pytestmark = needs_numba

FEATURES = [pytest.param(None, id="host"), pytest.param("", id="generic")]


def compiled(features, weight_rows):
    from numba import njit

    from moe_dispatch.kernels.numba.bf16_dots import bf16_dots_intrinsic, bf16_quad_dots_intrinsic

    if weight_rows == 2:
        pair = bf16_dots_intrinsic(features)

        @njit
        def run(src, index, gather, start, end, w, out):
            pair(src, index, gather, start, end, w[0], w[1], out)

        return run
    quad = bf16_quad_dots_intrinsic(features)

    @njit
    def run_quad(src, index, gather, start, end, w, out):
        quad(src, index, gather, start, end, w[0], w[1], w[2], w[3], out)

    return run_quad


def definition(weight_rows):
    from moe_dispatch.kernels.numba.bf16_dots import bf16_dots, bf16_quad_dots

    if weight_rows == 2:
        return lambda src, index, gather, start, end, w, out: bf16_dots(src, index, gather, start, end, *w, out)
    return lambda src, index, gather, start, end, w, out: bf16_quad_dots(src, index, gather, start, end, *w, out)


@pytest.mark.parametrize("features", FEATURES)
@pytest.mark.parametrize("gather", [True, False])
@pytest.mark.parametrize("weight_rows", [2, 4])
def test_the_vector_code_computes_the_definition(features, gather, weight_rows, gen):
    from moe_dispatch.kernels.numba.bf16_dots import STEP

    depth, num_src = 3 * STEP, 12
    src = torch.randn(num_src, depth, generator=gen).bfloat16()
    w = torch.randn(weight_rows, depth, generator=gen).bfloat16()
    bits, words = src.view(torch.uint16).numpy(), w.view(torch.uint16).numpy().view(np.uint32)
    run, expect = compiled(features, weight_rows), definition(weight_rows)
    for num in (1, 2, 3, 4, 5, 7, 8, 9):  # passes of four rows and every rest
        index = torch.randperm(num_src, generator=gen).to(torch.int32).numpy()
        start = 2
        out = np.full((weight_rows, num + 1), np.nan, np.float32)
        expected = np.full((weight_rows, num + 1), np.nan, np.float32)
        run(bits, index, gather, start, start + num, words, out)
        expect(bits, index, gather, start, start + num, words, expected)
        assert np.isnan(out[:, num]).all()  # nothing written past the rows
        np.testing.assert_allclose(out[:, :num], expected[:, :num], rtol=1e-5, atol=1e-5 * depth)
        rows = index[start:start + num] if gather else np.arange(start, start + num)
        truth = w.double().numpy() @ src.double().numpy()[rows].T
        np.testing.assert_allclose(expected[:, :num], truth, rtol=1e-5, atol=1e-5)


def test_a_bfloat16_decode_step_of_whole_steps_matches_the_reference(gen):
    """H and I in whole steps: on a CPU with AVX512-BF16 both products of the step take these
    dot products; the answer is the reference's either way."""
    import moe_dispatch as md
    from moe_dispatch.kernels.numba import bf16_dots

    hidden, inter, num_experts = 2 * bf16_dots.STEP, bf16_dots.STEP, 4
    x = torch.randn(3, hidden, generator=gen).bfloat16()
    w_gate_up = (torch.randn(num_experts, 2 * inter, hidden, generator=gen) / hidden ** 0.5).bfloat16()
    w_down = (torch.randn(num_experts, hidden, inter, generator=gen) / inter ** 0.5).bfloat16()
    ids = torch.randint(0, num_experts, (3, 2), generator=gen)
    weights = torch.rand(3, 2, generator=gen)
    out = md.moe_mlp(x, weights, ids, w_gate_up, w_down, backend="numba")
    ref = md.moe_mlp(x.double(), weights.double(), ids, w_gate_up.double(), w_down.double(), backend="torch")
    torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=2e-2)


def test_a_bfloat16_step_of_many_rows_per_expert_reads_four_weight_rows_a_pass(gen, monkeypatch):
    """From QUAD_ROWS rows per active expert the decode step's products read four weight rows
    a pass (bf16_quad_dots where the CPU has AVX512-BF16); the answer is the reference's."""
    import moe_dispatch as md
    from moe_dispatch.backends import numba_backend as nb
    from moe_dispatch.kernels.numba import bf16_dots

    hidden, inter, num_experts, tokens = 2 * bf16_dots.STEP, 3 * bf16_dots.STEP, 3, 15
    x = torch.randn(tokens, hidden, generator=gen).bfloat16()
    w_gate_up = (torch.randn(num_experts, 2 * inter, hidden, generator=gen) / hidden ** 0.5).bfloat16()
    w_down = (torch.randn(num_experts, hidden, inter, generator=gen) / inter ** 0.5).bfloat16()
    ids = torch.stack([torch.randperm(num_experts, generator=gen)[:2] for _ in range(tokens)])
    weights = torch.rand(tokens, 2, generator=gen)
    assert tokens * 2 >= nb.QUAD_ROWS * num_experts  # 30 rows on 3 experts: 10 each on average
    steps = []
    decode = nb.mlp.moe_mlp_decode_ids
    monkeypatch.setattr(nb.mlp, "moe_mlp_decode_ids", lambda *args: steps.append(args) or decode(*args))
    out = md.moe_mlp(x, weights, ids, w_gate_up, w_down, backend="numba")
    ref = md.moe_mlp(x.double(), weights.double(), ids, w_gate_up.double(), w_down.double(), backend="torch")
    torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=2e-2)
    assert steps or not bf16_dots.TAKES_BF16_DOTS  # elsewhere 10 rows an expert go to the library
