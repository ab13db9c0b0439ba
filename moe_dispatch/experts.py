"""ExpertWeights: the experts of an MoE layer, declared once, as every backend receives them."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Hashable, Iterable, Optional, TypeVar, Union

import torch

from . import activations, formats
from . import validation as check
from .activations import Activation
from .formats import StoredWeight, Weight
from .formats.quantized import QuantizedWeight, w8a8

Tensor = torch.Tensor
Derived = TypeVar("Derived")


def stamp(tensors: Iterable[Optional[Tensor]]) -> Optional[tuple]:
    """What changes when one of these tensors changes: its storage, shape, type or (through
    its version counter) any write in place. None where a write would go unseen: an inference
    tensor counts no versions."""
    marks = []
    for t in tensors:
        if t is None:
            marks.append(None)
        elif t.is_inference():
            return None
        else:
            marks.append((id(t), t.data_ptr(), t.dtype, t.shape, t.stride(), t._version))
    return tuple(marks)


def kept(store: dict, slot: Hashable, mark: Optional[tuple], make: Callable[[], Derived]) -> Derived:
    """What store holds at slot if it was made under mark, else make(), kept there under mark
    (never where mark is None: a change that would go unseen)."""
    entry = store.get(slot)
    if mark is None or entry is None or entry[0] != mark:
        entry = (mark, make())
        if mark is not None:
            store[slot] = entry
    return entry[1]


@dataclass(frozen=True)
class ExpertWeights:
    """The weights of E expert MLPs, expert(v) = w_down[e] @ act(w_gate_up[e] @ v + b_gate_up[e]) + b_down[e].

    w_gate_up: [E, 2I, H] for a gated activation (gate rows, then up rows; alternating when
               interleaved, as gpt-oss stores them), [E, I, H] otherwise;
    w_down:    [E, H, I];
    b_gate_up: [E, 2I] or [E, I], laid out as w_gate_up's rows; b_down: [E, H];
    activation: a name in activations.ACTIVATIONS, or an entry of it.
    A weight is a float tensor (any strides: nn.Linear storage transposed is read in place) or
    a declared storage format (moe_dispatch.formats, e.g. OneDNNPacked).
    """

    w_gate_up: Weight
    w_down: Weight
    b_gate_up: Optional[Tensor] = None
    b_down: Optional[Tensor] = None
    activation: Union[str, Activation] = "swiglu"
    interleaved: bool = False

    def __post_init__(self):
        object.__setattr__(self, "activation", activations.get(self.activation))
        check.expert_weights(self)
        # the tensors that hold the experts (fixed, as the fields are): what derived watches
        gate_up, gate_up_spec = formats.flatten(self.w_gate_up)
        down, down_spec = formats.flatten(self.w_down)
        biases = [b for b in (self.b_gate_up, self.b_down) if b is not None]
        object.__setattr__(self, "_held", (*gate_up, *down, *biases))
        # flatten's spec, as fixed as the fields (every call of moe_mlp asks for it)
        object.__setattr__(self, "_spec", "|".join([
            self.activation.name, str(int(self.interleaved)), str(len(gate_up)), gate_up_spec, down_spec,
            str(int(self.b_gate_up is not None)), str(int(self.b_down is not None))]))
        object.__setattr__(self, "_derived", {})

    def __getstate__(self) -> dict:  # a copy starts with nothing derived
        return {name: value for name, value in self.__dict__.items() if name != "_derived"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _derived={})

    def derived(self, key: Hashable, make: Callable[[], Derived]) -> Derived:
        """make(), kept under key while these experts' tensors stay as they are (stamp): what a
        backend derives from them (the arrays its kernels read, a bias widened to float32) once,
        not on every call, where a decode step's Python costs as much as its kernels."""
        return kept(self._derived, key, stamp(self._held), make)

    @property
    def num_experts(self) -> int:
        return self.w_gate_up.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.w_gate_up.shape[2]

    @property
    def intermediate_size(self) -> int:
        return self.w_down.shape[2]

    @property
    def quantizes_activations(self) -> bool:
        """Whether a weight multiplies its activations quantized (precision "w8a8")."""
        return w8a8(self.w_gate_up) or w8a8(self.w_down)

    @property
    def gate_up_columns(self) -> tuple[int, int]:
        """Where the gate and up columns of h = x @ w_gate_up.T lie (activations.gate_up_columns)."""
        return activations.gate_up_columns(self.activation, self.interleaved, self.intermediate_size)

    def tensors(self) -> tuple[Optional[Tensor], ...]:
        """(w_gate_up, w_down, b_gate_up, b_down) as float tensors: a storage's dense values
        (dequantized, for a quantized format)."""
        return formats.dense(self.w_gate_up), formats.dense(self.w_down), self.b_gate_up, self.b_down

    def grad_targets(self) -> tuple[Optional[Tensor], ...]:
        """tensors() where a gradient can reach them, None elsewhere (absent biases, frozen
        quantized weights), without dequantizing anything."""
        return (*(formats.dense(w) if formats.trainable(w) else None for w in (self.w_gate_up, self.w_down)),
                self.b_gate_up, self.b_down)

    def gate_then_up(self) -> "ExpertWeights":
        """These experts with gate rows first, then up rows (MoE's layout): interleaved rows
        (gpt-oss) are reordered, a copy of w_gate_up's codes or values and of b_gate_up."""
        if not self.interleaved:
            return self
        width = self.w_gate_up.shape[1]
        order = torch.cat([torch.arange(0, width, 2), torch.arange(1, width, 2)]).to(self.w_gate_up.device)
        b_gate_up = None if self.b_gate_up is None else self.b_gate_up[:, order]
        return replace(self, w_gate_up=_take_rows(self.w_gate_up, order), b_gate_up=b_gate_up, interleaved=False)

    def dense(self) -> "ExpertWeights":
        """These experts with every weight as a plain float tensor."""
        if not isinstance(self.w_gate_up, StoredWeight) and not isinstance(self.w_down, StoredWeight):
            return self
        return replace(self, w_gate_up=formats.dense(self.w_gate_up), w_down=formats.dense(self.w_down))

    # ---- as the custom ops carry them: a list of tensors and a string ----------------------

    def flatten(self) -> tuple[list[Tensor], str]:
        """(tensors, spec): the weights' tensors, then the biases present; unflatten inverts it."""
        return list(self._held), self._spec

    def flat_grads(self, grads) -> list[Optional[Tensor]]:
        """A gradient for each tensor of flatten(), in its order, from grads (an ExpertGrads): a
        weight's gradient for the tensor that holds its dense values, each bias's own, and None
        for what no gradient reaches (a storage's packed or quantized data)."""
        flat: list[Optional[Tensor]] = []
        for w, grad in ((self.w_gate_up, grads.w_gate_up), (self.w_down, grads.w_down)):
            values = formats.dense(w) if formats.trainable(w) else None
            flat += [grad if t is values else None for t in formats.flatten(w)[0]]
        return flat + [g for b, g in ((self.b_gate_up, grads.b_gate_up), (self.b_down, grads.b_down)) if b is not None]

    @classmethod
    def unflatten(cls, tensors: list[Tensor], spec: str) -> "ExpertWeights":
        activation, interleaved, num_gate_up, gate_up_spec, down_spec, has_b_gate_up, has_b_down = spec.split("|")
        num_gate_up, has_b_gate_up, has_b_down = int(num_gate_up), has_b_gate_up == "1", has_b_down == "1"
        num_weights = len(tensors) - has_b_gate_up - has_b_down
        biases = iter(tensors[num_weights:])
        return cls(
            formats.unflatten(tensors[:num_gate_up], gate_up_spec),
            formats.unflatten(tensors[num_gate_up:num_weights], down_spec),
            next(biases) if has_b_gate_up else None, next(biases) if has_b_down else None,
            activation, interleaved == "1",
        )


def _take_rows(w: Weight, order: Tensor) -> Weight:
    """w's rows (dim 1) in `order`; a quantized weight's codes, scales and zero points alike,
    which needs one scale per row (every format but fp8's 128-row blocks)."""
    if isinstance(w, QuantizedWeight):
        if w.block[0] != 1:
            raise ValueError(f"w_gate_up is {w.format} with blocks of {w.block[0]} rows: its interleaved gate and up "
                             f"rows share scales and cannot be reordered")
        zeros = None if w.zeros is None else w.zeros[:, order]
        return type(w)(w.codes[:, order], w.scales[:, order], w.block, zeros=zeros, dtype=w.dtype,
                       precision=w.precision)
    return formats.dense(w)[:, order]
