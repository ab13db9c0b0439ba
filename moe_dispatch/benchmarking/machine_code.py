"""The Triton kernels compiled for a GPU architecture without a GPU, by the ptxas and cuobjdump
that ship with Triton, and what their machine code says: what the compile check
(tests/test_triton_compile.py) asserts and what benchmarks/kernel_loops.py prints, the
instruction mix of a main loop being the one measure of a kernel's cost a machine without a GPU
can take. Run outside the interpreter (TRITON_INTERPRET unset): a kernel under it has no
parameters to compile."""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")

# arguments real launches pass as constants: K-contiguous weights, no TMA descriptor, gate
# columns one after another, float weights (no scales: W_FORMAT 0)
FIXED = {"stride_wk": 1, "stride_ak": 1, "w_desc": None, "gate_step": 1, "w_scales_ptr": None,
         "w_zeros_ptr": None, "W_FORMAT": 0, "SCALE_ROWS": 1, "SCALE_COLS": 0, "Q_T": False,
         "a_scales_ptr": None, "stride_asm": 1}
# every kernel's pointer parameters, typed as a bf16 layer's launches pass them
BF16_POINTERS = dict(
    {name: "*bf16" for name in ("a_ptr", "w_ptr", "bias_ptr", "out_ptr", "h_ptr", "dy_ptr", "dh_ptr", "act_ptr",
                                "b_ptr", "x_ptr")},
    a_rows_ptr="*i32", offsets_ptr="*i32", slot_of_row_ptr="*i32", token_of_row_ptr="*i32", b_rows_ptr="*i32",
    weight_of_row_ptr="*fp32", ws_ptr="*fp32", drow_ptr="*fp32", a_scale_ptr="*fp32", ids_ptr="*i64", ok_ptr="*i1",
    weights_ptr="*fp32", owner_ptr="*i32", route_weights_ptr="*fp32",
)

# each format in its checkpoints' blocks: (SCALE_ROWS, SCALE_COLS, the scales' pointer type):
# int8 per output channel, int4 in groups of 128, fp8 in 128x128 blocks, mxfp4 in groups of 32
QUANTIZED_FORMATS = {"int8": (1, 0, "*fp32"), "int4": (1, 128, "*fp32"), "fp8": (128, 128, "*fp32"),
                     "mxfp4": (1, 32, "*u8")}


def quantized_weight(fmt: str, arch: int) -> tuple[dict, dict]:
    """(constants, pointer types) of a kernel reading fmt's codes on sm_<arch>, fp8 through the
    float8 type where the GPU has it (sm_89 and newer), without zero points."""
    from ..kernels.triton.quantized import FORMAT_CODES, FP8_NATIVE

    scale_rows, scale_cols, scale_type = QUANTIZED_FORMATS[fmt]
    code = FP8_NATIVE.value if fmt == "fp8" and arch >= 89 else FORMAT_CODES[fmt]
    return (dict(W_FORMAT=code, SCALE_ROWS=scale_rows, SCALE_COLS=scale_cols, w_zeros_ptr=None),
            dict(w_ptr="*u8", w_scales_ptr=scale_type))


@dataclass
class MachineCode:
    shared: int  # bytes of shared memory
    registers: int  # a thread's
    stack: int  # bytes of stack frame (spilled registers)
    loop_spills: int  # local-memory accesses inside a loop
    loop_converts: int  # int-to-float conversions (I2F, 16 a clock per SM on sm_90) inside a loop
    mma: str  # the matrix instruction: HGMMA, QGMMA, HMMA, QMMA or none
    tma: bool  # weight tiles come through the TMA
    ahead: int  # the most cp.async groups a loop leaves in flight while it computes (0: turns)
    flushes: bool  # a float32 product flushes subnormals to zero (.ftz)
    loop_ops: Counter  # the largest loop's instructions by opcode, one warp's pass

    def summary(self) -> tuple:
        """What the compile check compares, as JSON can carry it."""
        return (self.shared, self.stack, self.loop_spills, self.loop_converts, self.mma, self.tma, self.ahead,
                self.flushes)


def compile_kernel(fn, arch: int, pointers: dict, constants: dict, num_warps: int, num_stages: int):
    """fn compiled for sm_<arch>: a parameter in constants is a constant (None: a pointer the
    launch leaves out), one in FIXED too unless pointers names it; the others take the type
    pointers gives (i32 where none), ints divisible by 16, as Triton specializes real launches."""
    signature, constexprs = {}, {}
    for i, p in enumerate(fn.params):
        if p.is_constexpr or p.name in constants or (p.name in FIXED and p.name not in pointers):
            signature[p.name] = "constexpr"
            constexprs[(i,)] = constants[p.name] if p.name in constants else FIXED.get(p.name, 1)
        else:
            signature[p.name] = pointers.get(p.name, "i32")
    attrs = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(fn.params) if signature[p.name] != "constexpr"}
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


def _cuobjdump(option: str, cubin: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([CUOBJDUMP, option, f.name], capture_output=True, text=True, check=True).stdout


def machine_code(kernel) -> MachineCode:
    """kernel (compile_kernel's) read from its PTX, resource usage and SASS."""
    usage = _cuobjdump("-res-usage", kernel.asm["cubin"])
    sass = _cuobjdump("-sass", kernel.asm["cubin"])
    ptx = kernel.asm["ptx"]
    code = [(int(m.group(1), 16), line) for line in sass.splitlines() if (m := re.search(r"/\*([0-9a-f]+)\*/", line))]
    # a loop: from a backward branch's target to the branch
    loops = [(int(m.group(1), 16), at) for at, line in code
             if (m := re.search(r"\bBRA\s+0x([0-9a-f]+)", line)) and int(m.group(1), 16) < at]
    in_loop = [line for at, line in code if any(lo <= at <= hi for lo, hi in loops)]
    largest = max(loops, key=lambda loop: loop[1] - loop[0], default=(1, 0))  # (1, 0): no loop, no ops
    loop_ops = Counter(m.group(1) for at, line in code if largest[0] <= at <= largest[1]
                       if (m := re.search(r"\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line)))
    return MachineCode(
        shared=kernel.metadata.shared,
        registers=int(re.search(r"REG:(\d+)", usage).group(1)),
        stack=int(re.search(r"STACK:(\d+)", usage).group(1)),
        loop_spills=sum(1 for line in in_loop if re.search(r"\b(STL|LDL)\b", line)),
        # I2F of an integer (not I2F.RP, the reciprocal of an integer division)
        loop_converts=sum(1 for line in in_loop if re.search(r"\bI2F(\.[SU](8|16|32|64))?\s", line)),
        mma=next((op for op in ("HGMMA", "QGMMA", "HMMA", "QMMA") if re.search(rf"\b{op}\.", sass)), "none"),
        tma=re.search(r"\bUTMALDG\b", sass) is not None,
        ahead=max(map(int, re.findall(r"cp\.async\.wait_group\s+(\d+)", ptx)), default=0),
        flushes=re.search(r"\b(mul|fma)(\.rn)?\.ftz\.f32\b", ptx) is not None,
        loop_ops=loop_ops,
    )
