"""The CPU matrix products of the numba backend's large groups, and the library that runs them.

torch's CPU float32 matmul calls MKL, whose sgemm runs AVX2 code at best on x86 processors
that are not Intel's: on one with AVX-512 oneDNN, the library torch already uses for bfloat16,
runs the same products about twice as fast; on one without, MKL is the faster of the two for
all but very wide outputs (docs/cpu.md, "Which library multiplies"). oneDNN's float32 inner
product is reached through mkldnn::_linear_pointwise, the op torch.compile's CPU freezing path
emits; it reads any strides of the activations, and of the weights contiguous or transposed
ones (other weights are copied). MOE_DISPATCH_CPU_MATMUL picks the library: "auto" (oneDNN on
x86-64 when torch has it, less the products BLAS computes faster there), "onednn" or "blas".
"""

from __future__ import annotations

import functools
import os
import platform
from typing import Optional

import torch

Tensor = torch.Tensor

LIBRARIES = ("auto", "onednn", "blas")


@functools.cache
def onednn_available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether this torch runs oneDNN's inner product in dtype, plain and on packed weights, on
    this processor (the ops are internal: tried once rather than trusted by name; bfloat16
    needs AVX-512, which many laptops' processors lack)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        one = torch.ones(1, 1, dtype=dtype)
        onednn_linear(one, one)
        onednn_linear(one, torch.ops.mkldnn._reorder_linear_weight(one))
    except (AttributeError, RuntimeError, TypeError):
        return False
    return True


@functools.cache
def _onednn_float32(choice: str) -> bool:
    if choice not in LIBRARIES:
        raise ValueError(f"MOE_DISPATCH_CPU_MATMUL must be one of {', '.join(LIBRARIES)}; got {choice!r}")
    if choice == "blas":
        return False
    if choice == "onednn" and not onednn_available():
        raise ValueError("MOE_DISPATCH_CPU_MATMUL=onednn, but this torch has no oneDNN linear op")
    return choice == "onednn" or onednn_available() and platform.machine().lower() in ("x86_64", "amd64")


def _library_setting() -> str:
    return os.environ.get("MOE_DISPATCH_CPU_MATMUL", "auto")


def onednn_float32() -> bool:
    """Whether float32 products (and float16 ones, computed in float32) go to oneDNN."""
    return _onednn_float32(_library_setting())


# Below this many FLOPs a product gains less from oneDNN's faster loops than its call costs over
# BLAS's, through the op and the copy out (docs/cpu.md, "Which library multiplies").
ONEDNN_MIN_FLOPS = 8e6


def onednn_serves(flops: float) -> bool:
    """Whether a float32 product of this many FLOPs goes to oneDNN."""
    return flops > 0 and flops >= ONEDNN_MIN_FLOPS and onednn_float32()


def onednn_linear(a: Tensor, w: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """a @ w.T (+ bias) by oneDNN's inner product, as nn.Linear computes it; any strides."""
    return torch.ops.mkldnn._linear_pointwise(a, w, bias, "none", [], "")


def matmul_into(out: Optional[Tensor], a: Tensor, b: Tensor, bias: Optional[Tensor],
                packed: Optional[Tensor] = None) -> Tensor:
    """out = a @ b (+ bias, broadcast), returned; any strides; packed: b.T in oneDNN's blocked
    layout (formats/onednn.py), read in b's place. out None: the product in a new tensor of a's
    dtype, the one the library returns where it makes one (no copy into a buffer). float16 is
    computed in float32 (computes_in_float32), and so is bfloat16 where oneDNN has no bfloat16
    inner product (no AVX-512)."""
    if packed is not None:
        return _stored(out, onednn_linear(a, packed, None if bias is None else
                                          bias.to(a.dtype).expand(b.shape[1]).contiguous()), a.dtype)
    widened = computes_in_float32(a.dtype)
    # oneDNN's product comes out in new memory, copied into out; where BLAS multiplies float32
    # as fast, it writes out itself (a weight gradient's [1024, 1024] per expert: 0.71 ms
    # against 1.15)
    if (a.dtype == torch.float32 or widened) and onednn_serves(2 * a.shape[0] * a.shape[1] * b.shape[1]) \
            and not blas_faster(b.shape[1]) and not (out is not None and a.dtype == torch.float32 and blas_as_fast()):
        a32, w32 = a.float(), b.float().T
        if not (w32.is_contiguous() or w32.T.is_contiguous()):
            w32 = w32.contiguous()  # oneDNN's reference kernel, 1000x slower, takes other strides
        bias32 = None if bias is None else bias.float().expand(b.shape[1]).contiguous()
        return _stored(out, onednn_linear(a32, w32, bias32), a.dtype)
    if widened:
        return _stored(out, torch.mm(a.float(), b.float()) if bias is None else
                       torch.addmm(bias.float(), a.float(), b.float()), a.dtype)
    if bias is None:
        return torch.mm(a, b, out=out)
    return torch.addmm(bias.to(a.dtype), a, b, out=out)


def computes_in_float32(dtype: torch.dtype) -> bool:
    """Whether products of this 16-bit dtype go through float32: float16 always, since torch's
    CPU float16 matmul is many times slower than float32 with the conversions counted and
    oneDNN has no float16 inner product without AVX512-FP16 (docs/cpu.md, "float16 and BLAS");
    bfloat16 where oneDNN has no bfloat16 one (no AVX-512), as torch's own bfloat16 matmul
    then ran 100x slower than through float32 ([64, 1024] x [1024, 1024]: 141 ms against
    1.3, on two AVX2 cores)."""
    return dtype == torch.float16 or dtype == torch.bfloat16 and not onednn_available(torch.bfloat16)


def _stored(out: Optional[Tensor], product: Tensor, dtype: torch.dtype) -> Tensor:
    """product copied into out, or as it is (in dtype) where there is no out."""
    return product.to(dtype) if out is None else out.copy_(product)


@functools.cache
def blas_is_mkl_on_intel() -> bool:
    """Whether torch's BLAS is MKL on an Intel processor, where its float32 products run as fast
    as oneDNN's (within 20% either way, measured on a Xeon with AVX-512)."""
    if not torch.backends.mkl.is_available():
        return False
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("vendor_id") and "GenuineIntel" in line for line in f)
    except OSError:
        return "intel" in platform.processor().lower()


@functools.cache
def _grouped_mm_on_cpu() -> bool:
    """Whether this torch has a CPU torch._grouped_mm (one C++ loop of BLAS calls)."""
    try:
        torch._grouped_mm(torch.ones(4, 4), torch.ones(1, 4, 4), offs=torch.tensor([4], dtype=torch.int32))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False
    return True


def _grouped_mm_layout(t: Tensor) -> bool:
    """Whether torch._grouped_mm accepts t's layout: its check_valid_strides_and_return_transposed
    (aten/src/ATen/native/GroupedMMUtils.h), in its order. One of the two innermost dims has unit
    stride and the other a stride that spans it and is a multiple of 16 bytes; the batch stride
    is free. A unit stride does not pass by itself: a.T of a [R, 1] activation has strides
    (1, 1), which takes the first branch and fails there (1 is no multiple of 16 bytes). The
    data 16-byte aligned too: torch 2.13 no longer asks it on CPUs, older versions do."""
    *_, rows, cols = t.shape
    *_, row_stride, col_stride = t.stride()
    aligned = 16 // t.element_size()
    if row_stride == 1 and col_stride >= max(1, rows):
        outer = col_stride
    elif col_stride == 1 and row_stride >= max(1, cols):
        outer = row_stride
    else:
        return False
    return outer % aligned == 0 and t.data_ptr() % 16 == 0


def blas_as_fast() -> bool:
    """Whether BLAS computes float32 products as fast as oneDNN here and no library was named
    (MOE_DISPATCH_CPU_MATMUL): MKL on Intel."""
    return _library_setting() == "auto" and blas_is_mkl_on_intel()


@functools.cache
def mkl_without_avx512() -> bool:
    """Whether torch's BLAS is MKL on an x86 processor without AVX-512, where MKL runs its AVX2
    code whatever the vendor: the same instructions as oneDNN's, in better tuned loops."""
    return (torch.backends.mkl.is_available() and platform.machine().lower() in ("x86_64", "amd64")
            and "AVX512" not in torch.backends.cpu.get_cpu_capability())


# Output columns up to which MKL's AVX2 float32 products beat oneDNN's. One thread of an AVX2
# EPYC, 16-512 rows: K and N of 512-7168 1.05-1.4x (the weight gradients' too), N = 8192 even,
# N = 10240-14336 (a large expert's gate and up rows) 0.7-0.9x.
BLAS_MAX_COLUMNS = 8192


def blas_faster(columns: int) -> bool:
    """Whether BLAS computes a float32 product of this many output columns faster than oneDNN
    here and no library was named (MOE_DISPATCH_CPU_MATMUL): MKL without AVX-512, outputs of
    up to BLAS_MAX_COLUMNS."""
    return _library_setting() == "auto" and columns <= BLAS_MAX_COLUMNS and mkl_without_avx512()


def takes_grouped_mm(group_flops: float, *operands: Tensor) -> bool:
    """Whether torch._grouped_mm serves these operands, whose groups average group_flops: one
    call in place of a Python loop whose few microseconds per expert are a fifth of a small
    layer's backward (H=64, E=16). Its CPU version takes float32 and bfloat16 in the layouts of
    _grouped_mm_layout; bfloat16 where it is not computed in float32 here (computes_in_float32);
    float32 where BLAS would compute it anyway (torch._grouped_mm calls BLAS, not oneDNN) or,
    unless MOE_DISPATCH_CPU_MATMUL names a library, computes it as fast (MKL on Intel)."""
    dtypes = [torch.float32] if not onednn_serves(group_flops) or blas_as_fast() else []
    if not computes_in_float32(torch.bfloat16):
        dtypes.append(torch.bfloat16)
    return all(t.dtype in dtypes and _grouped_mm_layout(t) for t in operands) and _grouped_mm_on_cpu()
