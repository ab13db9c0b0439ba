"""Activations quantized per row per 128 columns to e4m3, as w8a8 weights multiply them
(formats.quantized.fp8_activations is the definition): each group's scale is its largest
magnitude / 448 (1 for an all-zero group), each element x / scale rounded to the nearest e4m3
value, ties to even.

Once per GEMM, before it: the grouped GEMM then reads one byte per activation, and quantizing
inside it would repeat the work for every N-tile. The codes are built from the float32 bits
with integer operations, so that every GPU generation (sm_80/86 have no float8 conversion) and
the interpreter give the reference's bytes; the divisions round as IEEE's (div_rn), not as the
GPU's fast division.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ...formats.quantized import ACTIVATION_GROUP as GROUP

E4M3_MAX = tl.constexpr(448.0)
BLOCK_R = 16


@triton.jit
def e4m3_codes(x):
    """int32 e4m3fn code of each float32 x with |x| <= 448, rounded to nearest even."""
    bits = x.to(tl.int32, bitcast=True)
    sign = (bits >> 24) & 128
    exponent = (bits >> 23) & 255
    significand = (bits & 0x7FFFFF) | 0x800000
    # significand bits below e4m3's last one: 20 for its normal values (exponent 2^-6 and up,
    # biased 121), more for its subnormals; 26 rounds all of a 24-bit significand away (zero)
    drop = tl.minimum(20 + tl.maximum(121 - exponent, 0), 26)
    kept = (significand + (1 << (drop - 1)) - 1 + ((significand >> drop) & 1)) >> drop
    # a normal value keeps 8 + its mantissa (16 when it rounds up to the next exponent, which
    # the addition carries into the exponent field); a subnormal its mantissa
    magnitude = (tl.maximum(exponent - 121, 0) << 3) + kept
    return tl.where(x == x, sign | magnitude, 127)  # NaN stays NaN


@triton.jit
def quantize_rows_kernel(
    x_ptr,  # [R, K] float, columns contiguous
    codes_ptr,  # [R, K] uint8 out: e4m3fn codes
    scales_ptr,  # [R, cdiv(K, GROUP)] float32 out
    num_rows, K, stride_xm, stride_cm, stride_sm,
    BLOCK_R: tl.constexpr, GROUP: tl.constexpr,
):
    """Grid: (cdiv(R, BLOCK_R), cdiv(K, GROUP)): one group of columns of BLOCK_R rows a program."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    group = tl.program_id(1)
    cols = group * GROUP + tl.arange(0, GROUP)
    row_ok = rows < num_rows
    mask = row_ok[:, None] & (cols < K)[None, :]
    rows64 = rows.to(tl.int64)
    x = tl.load(x_ptr + rows64[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), axis=1)
    scale = tl.where(amax > 0, tl.math.div_rn(amax, E4M3_MAX), 1.0)
    scaled = tl.clamp(tl.math.div_rn(x, scale[:, None]), -E4M3_MAX, E4M3_MAX)
    tl.store(codes_ptr + rows64[:, None] * stride_cm + cols[None, :], e4m3_codes(scaled).to(tl.uint8), mask=mask)
    tl.store(scales_ptr + rows64 * stride_sm + group, scale, mask=row_ok)


class Fp8Rows(NamedTuple):
    """Activations [R, K] as w8a8 multiplies them: codes [R, K] uint8 (e4m3fn), scales
    [R, cdiv(K, 128)] float32, and dtype, the activations' own (what the GEMM writes)."""

    codes: torch.Tensor
    scales: torch.Tensor
    dtype: torch.dtype

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    @property
    def device(self) -> torch.device:
        return self.codes.device


def quantize_rows(x: torch.Tensor) -> Fp8Rows:
    """x: [R, K] float (columns contiguous) -> Fp8Rows of x (codes [R, K] uint8, scales
    [R, cdiv(K, 128)] float32, dtype x's)."""
    x = x if x.stride(-1) == 1 else x.contiguous()
    num_rows, k_dim = x.shape
    codes = torch.empty(num_rows, k_dim, dtype=torch.uint8, device=x.device)
    scales = torch.empty(num_rows, triton.cdiv(k_dim, GROUP), dtype=torch.float32, device=x.device)
    if num_rows and k_dim:
        quantize_rows_kernel[(triton.cdiv(num_rows, BLOCK_R), scales.shape[1])](
            x, codes, scales, num_rows, k_dim, x.stride(0), codes.stride(0), scales.stride(0),
            BLOCK_R=BLOCK_R, GROUP=GROUP, num_warps=4,
        )
    return Fp8Rows(codes, scales, x.dtype)
