"""The bfloat16 dot products of moe_dispatch/kernels/numba/bf16_dots.py, which the decode
kernels take on packed bfloat16 weights where the CPU has AVX512-BF16: compiled for this CPU
and for none (the generic vector code), against their numpy definition, and that against
float64."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import needs_numba

pytestmark = needs_numba

FEATURES = [pytest.param(None, id="host"), pytest.param("", id="generic")]


def compiled(features):
    from numba import njit

    from moe_dispatch.kernels.numba.bf16_dots import bf16_dots_intrinsic

    kernel = bf16_dots_intrinsic(features)

    @njit
    def run(src, index, gather, start, end, w_a, w_b, out):
        kernel(src, index, gather, start, end, w_a, w_b, out)

    return run


@pytest.mark.parametrize("features", FEATURES)
@pytest.mark.parametrize("gather", [True, False])
def test_the_vector_code_computes_the_definition(features, gather, gen):
    from moe_dispatch.kernels.numba.bf16_dots import STEP, bf16_dots

    depth, num_src = 3 * STEP, 12
    src = torch.randn(num_src, depth, generator=gen).bfloat16()
    w = torch.randn(2, depth, generator=gen).bfloat16()
    bits, words = src.view(torch.uint16).numpy(), w.view(torch.uint16).numpy().view(np.uint32)
    run = compiled(features)
    for num in (1, 2, 3, 4, 5, 7, 8, 9):  # passes of four rows and every rest
        index = torch.randperm(num_src, generator=gen).to(torch.int32).numpy()
        start = 2
        out, expected = np.full((2, num + 1), np.nan, np.float32), np.full((2, num + 1), np.nan, np.float32)
        run(bits, index, gather, start, start + num, words[0], words[1], out)
        bf16_dots(bits, index, gather, start, start + num, words[0], words[1], expected)
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
