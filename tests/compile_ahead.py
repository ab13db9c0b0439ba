"""Compile the Numba kernels that the suite's later files need, in a child that conftest.py
starts with the session, into the compile cache the suite reads.

On an empty cache two thirds of the suite's time on two cores is the suite compiling kernels,
one at a time on one core. This child compiles on the other, starting from the kernels the
suite meets last (the quantized formats, float64, the activations, float16), so that the two
meet about halfway. Each step calls the public functions as the tests do, on small inputs; a
kernel that a test then calls with other types compiles there as before (time lost, nothing
else). The cache takes saves from both processes at once (kernels/numba/caching.py).

    python tests/compile_ahead.py     # from a checkout, on an empty cache: what it compiles
"""

from __future__ import annotations

import sys
import time

import pytest
import torch

import moe_dispatch as md
from conftest import (expert_weights, large_groups_everywhere, random_ids, random_weights,
                      register_tiles_everywhere, small_groups_everywhere)
from moe_dispatch.activations import ACTIVATIONS
from moe_dispatch.backends import get_backend
from moe_dispatch.backends.numba_backend import acc_dtype

PATHS = {"decode": small_groups_everywhere, "tiles": register_tiles_everywhere, "blocked": large_groups_everywhere}
QUANTIZED = [("mxfp4", {}, 64, 64), ("fp8", {}, 192, 96), ("int4", {"group_size": 32}, 64, 32),
             ("int8", {"group_size": 32}, 64, 32)]


def moe_mlp_step(dtype, path, activation="swiglu", fmt=None, backward=False, tokens=23):
    """One moe_mlp call (and its backward) down path: 5 experts, top-3, with biases."""
    gen = torch.Generator().manual_seed(0)
    fmt, options, hidden, inter = fmt or (None, {}, 64, 32)
    w_gate_up, w_down, b_gate_up, b_down = expert_weights(5, hidden, inter, gen, torch.float32 if fmt else dtype,
                                                          activation, bias=True, bias_dtype=torch.float32)
    if fmt:
        w_gate_up, w_down = (md.quantize(w, fmt, dtype=dtype, **options) for w in (w_gate_up, w_down))
    x = torch.randn(tokens, hidden, generator=gen).to(dtype).requires_grad_(backward)
    weights = random_weights(tokens, 3, gen)
    with pytest.MonkeyPatch.context() as monkeypatch:
        PATHS[path](monkeypatch)
        out = md.moe_mlp(x, weights, random_ids(tokens, 3, 5, gen), w_gate_up, w_down, b_gate_up=b_gate_up,
                         b_down=b_down, activation=activation, backend="numba")
        if backward:
            out.sum().backward()


def backward_rows(dtype, activation):
    """The backward's one-pass kernel alone, as test_moe_mlp.py's float64 test calls it."""
    h = torch.randn(7, ACTIVATIONS[activation].width(5)).to(dtype)
    g, dyp = torch.randn(7, 5).to(dtype), torch.randn(7, 6).to(dtype)
    w_row = torch.rand(7).to(acc_dtype(dtype))
    get_backend("numba").moe_mlp_backward_rows(h, g, dyp, w_row, activation, False)


# The activations the tests run through whole layers in each dtype besides float32 (which runs
# them all): a combination no test uses would only take the other core's time.
ACTIVATIONS_IN = {torch.bfloat16: ("swiglu", "gelu", "clamped_swiglu"), torch.float16: ("swiglu", "gelu")}
# float64 runs the register tiles (test_outer_products.py) and the backward's kernel alone.
FLOAT64_TILES = ("swiglu", "gelu", "clamped_swiglu")


def steps():
    """(name, call) in the order to compile them: the opposite of the suite's files."""
    for dtype in (torch.bfloat16, torch.float32, torch.float16):
        for fmt in QUANTIZED:
            for path, tokens in (("tiles", 23), ("decode", 2), ("blocked", 23)):
                if path != "tiles" or dtype == torch.bfloat16:
                    yield (f"{fmt[0]} {dtype} {path} T={tokens}",
                           lambda dtype=dtype, path=path, fmt=fmt, tokens=tokens: moe_mlp_step(dtype, path, fmt=fmt,
                                                                                                tokens=tokens))
    for activation in ACTIVATIONS:
        yield (f"{activation} torch.float64 backward rows",
               lambda activation=activation: backward_rows(torch.float64, activation))
        if activation in FLOAT64_TILES:
            yield (f"{activation} torch.float64 tiles",
                   lambda activation=activation: moe_mlp_step(torch.float64, "tiles", activation))
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for activation in ACTIVATIONS_IN.get(dtype, ACTIVATIONS):
            for path in ("decode", "tiles"):
                yield (f"{activation} {dtype} {path}",
                       lambda dtype=dtype, path=path, activation=activation: moe_mlp_step(dtype, path, activation,
                                                                                          backward=True))


def main() -> None:
    torch.set_num_threads(1)
    for name, step in steps():
        start = time.perf_counter()
        step()
        print(f"{time.perf_counter() - start:6.1f} s  {name}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
