"""Fixtures shared by the backend-generic suite.

Every backend that can run on this machine's CPU joins the same tests through the `backend`
fixture; the Triton kernels run on the CPU under TRITON_INTERPRET=1 when there is no GPU.
MOE_DISPATCH_TEST_BACKENDS=torch,numba restricts the set.
"""

from __future__ import annotations

import os
import zlib

import pytest
import torch

# Must be set before any Triton kernel is defined; a machine with a GPU runs them natively.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from moe_dispatch.backends import BACKEND_NAMES, unavailable_reason  # noqa: E402

CPU = torch.device("cpu")
HAS_CUDA = torch.cuda.is_available()

# Error allowed against the float64 reference, by the inputs' dtype: (rtol, atol), for
# values of order one. fp16/bf16 round each stored intermediate (h, the activation, the
# expert outputs) once.
TOLERANCE = {
    torch.float64: (1e-9, 1e-9),
    torch.float32: (2e-4, 2e-4),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (4e-2, 4e-2),
}


def _cpu_backends() -> list[str]:
    wanted = os.environ.get("MOE_DISPATCH_TEST_BACKENDS")
    names = wanted.split(",") if wanted else BACKEND_NAMES
    return [n for n in names if unavailable_reason(n, CPU) is None]


CPU_BACKENDS = _cpu_backends()


@pytest.fixture(params=CPU_BACKENDS)
def backend(request) -> str:
    return request.param


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    """Compare a backend's result with the float64 reference under the dtype's tolerance."""
    rtol, atol = TOLERANCE[dtype or actual.dtype]
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), rtol=rtol, atol=atol)


def random_ids(num_tokens: int, top_k: int, num_experts: int, generator: torch.Generator) -> torch.Tensor:
    """[T, k] int64, k distinct experts per token, like a real router's top-k."""
    scores = torch.rand(num_tokens, num_experts, generator=generator)
    return scores.topk(top_k, dim=-1).indices


def random_weights(num_tokens: int, top_k: int, generator: torch.Generator) -> torch.Tensor:
    """[T, k] float32 routing weights that sum to one per token."""
    return torch.rand(num_tokens, top_k, generator=generator).add(0.1).softmax(-1)


@pytest.fixture
def gen(request) -> torch.Generator:
    """A generator seeded from the test's id: different inputs per case, reproducible."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


def skip_if_unsupported(backend: str, dtype: torch.dtype) -> None:
    """The Triton interpreter multiplies bf16 bit patterns in tl.dot: bf16 GEMMs are GPU-tested."""
    if backend == "triton" and dtype == torch.bfloat16 and not HAS_CUDA:
        pytest.skip("the Triton interpreter cannot do a bf16 tl.dot; tests marked gpu cover it")
