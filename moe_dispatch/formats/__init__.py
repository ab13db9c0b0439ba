"""How expert weights are stored: plain float tensors, or a declared storage format.

An expert weight is [E, N, K] (K the input dim, nn.Linear layout). A plain float tensor of the
activations' dtype is the "dense" format. Any other storage is a StoredWeight subclass in a
module of its own in this package: it says what it holds, checks itself against the
activations it meets, gives its dense values (a view where it keeps them, else dequantized),
and flattens to tensors so that the custom ops (torch.compile) can carry it. A backend that
reads a format natively asks isinstance; every other one reads dense(w).
"""

from __future__ import annotations

from typing import ClassVar, Union

import torch

Tensor = torch.Tensor
DENSE = "dense"


class StoredWeight:
    """An expert weight [E, N, K] in a storage format of its own (subclasses register by `format`)."""

    format: ClassVar[str]
    # Whether a gradient reaches the weight: its dense values are one of its flatten() tensors.
    trainable: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "format" in cls.__dict__:  # a family's base class names none
            FORMATS[cls.format] = cls

    @property
    def shape(self) -> torch.Size:
        """(E, N, K)."""
        raise NotImplementedError

    @property
    def dtype(self) -> torch.dtype:
        """The float dtype of the activations this weight multiplies."""
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        """The bytes this storage holds."""
        raise NotImplementedError

    def dense(self) -> Tensor:
        """The [E, N, K] values as a float tensor of `dtype`."""
        raise NotImplementedError

    def check(self, name: str, x: Tensor) -> None:
        """Raise TypeError/ValueError naming `name` unless this weight can multiply the activations x."""
        raise NotImplementedError

    def flatten(self) -> tuple[list[Tensor], str]:
        """(the tensors this storage holds, a string without "|" of whatever else rebuilds it)."""
        raise NotImplementedError

    @classmethod
    def unflatten(cls, tensors: list[Tensor], meta: str) -> "StoredWeight":
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device})"


FORMATS: dict[str, type[StoredWeight]] = {}
Weight = Union[Tensor, StoredWeight]


def format_of(w: Weight) -> str:
    return w.format if isinstance(w, StoredWeight) else DENSE


def trainable(w: Weight) -> bool:
    """Whether a gradient can reach w (a plain tensor, or a storage of its dense values)."""
    return not isinstance(w, StoredWeight) or w.trainable


def dense(w: Weight) -> Tensor:
    """w's [E, N, K] values as a float tensor."""
    return w.dense() if isinstance(w, StoredWeight) else w


def flatten(w: Weight) -> tuple[list[Tensor], str]:
    """(tensors, spec) that unflatten turns back into w."""
    if isinstance(w, StoredWeight):
        tensors, meta = w.flatten()
        return tensors, f"{w.format}:{meta}"
    return [w], DENSE


def unflatten(tensors: list[Tensor], spec: str) -> Weight:
    if spec == DENSE:
        return tensors[0]
    name, _, meta = spec.partition(":")
    return FORMATS[name].unflatten(tensors, meta)


__all__ = ["StoredWeight", "Weight", "FORMATS", "DENSE", "format_of", "trainable", "dense", "flatten", "unflatten"]
