"""Values that the class of a kernel's argument decides: constants in compiled code.

Where an argument is a NamedTuple with one subclass per variant (a weight format, an
activation), the variant is part of its Numba type, so each kernel compiles for the one
variant it is called with: there, the variant's value is a constant and the other variants'
branches fall away before LLVM optimizes them. Compiled with the variant as a field read at
run time, every kernel carried every variant's code (a quantized decode step's first call
took 2.5x as long, the backward's row kernel 5x).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from numba.extending import overload


def class_constants(table: dict[type, Any]) -> tuple[Callable[[Any], Any], Callable[[Any], Optional[Any]]]:
    """(value_of, value_of_type): value_of(x) is table[type(x)], a constant in compiled code;
    value_of_type(t) is the same for a Numba type t of one of the classes, None for another."""

    def value_of_type(numba_type) -> Optional[Any]:
        return table.get(getattr(numba_type, "instance_class", None))

    def value_of(x):
        return table[type(x)]

    @overload(value_of, inline="always")
    def _value_of(x):
        value = value_of_type(x)
        if value is None:
            return None
        return lambda x: value

    return value_of, value_of_type
