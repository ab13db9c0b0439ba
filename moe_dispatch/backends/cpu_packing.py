"""Expert weights kept in oneDNN's blocked layout, for inference on the CPU (opt-in).

oneDNN multiplies in a blocked weight layout and reorders a plain weight into it on every
call: at 64 rows per expert that reorder is a sixth of the product (bfloat16 T=512 on the
issue's shape: 26 ms for the layer, 22 with packed weights; float32 52 against 42). With
MOE_DISPATCH_PACK_WEIGHTS=1 the blocked path of a call that wants no gradient for the weights
packs each expert's weights once and reuses them while the weights stay as they were.

The price is memory: a packed copy of every expert served, as large as the weights.
Serving engines pay nothing for it because they replace the weights; here the decode path
and the backward read the plain weights, so both stay. A packed copy lives as long as the
weight tensor it was made from, and is made again after the weights change in place (an
optimizer step, load_state_dict) or take new storage. A change through `w.data` escapes
the version counter: call clear_packed_weights() after one.
"""

from __future__ import annotations

import os
import weakref
from typing import Optional

import torch

from .cpu_matmul import onednn_available, onednn_float32

Tensor = torch.Tensor

_SETTING = "MOE_DISPATCH_PACK_WEIGHTS"


def packing_enabled() -> bool:
    value = os.environ.get(_SETTING, "0")
    if value not in ("0", "1"):
        raise ValueError(f"{_SETTING} must be 0 or 1; got {value!r}")
    return value == "1"


class PackedExperts:
    """The packed [N, K] weight of each expert of a w [E, N, K], made on first use."""

    def __init__(self, w: Tensor):
        self._version, self._data_ptr = w._version, w.data_ptr()
        self._packed: list[Optional[Tensor]] = [None] * w.shape[0]

    def current(self, w: Tensor) -> bool:
        """Whether these copies still hold w's values (a change made through w.data escapes
        the version counter: clear_packed_weights() then)."""
        return w._version == self._version and w.data_ptr() == self._data_ptr

    def expert(self, w: Tensor, e: int) -> Tensor:
        """Expert e's packed weight; w is the tensor these copies are current for."""
        packed = self._packed[e]
        if packed is None:
            packed = self._packed[e] = torch.ops.mkldnn._reorder_linear_weight(w[e].detach().contiguous())
        return packed


# Keyed by the id of the tensor that owns the storage (a view's base): callers pass fresh
# views of a parameter on every call, and the parameter outlives them. Each entry goes with
# its owner.
_CACHE: dict[tuple, PackedExperts] = {}


def packed_experts(w: Tensor, saving_for_backward: bool) -> Optional[PackedExperts]:
    """Packed copies of w [E, N, K]'s experts when packing applies to this call: enabled, no
    gradient wanted for w (weights trained change every step), bfloat16 (or float32 where
    oneDNN computes it); None otherwise."""
    if not packing_enabled() or saving_for_backward and w.requires_grad or not onednn_available():
        return None
    if not (w.dtype == torch.bfloat16 or w.dtype == torch.float32 and onednn_float32()) or not w.numel():
        return None
    if w.is_inference():  # made under torch.inference_mode: no version counter to watch
        return None
    owner = w._base if w._base is not None else w
    key = (id(owner), w.storage_offset(), tuple(w.shape), w.stride(), w.dtype)
    entry = _CACHE.get(key)
    if entry is None or not entry.current(w):
        if entry is None:
            weakref.finalize(owner, _CACHE.pop, key, None)
        entry = _CACHE[key] = PackedExperts(w)
    return entry


def clear_packed_weights() -> None:
    """Drop every packed copy (after changing weights in a way their version counter does
    not see, such as through w.data)."""
    _CACHE.clear()
