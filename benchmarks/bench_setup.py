"""What the benchmark suite runs: device, presets, tokens, backends, the quick subset.

On a GPU the presets run at full size, on the CPU at the scale `moe-dispatch bench` uses
(MOE_DISPATCH_BENCH_SCALE overrides it).
"""

from __future__ import annotations

import os

import pytest
import torch

from moe_dispatch.backends import BACKEND_NAMES, unavailable_reason
from moe_dispatch.benchmarking.presets import DEFAULT_PRESET, DEFAULT_SCALE, PRESETS, scaled

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SCALE = float(os.environ.get("MOE_DISPATCH_BENCH_SCALE", DEFAULT_SCALE[DEVICE.type]))
DTYPE = torch.bfloat16
TOKENS = (1, 16, 128, 1024) if DEVICE.type == "cpu" else (1, 16, 128, 1024, 8192)
QUICK_TOKENS = (1, 128)
PRESET_LIST = [scaled(p, SCALE) for p in PRESETS.values()]
# The interpreter runs Triton on the CPU for tests, not for speed.
BACKENDS = [n for n in BACKEND_NAMES
            if unavailable_reason(n, DEVICE) is None and not (n == "triton" and DEVICE.type == "cpu")]


def is_quick(preset_name: str, tokens: int) -> bool:
    return preset_name == DEFAULT_PRESET and tokens in QUICK_TOKENS


def shape_params():
    """(preset, tokens) pairs as pytest params, the quick subset marked `quick`."""
    return [
        pytest.param(p, t, marks=[pytest.mark.quick] if is_quick(p.name, t) else [], id=f"{p.label}-T{t}")
        for p in PRESET_LIST for t in TOKENS
    ]


