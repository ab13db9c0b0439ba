"""The whole MoE layer (router, routing, experts, shared experts) per preset x tokens x backend,
forward and forward+backward."""

from __future__ import annotations

import pytest
import torch

from bench_setup import BACKENDS, DTYPE, shape_params
from moe_dispatch import MoE
from moe_dispatch.benchmarking.cases import make_inputs
from moe_dispatch.benchmarking.costs import layer_work


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "backward"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("preset, tokens", shape_params())
def test_layer(run_benchmark, device, preset, tokens, backend, backward):
    layer = MoE(**preset.layer_kwargs(), backend=backend, device=device, dtype=DTYPE)
    x = make_inputs(preset, tokens, DTYPE, device).x
    with torch.no_grad():
        touched = int((layer(x, return_aux=True)[1].counts > 0).sum())
    work = layer_work(preset, tokens, touched, DTYPE, backward)
    if backward:
        x = x.detach().requires_grad_()
        grad = torch.randn_like(x)
        params = [p for p in layer.parameters() if p.requires_grad]

        def call():
            torch.autograd.grad(layer(x), [x, *params], grad, allow_unused=True)
    else:
        layer.requires_grad_(False)

        def call():
            with torch.no_grad():
                layer(x)

    run_benchmark(call, work, dict(preset=preset.label, op="layer", implementation=backend, tokens=tokens,
                                   backward=backward))
