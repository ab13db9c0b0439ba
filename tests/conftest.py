"""Fixtures and helpers shared by every test file.

Every backend that can run on this machine's CPU joins the same tests through the `backend`
fixture; the Triton kernels run on the CPU under TRITON_INTERPRET=1 when there is no GPU.
MOE_DISPATCH_TEST_BACKENDS=torch,numba restricts the set. Backend-only sections of a shared
file carry `needs_numba` or `needs_triton`, so the rest of the file runs without that backend.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import zlib

import pytest
import torch

# Must be set before any Triton kernel is defined; a machine with a GPU runs them natively.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from moe_dispatch.activations import ACTIVATIONS  # noqa: E402
from moe_dispatch.backends import BACKEND_NAMES, unavailable_reason  # noqa: E402

CPU = torch.device("cpu")
HAS_CUDA = torch.cuda.is_available()
# Where the Triton-only tests run: the GPU, or the CPU under the interpreter.
TRITON_DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
TESTS = os.path.dirname(os.path.abspath(__file__))
REPOSITORY = os.path.dirname(TESTS)

# Error allowed against the float64 reference, by the inputs' dtype: (rtol, atol), for
# values of order one. fp16/bf16 round each stored intermediate (h, the activation, the
# expert outputs) once.
TOLERANCE = {
    torch.float64: (1e-9, 1e-9),
    torch.float32: (2e-4, 2e-4),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (4e-2, 4e-2),
}

FLOAT_DTYPES = [pytest.param(d, id=str(d).split(".")[1]) for d in (torch.float32, torch.float16, torch.bfloat16)]
# The numba tests' own order; their test ids name them dtype0, dtype1, dtype2.
NUMBA_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# bf16 tl.dot runs only on a GPU; float32 without TF32 has its own candidates (the FMA dot)
TUNED_DTYPES = [torch.bfloat16, torch.float32]


def _cpu_backends() -> list[str]:
    wanted = os.environ.get("MOE_DISPATCH_TEST_BACKENDS")
    names = wanted.split(",") if wanted else BACKEND_NAMES
    return [n for n in names if unavailable_reason(n, CPU) is None]


CPU_BACKENDS = _cpu_backends()

# The backend-only sections ignore MOE_DISPATCH_TEST_BACKENDS: they run wherever the backend can.
NUMBA_UNAVAILABLE = unavailable_reason("numba", CPU)
TRITON_UNAVAILABLE = unavailable_reason("triton", TRITON_DEVICE)
HAS_NUMBA = NUMBA_UNAVAILABLE is None
HAS_TRITON = TRITON_UNAVAILABLE is None
needs_numba = pytest.mark.skipif(not HAS_NUMBA, reason=f"numba backend unavailable: {NUMBA_UNAVAILABLE}")
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason=f"the triton backend cannot run here: {TRITON_UNAVAILABLE}")


@pytest.fixture(params=CPU_BACKENDS)
def backend(request) -> str:
    return request.param


@pytest.fixture
def gen(request) -> torch.Generator:
    """A generator seeded from the test's id: different inputs per case, reproducible."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


# ---- inputs ----------------------------------------------------------------------------------


def randn(*shape, gen: torch.Generator, dtype=torch.float32, scale=1.0, device=CPU) -> torch.Tensor:
    """Normal values times scale, drawn in float32 on the CPU (the same values on every device),
    then cast to dtype."""
    return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(device)


def expert_weights(experts, hidden, inter, gen, dtype=torch.float32, activation="swiglu", bias=False,
                   bias_scale=1.0, bias_dtype=None, device=CPU):
    """(w_gate_up [E, W, H], w_down [E, H, I], b_gate_up [E, W], b_down [E, H]), W = 2I for a
    gated activation; weights scaled for outputs of order one; the biases None unless asked for,
    of dtype unless bias_dtype says otherwise."""
    width = ACTIVATIONS[activation].width(inter)
    w_gate_up = randn(experts, width, hidden, gen=gen, dtype=dtype, scale=hidden**-0.5, device=device)
    w_down = randn(experts, hidden, inter, gen=gen, dtype=dtype, scale=inter**-0.5, device=device)
    if not bias:
        return w_gate_up, w_down, None, None
    biases = (randn(experts, n, gen=gen, dtype=bias_dtype or dtype, scale=bias_scale, device=device)
              for n in (width, hidden))
    return w_gate_up, w_down, *biases


def random_ids(num_tokens: int, top_k: int, num_experts: int, generator: torch.Generator) -> torch.Tensor:
    """[T, k] int64, k distinct experts per token, like a real router's top-k."""
    scores = torch.rand(num_tokens, num_experts, generator=generator)
    return scores.topk(top_k, dim=-1).indices


def random_weights(num_tokens: int, top_k: int, generator: torch.Generator) -> torch.Tensor:
    """[T, k] float32 routing weights that sum to one per token."""
    return torch.rand(num_tokens, top_k, generator=generator).add(0.1).softmax(-1)


# ---- checks ----------------------------------------------------------------------------------


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    """Compare a backend's result with the float64 reference under the dtype's tolerance."""
    rtol, atol = TOLERANCE[dtype or actual.dtype]
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), rtol=rtol, atol=atol)


def output_and_grads(fn, tensors):
    """fn(*tensors) and the gradients of each tensor (None stays None) for a fixed random dy."""
    tensors = [t.detach().clone().requires_grad_() if t is not None else None for t in tensors]
    out = fn(*tensors)
    if out.grad_fn is not None:  # the naive loop's empty batch is not connected to its inputs
        dy = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
        out.backward(dy.to(out.dtype))
    # an input that did not reach the output has a zero gradient
    return out, [None if t is None else t.grad if t.grad is not None else torch.zeros_like(t) for t in tensors]


def skip_if_unsupported(backend: str, dtype: torch.dtype) -> None:
    """The Triton interpreter multiplies bf16 bit patterns in tl.dot: bf16 GEMMs are GPU-tested."""
    if backend == "triton" and dtype == torch.bfloat16 and not HAS_CUDA:
        pytest.skip("the Triton interpreter cannot do a bf16 tl.dot; tests marked gpu cover it")


@pytest.fixture
def garbage_memory(monkeypatch):
    """torch.empty returns 77s: a kernel that leaves an output element unwritten shows."""
    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *args, **kwargs: empty(*args, **kwargs).fill_(77))


# ---- subprocesses ----------------------------------------------------------------------------


def subprocess_env(drop: str | None = None, **extra: str) -> dict:
    """This process's environment without `drop`, with `extra`, and with this checkout first on
    the path: otherwise a child imports whichever moe_dispatch is installed, maybe another tree's."""
    env = {k: v for k, v in os.environ.items() if k != drop}
    env["PYTHONPATH"] = os.pathsep.join([REPOSITORY, env.get("PYTHONPATH", "")])
    return {**env, **extra}


def start_python(code: str, env: dict) -> subprocess.Popen:
    """Start code in a fresh interpreter from the tests folder (so it can import conftest)."""
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=TESTS, env=env)


def python_output(child: subprocess.Popen, timeout: float = 600) -> str:
    """Wait for a start_python child; assert that it succeeded and return its stdout."""
    try:
        stdout, stderr = child.communicate(timeout=timeout)
    finally:
        child.kill()  # nothing, unless the wait timed out
    assert child.returncode == 0, stderr[-3000:]
    return stdout


def run_python(code: str, env: dict, timeout: float = 600) -> str:
    """Run code in a fresh interpreter from the tests folder; assert that it succeeded and
    return its stdout."""
    return python_output(start_python(code, env), timeout)


# ---- children started with the session ------------------------------------------------------
# A test marked early_python(code, env, drop=None) runs code in a child interpreter (this one's
# environment with env, without the variable drop) started as soon as the tests are collected,
# so that the child's minutes of compiling overlap the rest of the suite on the machine's other
# core; the test's early_python fixture waits for its stdout. The children run at the lowest
# priority, so that they take what the suite leaves idle rather than a share of its own core.
# Each gets an empty NUMBA_CACHE_DIR of its own, removed with the session.

_EARLY: dict = {}


def _skipped(item) -> bool:
    """Whether a skip mark, or a skipif mark whose condition is true (or a string, which pytest
    evaluates later), skips item."""
    return any(m.name == "skip" or m.name == "skipif" and (not m.args or m.args[0]) for m in item.iter_markers())


def _start_early(item) -> None:
    marker = item.get_closest_marker("early_python")
    code, env = marker.args
    cache = tempfile.mkdtemp(prefix="numba-cache-")
    env = subprocess_env(marker.kwargs.get("drop"), NUMBA_CACHE_DIR=cache, **env)
    _EARLY[item.nodeid] = (start_python("import os\nos.nice(19)\n" + textwrap.dedent(code), env), cache)


def pytest_addoption(parser):
    parser.addoption("--compile-report", action="store_true",
                     help="list the seconds each test and kernel spent compiling Numba kernels (compile_report.py)")


def pytest_configure(config):
    if config.getoption("--compile-report") and HAS_NUMBA:
        import compile_report

        compile_report.install(config)


def pytest_collection_modifyitems(items):
    # last, so that the suite waits for none of its children before its own work is done
    items.sort(key=lambda item: item.get_closest_marker("early_python") is not None)


# A run of many test files also starts tests/compile_ahead.py, which compiles the Numba kernels
# of the last files into the suite's own cache, at a priority between the suite's and the
# early_python children's: the suite needs its kernels within minutes, their tests run last.
COMPILE_AHEAD_FILES = 10
_COMPILING_AHEAD: list = []


def _compile_ahead(items) -> None:
    if not HAS_NUMBA or len({item.path for item in items}) < COMPILE_AHEAD_FILES:
        return
    import numba

    if not numba.config.DISABLE_JIT:
        code = "import os, runpy\nos.nice(15)\nrunpy.run_path('compile_ahead.py', run_name='__main__')"
        _COMPILING_AHEAD.append(subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL,
                                                 stderr=subprocess.DEVNULL, cwd=TESTS, env=subprocess_env()))


def pytest_collection_finish(session):
    _compile_ahead(session.items)
    for item in session.items:
        if item.get_closest_marker("early_python") is not None and not _skipped(item):
            _start_early(item)


def pytest_sessionfinish(session):
    for child in _COMPILING_AHEAD:
        child.kill()
        child.wait()
    for child, cache in _EARLY.values():
        child.kill()
        child.wait()
        shutil.rmtree(cache, ignore_errors=True)


@pytest.fixture
def early_python(request) -> str:
    """The stdout of the test's early_python child (which must succeed), started now if it was
    not started early."""
    if request.node.nodeid not in _EARLY:
        _start_early(request.node)
    child, _ = _EARLY[request.node.nodeid]
    return python_output(child, timeout=1800)


# ---- numba: which path runs ------------------------------------------------------------------


def count_decode_steps(monkeypatch, kernels: str = "mlp") -> list:
    """Record the name of each fused decode step the numba backend runs through its kernel
    module `kernels` ("mlp", or "quantized_kernels" for quantized experts), from a plan or from
    the ids; a step from the ids that declined (too many rows per expert) does not count. The
    backend's reference to the module is replaced by a proxy, so the compiled kernels keep
    calling each other as they are."""
    import moe_dispatch.backends.numba_backend as nb

    module, calls = getattr(nb, kernels), []

    class Spy:
        def __getattr__(self, name):
            kernel = getattr(module, name)
            if name not in ("moe_mlp_decode", "moe_mlp_decode_ids"):
                return kernel

            def call(*args):
                status = kernel(*args)
                if status != nb.mlp.NOT_DECODE:
                    calls.append(name)
                return status

            return call

    monkeypatch.setattr(nb, kernels, Spy())
    return calls


def small_groups_everywhere(monkeypatch):
    """Every expert counts as small: Numba kernels for all groups, decode for moe_mlp."""
    import moe_dispatch.backends.numba_backend as nb

    monkeypatch.setattr(nb, "fused_rows_limit", lambda *_: 10**9)


def large_groups_everywhere(monkeypatch):
    """Every expert with rows counts as large: BLAS for all groups, the blocked moe_mlp."""
    import moe_dispatch.backends.numba_backend as nb

    monkeypatch.setattr(nb, "fused_rows_limit", lambda *_: 0)
    monkeypatch.setattr(nb, "REGISTER_TILES_MAX_EXPERT_FLOPS", 0)
    monkeypatch.setattr(nb, "REGISTER_TILES_BELOW_FLOPS", 0)
    monkeypatch.setattr(nb, "BF16_REGISTER_TILES", False)
    monkeypatch.setattr(nb, "LARGE_FLOAT32_REGISTER_TILES", False)


def register_tiles_everywhere(monkeypatch):
    """float32, float64 and bfloat16 on register tiles wherever they can go: the expert MLP of
    experts of any size (bfloat16: of even H and I) and the products over weights with N
    contiguous (float32 and float64); the blocked moe_mlp for the other dtypes."""
    import moe_dispatch.backends.numba_backend as nb

    monkeypatch.setattr(nb, "fused_rows_limit", lambda *_: 0)
    monkeypatch.setattr(nb, "REGISTER_TILE_DTYPES", (torch.float32, torch.float64))  # AVX2 CPUs too
    monkeypatch.setattr(nb, "BF16_REGISTER_TILES", True)  # widened where no AVX512-BF16
    monkeypatch.setattr(nb, "REGISTER_TILES_MAX_EXPERT_FLOPS", float("inf"))
    monkeypatch.setattr(nb, "REGISTER_TILES_MAX_DEPTH", 10**9)
    monkeypatch.setattr(nb, "REGISTER_TILES_BELOW_FLOPS", float("inf"))


def skip_without_onednn(dtype: torch.dtype = torch.float32) -> None:
    """Skip where oneDNN's inner product does not run in dtype: a torch without the op, or
    bfloat16 on a processor without AVX-512."""
    import moe_dispatch.backends.cpu_matmul as cm

    if not cm.onednn_available(dtype):
        pytest.skip(f"oneDNN runs no {dtype} inner product with this torch on this processor")


@pytest.fixture(params=["onednn", "blas"])
def matmul_library(request, monkeypatch):
    """The library of the large groups' float32 and float16 products (cpu_matmul), for
    products of any size (the tests' are far below ONEDNN_MIN_FLOPS)."""
    import moe_dispatch.backends.cpu_matmul as cm

    if request.param == "onednn":
        skip_without_onednn()
    monkeypatch.setenv("MOE_DISPATCH_CPU_MATMUL", request.param)
    monkeypatch.setattr(cm, "ONEDNN_MIN_FLOPS", 0)
    return request.param


# ---- triton on a GPU -------------------------------------------------------------------------


@pytest.fixture
def pinned_configs(monkeypatch):
    """Default tile configs, no timing: keeps the GPU tests to one compile per kernel variant."""
    from moe_dispatch.backends.triton_tuning import AUTOTUNE_ENV

    monkeypatch.setenv(AUTOTUNE_ENV, "0")
    monkeypatch.delenv("MOE_DISPATCH_CHECKS", raising=False)


@pytest.fixture
def fma_float32():
    """float32 without TF32 (torch's default), whatever an earlier test set: the FMA dot."""
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    matmul.fp32_precision = "ieee"
    yield
    matmul.fp32_precision = before
