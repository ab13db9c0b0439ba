"""The exp of moe_dispatch/kernels/numba/vector_math.py, as the activations call it (one float32)
and as the AMX tiles' epilogue emits it (a vector of 16): within 2 ulp of e^x in float64 across
float32's range, subnormal results and the overflow to infinity included, and exact at 0,
+-inf and NaN."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import needs_numba

pytestmark = needs_numba

LANES = 16
SPECIAL = [0.0, -0.0, np.inf, -np.inf, np.nan, 88.72, 88.73, -87.3, -100.0, -103.9, -104.0, -120.0, 1e-30]


def scalar_exps(x, out):
    from numba import njit

    from moe_dispatch.kernels.numba.vector_math import exp

    @njit
    def run(x, out):
        for i in range(x.shape[0]):
            out[i] = exp(x[i])

    run(x, out)


def vector_exps(x, out):
    from llvmlite import ir
    from numba import njit, types
    from numba.extending import intrinsic

    from moe_dispatch.kernels.numba.vector_math import emit_exp

    @intrinsic
    def exp16(typingctx, x, out):
        def codegen(context, builder, sig, args):
            vector = ir.VectorType(ir.FloatType(), LANES)
            src, dst = (builder.bitcast(context.make_array(t)(context, builder, v).data, vector.as_pointer())
                        for t, v in zip(sig.args, args))
            builder.store(emit_exp(builder, builder.load(src, align=4)), dst, align=4)
            return context.get_dummy_value()

        return types.void(x, out), codegen

    @njit
    def run(x, out):
        for i in range(0, x.size, LANES):
            exp16(x[i:i + LANES], out[i:i + LANES])

    run(x, out)


@pytest.mark.parametrize("exps", [scalar_exps, vector_exps], ids=["scalar", "vector"])
def test_exp_is_expf(exps, gen):
    x = np.concatenate([torch.empty(4096 - len(SPECIAL)).uniform_(-105, 89, generator=gen).numpy(),
                        np.array(SPECIAL)]).astype(np.float32)
    out = np.empty_like(x)
    exps(x, out)
    truth = np.exp(x.astype(np.float64))
    finite = np.isfinite(truth) & (truth < np.finfo(np.float32).max)
    ulp = np.spacing(truth[finite].astype(np.float32)).astype(np.float64)
    assert (np.abs(out[finite] - truth[finite]) <= 2 * ulp).all()
    assert np.isposinf(out[~np.isnan(x) & ~finite]).all() and np.isnan(out[np.isnan(x)]).all()
    assert out[x == 0].tolist() == [1.0, 1.0]
