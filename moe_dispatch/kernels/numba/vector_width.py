"""The vector width of the kernels' loops.

Numba compiles for the host CPU, and for most x86 CPUs with AVX-512 LLVM's tuning prefers
256-bit vectors when it vectorizes a loop (against the clock drop that 512-bit instructions
caused on early AVX-512 parts), so each instruction of an auto-vectorized float32 loop
multiplies 8 lanes where the CPU has 16. A kernel that calls wide_vectors() has its loops
vectorized with the widest vectors the CPU has: the fused float32 expert MLP ran 1.26x (H=I=256)
to 1.33x (H=I=512) faster so on a Xeon with AMX. CPUs without AVX-512 and other architectures
are unaffected.

LLVM decides per function: call it in every function whose loops should take wide vectors, in
the body of each prange loop (Numba compiles that body as a function of its own), not in the
functions inlined into them (inline="always"), which become part of the caller.
"""

from __future__ import annotations

from numba import types
from numba.core.registry import cpu_target
from numba.extending import intrinsic, overload


def host_cpu_features() -> str:
    """The features of the CPU Numba compiles for, as LLVM names them: "+avx2,+avx512f,..."."""
    return cpu_target.target_context.codegen()._get_host_cpu_features()


def widest_vector_bytes() -> int:
    """The bytes of the CPU's widest float vector: AVX-512's 64, else 32 (AVX2's; on Arm, two
    NEON registers, which LLVM pairs)."""
    return 64 if "+avx512f" in host_cpu_features() else 32


def wide_vectors() -> None:
    """Ask LLVM to vectorize the calling function's loops with the CPU's widest vectors (jit
    only; nothing in plain Python)."""


@intrinsic
def _prefer_wide_vectors(typingctx):
    def codegen(context, builder, signature, args):
        # A string attribute, which llvmlite's attribute set (a set that admits enum attributes
        # only) prints as given. A hint: a llvmlite that keeps its attributes otherwise gets none.
        attributes = builder.function.attributes
        if isinstance(attributes, set):
            set.add(attributes, '"prefer-vector-width"="512"')
        return context.get_dummy_value()

    return types.void(), codegen


@overload(wide_vectors, inline="always")
def _wide_vectors():
    return lambda: _prefer_wide_vectors()
