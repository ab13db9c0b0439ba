"""What only the numba backend has to get right around its kernels: 16-bit conversions bit for
bit, thread counts and threading layers, every kernel compiled with bounds checking, and an
on-disk compile cache that a damaged file cannot break."""

import ast
import importlib
import importlib.util
import inspect
import pkgutil
import re
import sys
import threading
import types
from unittest import mock

import numpy as np
import pytest
import torch

from conftest import (HAS_NUMBA, NUMBA_UNAVAILABLE, expert_weights, random_ids, random_weights, run_python,
                      subprocess_env)
from moe_dispatch import moe_mlp

if not HAS_NUMBA:
    pytest.skip(f"numba backend unavailable: {NUMBA_UNAVAILABLE}", allow_module_level=True)

import numba  # noqa: E402
from numba.core.caching import NullCache  # noqa: E402
from numba.core.registry import cpu_target  # noqa: E402

import moe_dispatch.backends.numba_backend as nb  # noqa: E402
from moe_dispatch.kernels.numba.scalars import narrow, widen  # noqa: E402

JIT = not numba.config.DISABLE_JIT


# ---- 16-bit conversions ------------------------------------------------------------------


def bits_view(t):
    return nb.as_array(t)


def conversion_inputs(count):
    """float32 values that stress rounding: every 16-bit pattern's neighbours, ties, specials."""
    patterns = torch.arange(0, 65536, max(1, 65536 // count), dtype=torch.int32)
    as_bf16 = (patterns << 16).view(torch.float32)
    ties = ((patterns << 16) | 0x8000).view(torch.float32)  # exactly halfway for bfloat16
    near = as_bf16 * (1 + 2.0**-12)
    specials = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 65504.0, 65520.0, 6e-8, 1e-40])
    return torch.cat([as_bf16, ties, near, specials])


@numba.njit
def _round_trip(values, out16, back32):
    for i in range(values.shape[0]):
        out16[i] = narrow(values[i], out16.dtype)
        back32[i] = widen(out16[i])


def check_conversions(dtype, count):
    values = conversion_inputs(count)
    expected = values.to(dtype)
    out16 = torch.empty_like(expected)
    back = torch.empty_like(values)
    _round_trip(values.numpy(), bits_view(out16), back.numpy())
    nan = expected.isnan()
    assert torch.equal(out16.isnan(), nan)
    assert torch.equal(out16.view(torch.int16)[~nan], expected.view(torch.int16)[~nan])
    assert torch.equal(back.isnan(), nan)
    assert torch.equal(back[~nan], expected.float()[~nan])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_16_bit_conversions_match_torch_bit_for_bit(dtype):
    check_conversions(dtype, 65536)


@pytest.mark.nojit
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_nojit_16_bit_conversions(dtype):
    check_conversions(dtype, 512)


# ---- vector width ------------------------------------------------------------------------


@pytest.mark.skipif(not JIT, reason="LLVM compiles only under the JIT")
def test_wide_vectors_reach_llvm_in_the_calling_function_and_a_prange_body():
    from moe_dispatch.kernels.numba.vector_width import wide_vectors

    @numba.njit(fastmath=True)
    def dot(a, b):
        wide_vectors()
        total = np.float32(0.0)
        for k in range(a.shape[0]):
            total += a[k] * b[k]
        return total

    @numba.njit(parallel=True)
    def rows_scaled(a, out):
        for r in numba.prange(a.shape[0]):
            wide_vectors()
            for k in range(a.shape[1]):
                out[r, k] = 2 * a[r, k]

    a = np.arange(64, dtype=np.float32)
    assert dot(a, a) == np.dot(a, a)
    out = np.empty((3, 64), dtype=np.float32)
    rows_scaled(np.stack([a] * 3), out)
    assert (out == 2 * a).all()
    attribute = '"prefer-vector-width"="512"'
    (ir,) = dot.inspect_llvm().values()
    assert attribute in ir
    # the prange body, compiled as a function of its own into a library the caller links, holds it too
    linked = rows_scaled.overloads[rows_scaled.signatures[0]].library._linking_libraries
    assert any("parfor" in library.name and attribute in library.get_llvm_str() for library in linked)
    if "+avx512f" in cpu_target.target_context.codegen()._get_host_cpu_features():
        (asm,) = dot.inspect_asm().values()
        assert re.search(r"vfmadd\w*ps\s[^\n]*%zmm", asm), "no 512-bit multiply-adds"


def test_wide_vectors_is_nothing_in_plain_python():
    from moe_dispatch.kernels.numba.vector_width import wide_vectors

    assert wide_vectors() is None


# ---- threads -----------------------------------------------------------------------------


def tiny_call(gen):
    E = 4
    ids = random_ids(3, 2, E, gen)
    w_gate_up, w_down, _, _ = expert_weights(E, 8, 4, gen)
    moe_mlp(torch.randn(3, 8, generator=gen), random_weights(3, 2, gen), ids, w_gate_up, w_down, backend="numba")


@pytest.mark.skipif(not JIT or numba.config.NUMBA_NUM_THREADS < 2, reason="needs two Numba threads")
def test_threads_follow_torch(gen, monkeypatch):
    monkeypatch.delenv("NUMBA_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    try:
        for wanted in (1, 2):
            torch.set_num_threads(wanted)
            tiny_call(gen)
            assert numba.get_num_threads() == wanted
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(not JIT or numba.config.NUMBA_NUM_THREADS < 2, reason="needs two Numba threads")
def test_numba_num_threads_env_wins(gen, monkeypatch):
    monkeypatch.setenv("NUMBA_NUM_THREADS", "2")
    before = (torch.get_num_threads(), numba.get_num_threads())
    try:
        numba.set_num_threads(1)
        torch.set_num_threads(2)
        tiny_call(gen)
        assert numba.get_num_threads() == 1
    finally:
        torch.set_num_threads(before[0])
        numba.set_num_threads(before[1])


@pytest.mark.skipif(not JIT, reason="threading layers exist only under the JIT")
@pytest.mark.parametrize("layer", ["workqueue", "omp"])
def test_threading_layer_kept_and_concurrent_callers(layer):
    """The user's threading layer stands, the first launch leaves torch's thread count alone
    (Numba's OpenMP layer resets it), and calls from several Python threads work: on
    workqueue they take turns (it aborts the process on a concurrent launch)."""
    if layer == "omp" and importlib.util.find_spec("numba.np.ufunc.omppool") is None:
        pytest.skip("this Numba build has no OpenMP layer")
    code = """
        import threading, numba, torch
        from moe_dispatch import moe_mlp
        E = 4
        w_gate_up, w_down = torch.randn(E, 8, 16), torch.randn(E, 16, 4)
        torch.set_num_threads(1)
        x = torch.randn(64, 16)
        moe_mlp(x, torch.rand(64, 2), torch.rand(64, E).topk(2, -1).indices, w_gate_up, w_down, backend="numba")
        print(torch.get_num_threads())
        def work():
            for _ in range(20):
                x = torch.randn(64, 16)
                ids = torch.rand(64, E).topk(2, -1).indices
                moe_mlp(x, torch.rand(64, 2), ids, w_gate_up, w_down, backend="numba")
        threads = [threading.Thread(target=work) for _ in range(3)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        print(numba.threading_layer())
    """
    assert run_python(code, subprocess_env(NUMBA_THREADING_LAYER=layer)).split() == ["1", layer]


# ---- bounds checking ---------------------------------------------------------------------


# Unoptimized (NUMBA_OPT=0): the checks are Numba's, made before LLVM optimizes, and the
# kernels compile in 0.6x the time. Each in a fresh cache, so nothing compiled without the checks
# is reused, and started with the session (conftest.py, early_python): minutes of compiling.
BOUNDS_CHECKED = {"NUMBA_BOUNDSCHECK": "1", "NUMBA_OPT": "0"}

EVERY_KERNEL = """
        import torch
        import moe_dispatch.backends.numba_backend as nb
        from conftest import assert_close
        from moe_dispatch import grouped_mm, make_plan, moe_mlp, permute, unpermute
        g = torch.Generator().manual_seed(0)
        E, T, k, H, I = 5, 13, 3, 12, 7
        ids = torch.rand(T, E, generator=g).topk(k, -1).indices

        def run(backend, x, weights, wgu, wd, bgu, bd):
            leaves = [t.detach().requires_grad_() for t in (x, weights, wgu, wd, bgu, bd)]
            x, weights, wgu, wd, bgu, bd = leaves
            out = moe_mlp(x, weights, ids, wgu, wd, b_gate_up=bgu, b_down=bd, backend=backend)
            grads = torch.autograd.grad(out.sum(), leaves)
            plan = make_plan(ids, E, backend=backend)
            xs = permute(x, plan, backend=backend)
            h = grouped_mm(xs, wgu.transpose(1, 2), plan.offsets, backend=backend)
            o = grouped_mm(h[:, :I].contiguous(), wd.transpose(1, 2).contiguous(), plan.offsets, backend=backend)
            return (out, unpermute(o, plan, weights, backend=backend), *grads)

        for small in (10**9, 0):
            nb.fused_rows_limit = lambda *_, small=small: small
            for dtype in (torch.float32, torch.bfloat16):
                inputs = (torch.randn(T, H, generator=g), torch.rand(T, k, generator=g).softmax(-1),
                          torch.randn(E, 2 * I, H, generator=g) / H**0.5, torch.randn(E, H, I, generator=g) / I**0.5,
                          torch.randn(E, 2 * I, generator=g), torch.randn(E, H, generator=g))
                inputs = [t.to(dtype) if i in (0, 2, 3) else t for i, t in enumerate(inputs)]
                got = run("numba", *inputs)
                want = run("torch", *[t.double() for t in inputs])
                # bfloat16 gradients round too many intermediates for the table's tolerance
                # (the torch backend's too): there the backward only has to run.
                checked = len(got) if dtype == torch.float32 else 2
                for a, b in zip(got[:checked], want[:checked]):
                    assert_close(a, b, dtype)
        print("ok")
"""


@pytest.mark.skipif(not JIT, reason="bounds checking is a JIT option")
@pytest.mark.early_python(EVERY_KERNEL, BOUNDS_CHECKED)
def test_kernels_under_boundscheck(early_python):
    """Every kernel, both moe_mlp paths and the backward, compiled with NUMBA_BOUNDSCHECK=1: an
    out-of-bounds access raises IndexError there instead of reading past an array."""
    assert early_python.split() == ["ok"]


QUANTIZED_KERNELS = """
        import torch
        import moe_dispatch as md
        import moe_dispatch.backends.numba_backend as nb
        from conftest import assert_close
        g = torch.Generator().manual_seed(0)
        E, k = 5, 3
        for fmt, options, H, I in (("int4", dict(group_size=32, symmetric=False), 64, 32), ("fp8", {}, 136, 19),
                                   ("mxfp4", {}, 64, 32)):
            q1 = md.quantize(torch.randn(E, 2 * I, H, generator=g) / H**0.5, fmt, **options)
            q2 = md.quantize(torch.randn(E, H, I, generator=g) / I**0.5, fmt, **options)
            for T, small in ((2, 10**9), (13, 10**9), (13, 0)):  # direct, buffered, blocked
                nb.fused_rows_limit = lambda *_, small=small: small
                ids = torch.rand(T, E, generator=g).topk(k, -1).indices
                x, weights = torch.randn(T, H, generator=g), torch.rand(T, k, generator=g).softmax(-1)
                want = md.moe_mlp(x.double(), weights.double(), ids, q1.dequantize(torch.float64),
                                  q2.dequantize(torch.float64), backend="torch")
                assert_close(md.moe_mlp(x, weights, ids, q1, q2, backend="numba"), want)
        print("ok")
"""


@pytest.mark.skipif(not JIT, reason="bounds checking is a JIT option")
@pytest.mark.early_python(QUANTIZED_KERNELS, BOUNDS_CHECKED)
def test_quantized_kernels_under_boundscheck(early_python):
    """The quantized kernels (formats with zero points, partial blocks and e8m0 scales; direct,
    buffered and blocked paths) compiled with NUMBA_BOUNDSCHECK=1."""
    assert early_python.split() == ["ok"]


def _constant_arguments(module) -> list[str]:
    """Calls in module's source to a kernel compiled on its own (not inlined) with a constant
    argument: Numba types a constant by its value, so each value compiles another copy."""
    from numba.core.dispatcher import Dispatcher

    names = vars(module)
    found = []
    for node in ast.walk(ast.parse(inspect.getsource(module))):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
            continue
        callee = names.get(node.func.id)
        if not isinstance(callee, Dispatcher) or callee.targetoptions.get("inline", "never") != "never":
            continue
        for arg in node.args + [keyword.value for keyword in node.keywords]:
            value = arg.operand if isinstance(arg, ast.UnaryOp) else arg
            if (isinstance(value, ast.Constant) and value.value is not None
                    or isinstance(value, ast.Name) and isinstance(names.get(value.id), (bool, int, float))):
                found.append(f"{module.__name__}:{node.lineno} {node.func.id}(... {ast.unparse(arg)} ...)")
    return found


def test_no_kernel_is_called_with_a_constant_argument():
    """A quantized decode step's first call compiled its dot kernel four times, once per set of
    constant arguments (about 8 s each): pass constants as np.int64(...) instead."""
    import moe_dispatch.kernels.numba as kernels

    modules = [importlib.import_module(f"{kernels.__name__}.{info.name}")
               for info in pkgutil.iter_modules(kernels.__path__)]
    assert len(modules) > 10
    assert [call for module in modules for call in _constant_arguments(module)] == []


def test_the_constant_argument_check_finds_one():
    module = types.ModuleType("sample")
    module.LIMIT = 4
    source = "def caller(x):\n    return kernel(x, 2) + kernel(x, -1) + kernel(x, LIMIT) + kernel(x, x)\n"
    exec(compile(source, "sample", "exec"), vars(module))
    module.kernel = numba.njit(lambda a, b: a + b)
    with mock.patch.object(inspect, "getsource", lambda _: source):
        assert sorted(call.split(" ", 1)[1] for call in _constant_arguments(module)) == [
            "kernel(... -1 ...)", "kernel(... 2 ...)", "kernel(... LIMIT ...)"]


# ---- the on-disk compile cache -------------------------------------------------------------


def _add_one(x):
    return x + 1


def _damage(cache_dir, kind):
    """What a killed process or a full disk leaves: an index cut short, or data that is not a
    pickle at all."""
    if kind == "truncated-index":
        for path in cache_dir.rglob("*.nbi"):
            path.write_bytes(path.read_bytes()[:10])
    else:
        for path in cache_dir.rglob("*.nbc"):
            path.write_bytes(b"garbage\n")


@pytest.mark.skipif(not JIT, reason="nothing is cached without the JIT")
@pytest.mark.parametrize("kind", ["truncated-index", "garbage-data"])
def test_a_damaged_compile_cache_is_a_miss_with_one_warning(kind, tmp_path, monkeypatch):
    """Each time a fresh dispatcher, as a new process has: the damaged cache compiles again with
    one warning, and what it saves is a good cache again."""
    from moe_dispatch.kernels.numba import caching

    monkeypatch.setattr(numba.config, "CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(caching, "_warned", set())
    assert caching.njit(cache=True)(_add_one)(1) == 2
    _damage(tmp_path, kind)
    healed = caching.njit(cache=True)(_add_one)
    with pytest.warns(RuntimeWarning, match="compile cache .* is damaged") as caught:
        assert healed(1) == 2
    assert len([w for w in caught if "compile cache" in str(w.message)]) == 1
    assert healed.stats.cache_misses
    again = caching.njit(cache=True)(_add_one)
    assert again(1) == 2 and again.stats.cache_hits and not again.stats.cache_misses


@pytest.mark.skipif(not JIT, reason="nothing is cached without the JIT")
def test_an_edit_to_any_kernel_module_recompiles_every_kernel(tmp_path, monkeypatch):
    """A kernel holds the code of what it calls from other modules: the cache is stale when any
    of them changes, not only its own file."""
    from moe_dispatch.kernels.numba import caching

    monkeypatch.setattr(numba.config, "CACHE_DIR", str(tmp_path))
    assert caching.njit(cache=True)(_add_one)(1) == 2
    stamp = caching._kernels_stamp()
    assert {"packed_dots.py", "quantized.py", "caching.py"} <= {name for name, _, _ in stamp}
    edited = tuple((name, mtime + (name == "packed_dots.py"), size) for name, mtime, size in stamp)
    monkeypatch.setattr(caching, "_kernels_stamp", lambda: edited)
    after_edit = caching.njit(cache=True)(_add_one)
    assert after_edit(1) == 2 and after_edit.stats.cache_misses and not after_edit.stats.cache_hits


def test_saves_at_once_into_one_cache_keep_each_signatures_code(tmp_path):
    """Two processes compiling two signatures of one kernel into one cache (as threads here, each
    with its own view of the files): the first save is held just after reading the index. Numba's
    own save let the second take the same data file, so one signature was lost or sent to the
    other's machine code; a save now waits for the one before it."""
    from moe_dispatch.kernels.numba import caching

    def cache_file():
        return caching._HealingCacheFile(str(tmp_path), "kernel", ("stamp",))

    first, second = cache_file(), cache_file()
    read, resume = threading.Event(), threading.Event()
    load_index = first._load_index

    def held_load_index():
        index = load_index()
        read.set()
        resume.wait(10)
        return index

    first._load_index = held_load_index
    saves = [threading.Thread(target=first.save, args=("float32", "code of float32")),
             threading.Thread(target=second.save, args=("bfloat16", "code of bfloat16"))]
    saves[0].start()
    assert read.wait(10)
    saves[1].start()
    saves[1].join(0.5)
    resume.set()
    for save in saves:
        save.join(10)
    assert [cache_file().load(key) for key in ("float32", "bfloat16")] == ["code of float32", "code of bfloat16"]


def test_every_cached_kernel_heals_its_cache():
    from numba.core.dispatcher import Dispatcher

    from moe_dispatch.kernels.numba import caching

    modules = [m for name, m in sys.modules.items() if name.startswith("moe_dispatch.kernels.numba.")]
    cached = [v for m in modules for v in vars(m).values()
              if isinstance(v, Dispatcher) and not isinstance(v._cache, NullCache)]
    assert len(cached) > 20 and all(isinstance(d._cache, caching._HealingCache) for d in cached)


@pytest.mark.skipif(not JIT, reason="nothing is cached without the JIT")
def test_make_plan_survives_a_truncated_cache_index(tmp_path):
    """The package end to end, in new processes: the second one finds the index of make_plan's
    kernel cut short, and compiles it again rather than failing every call."""
    code = """
        import warnings
        import torch
        import moe_dispatch as md
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            plan = md.make_plan(torch.tensor([[1, 0], [2, 1]]), 4, backend="numba")
        print(plan.counts.tolist(), sum("compile cache" in str(w.message) for w in caught))
    """
    env = subprocess_env(NUMBA_CACHE_DIR=str(tmp_path))
    assert run_python(code, env).split("]")[1].split() == ["0"]
    _damage(tmp_path, "truncated-index")
    assert run_python(code, env).strip() == "[1, 2, 1, 0] 1"
