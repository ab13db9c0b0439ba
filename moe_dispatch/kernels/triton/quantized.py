"""Quantized weight tiles as the Triton kernels read them (formats/quantized.py, docs/formats.md).

A kernel's weight operand W [E, K, N] is a float tensor, or a quantized weight q [E, N, K]
read as one: q.mT (Q_T: W[e, k, n] = q[e, n, k], the forward products) or q itself
(W[e, k, n] = q[e, k, n], the products of the inputs' gradients). Each K-step loads the tile's
packed codes and its blocks' scales, and multiplies them out in registers, in float32 then
rounded once to the activations' dtype (dequantize's definition), right before tl.dot: only the
active experts' bytes are read, and no dense copy is made.

Every format decodes from its bytes with integer operations and float32 arithmetic, so no GPU
generation lacks an instruction for one: e2m1 codes and e8m0 scales need none anywhere, and fp8
e4m3 goes through the GPU's float8 conversion only where it has one (sm_89 and newer,
FP8_NATIVE), and is rebuilt from its bits elsewhere (sm_80/86, the interpreter). None takes an
int-to-float conversion either (I2F: 16 results a clock per SM, against 128 float adds): a
small integer becomes a float by moving it into a float's mantissa (_plus_2_23), a minifloat
by moving its fields into float32's (_minifloat).

A w8a8 product (fp8 weights, activations quantized by fp8_rows.py) multiplies the codes of both
operands as they are (fp8_operand) and scales each K-step's partial product instead.

The scales' block columns are a power of two (or span all of K), so that a tile aligned to its
own width holds whole blocks or lies inside one: its scales load as [rows, blocks] and spread
over the columns, instead of one gather per element.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from ...formats.quantized import QuantizedWeight, Transposed

FLOAT = tl.constexpr(0)
INT8 = tl.constexpr(1)
INT4 = tl.constexpr(2)
FP8 = tl.constexpr(3)
MXFP4 = tl.constexpr(4)
FP8_NATIVE = tl.constexpr(5)  # fp8 through the float8e4nv type (sm_89+)
FORMAT_CODES = {"int8": 1, "int4": 2, "fp8": 3, "mxfp4": 4}
# 2^-127, the value of e8m0's byte 0: a float32 subnormal, which no exponent field makes
E8M0_ZERO_BYTE = tl.constexpr(2.0 ** -127)
TWO_23 = tl.constexpr(2.0 ** 23)


@triton.jit
def _plus_2_23(code):
    """float32 2^23 + code for an int32 code in [0, 2^23): the code as the mantissa of 2^23,
    exact."""
    return (code | 0x4B000000).to(tl.float32, bitcast=True)


@triton.jit
def _minifloat(code, EXPONENT_BITS: tl.constexpr, MANTISSA_BITS: tl.constexpr, BIAS: tl.constexpr):
    """float32 value of each sign-exponent-mantissa code (the sign bit on top, exponent 0
    subnormal; e4m3fn's NaN is the caller's). Its fields moved into float32's make the value
    times 2^(BIAS - 127), exact (a subnormal float32 where the code is one), and one multiply
    by a power of two gives the value (float32 multiplies keep subnormals: no .ftz)."""
    SIGN: tl.constexpr = EXPONENT_BITS + MANTISSA_BITS
    bits = ((code & ((1 << SIGN) - 1)) << (23 - MANTISSA_BITS)) | ((code >> SIGN) << 31)
    return bits.to(tl.float32, bitcast=True) * (2.0 ** (127 - BIAS))


@triton.jit
def code_values(code, FORMAT: tl.constexpr):
    """float32 value of each int32 code (a byte, or a nibble for mxfp4) before its block's
    scale; int4's are the caller's (dequantized_tile: the zero point goes with the 2^23)."""
    if FORMAT == INT8:
        value = _plus_2_23(code ^ 128) - (TWO_23 + 128.0)  # two's complement
    elif FORMAT == FP8:
        # e4m3fn: S.1111.111 is NaN, and there is no infinity
        value = tl.where((code & 127) == 127, float("nan"), _minifloat(code, 4, 3, 7))
    elif FORMAT == FP8_NATIVE:
        value = code.to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float32)
    else:
        value = _minifloat(code, 2, 1, 1)  # e2m1: 0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives
    return value


@triton.jit
def fp8_operand(code, FORMAT: tl.constexpr, UPCAST: tl.constexpr):
    """A tile of uint8 e4m3 codes as tl.dot multiplies it, unscaled: float8e4nv where the GPU
    has the type (FORMAT FP8_NATIVE), else the values rebuilt from the bits, exact in float16
    (float32 under the interpreter, UPCAST)."""
    if FORMAT == FP8_NATIVE:
        operand = code.to(tl.float8e4nv, bitcast=True)
    elif UPCAST:
        operand = code_values(code.to(tl.int32), FP8)
    else:
        operand = code_values(code.to(tl.int32), FP8).to(tl.float16)
    return operand


@triton.jit
def _block_values(ptr, block_rows, row_ok, col0, col_end, stride_sr,
                  BLOCK_COLS: tl.constexpr, SCALE_COLS: tl.constexpr):
    """[R, G] of one expert's per-block tensor (scales or zero points) for the tile of columns
    col0 : col0 + BLOCK_COLS (col0 a multiple of BLOCK_COLS): G = 1 when the tile lies in one
    block (SCALE_COLS 0: a block spans K), else its BLOCK_COLS // SCALE_COLS blocks."""
    row_off = block_rows.to(tl.int64)[:, None] * stride_sr
    if SCALE_COLS == 0:
        values = tl.load(ptr + row_off, mask=row_ok[:, None], other=0)
    elif SCALE_COLS >= BLOCK_COLS:
        values = tl.load(ptr + row_off + col0 // SCALE_COLS, mask=row_ok[:, None], other=0)
    else:
        blocks = col0 // SCALE_COLS + tl.arange(0, BLOCK_COLS // SCALE_COLS)
        in_range = (blocks * SCALE_COLS < col_end)[None, :]
        values = tl.load(ptr + row_off + blocks[None, :], mask=row_ok[:, None] & in_range, other=0)
    return values


@triton.jit
def _spread(groups, BLOCK_COLS: tl.constexpr):
    """[R, G] per-block values -> what multiplies an [R, BLOCK_COLS] tile: [R, 1] as it is
    when G = 1, else each block's value repeated over its BLOCK_COLS // G columns."""
    if groups.shape[1] == 1:
        spread = groups
    else:
        spread = tl.reshape(tl.broadcast_to(groups[:, :, None], (groups.shape[0], groups.shape[1],
                                                                  BLOCK_COLS // groups.shape[1])),
                            (groups.shape[0], BLOCK_COLS))
    return spread


@triton.jit
def dequantized_tile(
    codes_ptr,  # one expert's codes [N, K or K/2] uint8
    scales_ptr, zeros_ptr, scale_off,  # scales and zero points (or None) of all experts; this one's offset in them
    rows, row_ok,  # [R] rows of q to read (any indices)
    col0, col_end,  # columns col0 + arange(BLOCK_COLS), col0 a multiple of BLOCK_COLS; those >= col_end read 0
    stride_cr, stride_sr,  # row strides of the codes (bytes) and of the scales and zero points
    DTYPE: tl.constexpr, BLOCK_COLS: tl.constexpr,
    FORMAT: tl.constexpr, SCALE_ROWS: tl.constexpr, SCALE_COLS: tl.constexpr, EVEN_COLS: tl.constexpr,
):
    """[R, BLOCK_COLS] DTYPE: q[rows, col0 : col0 + BLOCK_COLS] of one expert, dequantized.
    EVEN_COLS: the tile lies before col_end, so the loads need no column mask (which would keep
    them from vectorizing along the codes' contiguous columns)."""
    cols = col0 + tl.arange(0, BLOCK_COLS)
    if EVEN_COLS:
        mask = row_ok[:, None]
    else:
        mask = row_ok[:, None] & (cols < col_end)[None, :]
    code_rows = codes_ptr + rows.to(tl.int64)[:, None] * stride_cr
    if (FORMAT == INT4) or (FORMAT == MXFP4):
        # two codes a byte, the even column low: a contiguous load of half the width, then
        # the nibbles interleaved (K is even for these formats)
        pairs = col0 // 2 + tl.arange(0, BLOCK_COLS // 2)
        if EVEN_COLS:
            pair_mask = row_ok[:, None]
        else:
            # against col_end // 2, not 2 * pairs against col_end: the compiler then sees the
            # mask constant over runs of bytes (col_end a multiple of 16) and loads them whole
            pair_mask = row_ok[:, None] & (pairs < col_end // 2)[None, :]
        # a byte past col_end reads as two codes of value 0: 0x88 for int4 without zero points
        filler = 0x88 if (FORMAT == INT4) and (zeros_ptr is None) else 0
        packed = tl.load(code_rows + pairs[None, :], mask=pair_mask, other=filler).to(tl.int32)
        code = tl.interleave(packed & 15, packed >> 4)
    else:
        code = tl.load(code_rows + cols[None, :], mask=mask, other=0).to(tl.int32)
    block_rows = rows // SCALE_ROWS
    if FORMAT == INT4:
        # (2^23 + code) - (2^23 + zero point): exact, one subtraction
        if zeros_ptr is not None:
            zero = _block_values(zeros_ptr + scale_off, block_rows, row_ok, col0, col_end, stride_sr, BLOCK_COLS,
                                 SCALE_COLS)
            value = _plus_2_23(code) - _spread(zero.to(tl.float32) + TWO_23, BLOCK_COLS)
        else:
            value = _plus_2_23(code) - (TWO_23 + 8.0)  # symmetric
    else:
        value = code_values(code, FORMAT)
    scale = _block_values(scales_ptr + scale_off, block_rows, row_ok, col0, col_end, stride_sr, BLOCK_COLS, SCALE_COLS)
    if FORMAT == MXFP4:
        exponent = scale.to(tl.int32)
        scale = tl.where(exponent == 0, E8M0_ZERO_BYTE, (exponent << 23).to(tl.float32, bitcast=True))
    if (zeros_ptr is not None) and not EVEN_COLS:
        # a column past col_end reads a code of value 0 (and a masked row scale 0), but with
        # zero points there is no such code
        value = tl.where(mask, value, 0.0)
    return (value * _spread(scale, BLOCK_COLS)).to(DTYPE)


@triton.jit
def weight_tile(
    w_ptr,  # one expert's W (float), or its codes
    w_scales_ptr, w_zeros_ptr, scale_off,  # a quantized W's scales and zero points, this expert's offset in them
    ks, k_ok, cols, col_ok,  # the tile's K indices (k0 + arange(BLOCK_K)), N indices, and where they are in range
    k0, k_end, n0, n_end,  # ks < k_end; a quantized W not Q_T also needs cols = n0 + arange(BLOCK_N), < n_end
    stride_wk, stride_wn, stride_sr,
    DTYPE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_K: tl.constexpr,
    W_FORMAT: tl.constexpr, SCALE_ROWS: tl.constexpr, SCALE_COLS: tl.constexpr, Q_T: tl.constexpr,
):
    """[BLOCK_K, BLOCK_N] W[ks, cols] of one expert, 0 where masked: a float W's own values
    (stride_wk, stride_wn any), a quantized one's dequantized to DTYPE (q's row stride:
    stride_wn when Q_T, else stride_wk). EVEN_K: the K-block is full (no K mask)."""
    if W_FORMAT == FLOAT:
        w = tl.load(w_ptr + ks.to(tl.int64)[:, None] * stride_wk + cols.to(tl.int64)[None, :] * stride_wn,
                    mask=k_ok[:, None] & col_ok[None, :], other=0.0)
    elif Q_T:
        w = tl.trans(dequantized_tile(w_ptr, w_scales_ptr, w_zeros_ptr, scale_off, cols, col_ok, k0, k_end,
                                      stride_wn, stride_sr, DTYPE, BLOCK_K, W_FORMAT, SCALE_ROWS, SCALE_COLS, EVEN_K))
    else:
        w = dequantized_tile(w_ptr, w_scales_ptr, w_zeros_ptr, scale_off, ks, k_ok, n0, n_end, stride_wk, stride_sr,
                             DTYPE, BLOCK_N, W_FORMAT, SCALE_ROWS, SCALE_COLS, False)
    return w


# ---- launchers' side: a weight operand as kernel arguments --------------------------------------


class WeightOperand(NamedTuple):
    """The W operand [E, K, N] of a kernel, as its arguments: data (a float W, or uint8 codes),
    scales and zeros (None for a float W), W's strides (a quantized W's in bytes along q's
    rows: its other axis is the codes' contiguous one), the scales' expert and row strides
    (the zero points share them), and the constexprs meta."""

    data: torch.Tensor
    scales: Optional[torch.Tensor]
    zeros: Optional[torch.Tensor]
    shape: torch.Size
    stride_e: int
    stride_k: int
    stride_n: int
    stride_se: int
    stride_sr: int
    meta: dict

    @property
    def strides(self) -> tuple[int, int, int, int, int]:
        """(stride_we, stride_wk, stride_wn, stride_wse, stride_wsr), in the kernels' order."""
        return self.stride_e, self.stride_k, self.stride_n, self.stride_se, self.stride_sr


def kernel_reads(w: QuantizedWeight) -> bool:
    """Whether the kernels read w's codes: blocks of 1 or a power of two of rows, and of a
    power of two of columns or all of K (every format's own blocks; a weight built with other
    blocks is dequantized instead)."""
    rows, columns = w.block
    return w.format in FORMAT_CODES and not rows & (rows - 1) and (not columns & (columns - 1) or columns >= w.shape[2])


def native_fp8(device: torch.device) -> bool:
    """Whether the GPU converts float8 e4m3 itself (sm_89 and newer)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def weight_operand(w) -> WeightOperand:
    """w: a float tensor [E, K, N] (any strides), or a quantized weight read as one: q.mT
    (Transposed) or q itself (kernel_reads(q))."""
    if isinstance(w, torch.Tensor):
        return WeightOperand(w, None, None, w.shape, *w.stride(), 0, 0,
                             dict(W_FORMAT=0, SCALE_ROWS=1, SCALE_COLS=0, Q_T=False))
    q_t = isinstance(w, Transposed)
    q = w.weight if q_t else w
    rows, columns = q.block
    codes = q.codes.view(torch.uint8)
    code = FP8_NATIVE.value if q.format == "fp8" and native_fp8(q.device) else FORMAT_CODES[q.format]
    meta = dict(W_FORMAT=code, SCALE_ROWS=rows, SCALE_COLS=0 if columns >= q.shape[2] else columns,
                Q_T=q_t)
    stride_k, stride_n = (1, codes.stride(1)) if q_t else (codes.stride(1), 1)
    return WeightOperand(codes, q.scales, q.zeros, w.shape, codes.stride(0), stride_k, stride_n, q.scales.stride(0),
                         q.scales.stride(1), meta)


def format_tag(w) -> str:
    """The weight's format as the tuning keys name it: "" for float weights, else the format and
    its block (the best tiles differ with how much decoding a tile takes)."""
    q = w.weight if isinstance(w, Transposed) else w
    if not isinstance(q, QuantizedWeight):
        return ""
    return f"{q.format}-{q.block[0]}x{q.block[1]}{'z' if q.zeros is not None else ''}"
