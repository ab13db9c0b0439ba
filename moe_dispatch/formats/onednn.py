"""Expert weights kept in oneDNN's blocked layout as well, for inference on the CPU.

oneDNN multiplies in a blocked weight layout and reorders a plain weight into it on every
call, a sixth of the product at 64 rows per expert (docs/cpu.md, "Packed weights"). A weight
declared OneDNNPacked(w) has each expert packed once, on its first use by the numba
backend's blocked path (the library products of larger batches), and reused while w stays
as it was. MOE_DISPATCH_PACK_WEIGHTS=1 treats every plain bfloat16 or float32 weight of a call
that wants no gradient for it as declared so.

The price is memory: a packed copy of every expert served, as large as the weights, since
the decode path and the backward read the plain weights, which stay. Where the register
tiles serve the experts (AVX512-BF16 without AMX) they read the plain weight, faster, and no
copy is made. The copies live as long as the weight they were made from and are made again
after it changes in place (an optimizer step, load_state_dict) or takes new storage. A
change through `w.data` escapes the version counter: call clear_packed_weights() after one.
"""

from __future__ import annotations

import os
import weakref
from typing import Optional

import torch

from .. import validation as check
from ..backends.cpu_matmul import blas_faster, onednn_available, onednn_float32
from . import StoredWeight, Weight

Tensor = torch.Tensor

_SETTING = "MOE_DISPATCH_PACK_WEIGHTS"


class OneDNNPacked(StoredWeight):
    """weight [E, N, K] bfloat16 or float32 on the CPU, with each expert also packed for oneDNN.

    Holds `weight` itself (no copy); the packed copies are shared by every OneDNNPacked of the
    same weight. Gradients, when asked for, flow to `weight`.
    """

    format = "onednn"

    def __init__(self, weight: Tensor):
        check.floating("weight", weight, ndim=3)
        if weight.device.type != "cpu" or weight.dtype not in (torch.bfloat16, torch.float32):
            raise ValueError(f"OneDNNPacked holds bfloat16 or float32 CPU weights; got {weight.dtype} on "
                             f"{weight.device}")
        if not onednn_available(weight.dtype):
            raise ValueError(f"OneDNNPacked needs oneDNN's {weight.dtype} linear op, which this build of torch "
                             "or this processor does not run")
        self.weight = weight

    @property
    def shape(self) -> torch.Size:
        return self.weight.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.weight.device

    @property
    def nbytes(self) -> int:
        return 2 * self.weight.nbytes  # the plain weight and its packed copy

    def dense(self) -> Tensor:
        return self.weight

    def check(self, name: str, x: Tensor) -> None:
        check.same_dtype(name, self.weight, "x", x)
        check.same_device(name, self.weight, "x", x)

    def flatten(self) -> tuple[list[Tensor], str]:
        return [self.weight], ""

    @classmethod
    def unflatten(cls, tensors: list[Tensor], meta: str) -> "OneDNNPacked":
        return cls(tensors[0])


class PackedExperts:
    """The packed [N, K] weight of each expert of a w [E, N, K], made on first use."""

    def __init__(self, w: Tensor):
        self._version, self._data_ptr = _version(w), w.data_ptr()
        self._packed: list[Optional[Tensor]] = [None] * w.shape[0]

    def current(self, w: Tensor) -> bool:
        """Whether these copies still hold w's values."""
        return _version(w) == self._version and w.data_ptr() == self._data_ptr

    def expert(self, w: Tensor, e: int) -> Tensor:
        """Expert e's packed weight; w is the tensor these copies are current for."""
        packed = self._packed[e]
        if packed is None:
            packed = self._packed[e] = torch.ops.mkldnn._reorder_linear_weight(w[e].detach().contiguous())
        return packed


def _version(w: Tensor) -> Optional[int]:
    # tensors made under torch.inference_mode have no version counter: their storage alone tells
    return None if w.is_inference() else w._version


# Keyed by the id of the tensor that owns the storage (a view's base): callers pass fresh
# views of a parameter on every call, and the parameter outlives them. Each entry goes with
# its owner.
_CACHE: dict[tuple, PackedExperts] = {}


def _copies(w: Tensor) -> PackedExperts:
    owner = w._base if w._base is not None else w
    key = (id(owner), w.storage_offset(), tuple(w.shape), w.stride(), w.dtype)
    entry = _CACHE.get(key)
    if entry is None or not entry.current(w):
        if entry is None:
            weakref.finalize(owner, _CACHE.pop, key, None)
        entry = _CACHE[key] = PackedExperts(w)
    return entry


def packing_enabled() -> bool:
    value = os.environ.get(_SETTING, "0")
    if value not in ("0", "1"):
        raise ValueError(f"{_SETTING} must be 0 or 1; got {value!r}")
    return value == "1"


def packed_experts(w: Weight, saving_for_backward: bool) -> Optional[PackedExperts]:
    """The packed copies of w's experts the blocked path reads, or None where it reads w itself:
    w declared OneDNNPacked, or with MOE_DISPATCH_PACK_WEIGHTS=1 a plain bfloat16 weight (or
    float32 where oneDNN computes its products) made outside inference mode; never for a weight
    whose gradient this call computes (trained weights change every step)."""
    if isinstance(w, OneDNNPacked):
        w = w.weight
    elif not (isinstance(w, Tensor) and packing_enabled() and onednn_available(w.dtype) and not w.is_inference()
              and (w.dtype == torch.bfloat16
                   or w.dtype == torch.float32 and onednn_float32() and not blas_faster(w.shape[1]))):
        return None
    if saving_for_backward and w.requires_grad or not w.numel():
        return None
    return _copies(w)


def clear_packed_weights() -> None:
    """Drop every packed copy (after changing weights in a way their version counter does
    not see, such as through w.data)."""
    _CACHE.clear()
