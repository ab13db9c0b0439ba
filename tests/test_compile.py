"""torch.compile: the public ops are custom ops, so a compiled MoE has no graph break."""

import pytest
import torch

import moe_dispatch as md
from conftest import assert_close


def test_layer_compiles_fullgraph_forward_and_backward(backend, gen):
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = md.MoE(16, 8, 5, 2, n_shared_experts=1, backend=backend)
    x = torch.randn(9, 16, generator=gen, requires_grad=True)

    explanation = torch._dynamo.explain(layer)(x)
    assert explanation.graph_break_count == 0

    eager = layer(x)
    (eager_grad,) = torch.autograd.grad(eager.square().sum(), x)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")(x)
    (compiled_grad,) = torch.autograd.grad(compiled.square().sum(), x)
    assert_close(compiled.detach(), eager.detach().double())
    assert_close(compiled_grad, eager_grad.double())


@pytest.mark.slow
def test_layer_compiles_with_inductor(gen):
    torch._dynamo.reset()
    layer = md.MoE(16, 8, 5, 2, backend="torch")
    x = torch.randn(9, 16, generator=gen)
    assert_close(torch.compile(layer, fullgraph=True)(x).detach(), layer(x).detach().double())
