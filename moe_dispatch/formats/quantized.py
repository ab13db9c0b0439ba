"""Quantized expert weights: int8, int4, fp8 with 128x128 blocks, and mxfp4.

A QuantizedWeight holds [E, N, K] (K the input dim) as codes and float scales over blocks of
`block` = (rows, columns): element (e, n, k) is worth

    scale[e, n // rows, k // columns] * (value of code[e, n, k] - zero)

computed in float32, then rounded to the activations' dtype. Codes run contiguously along K,
so a kernel reads one row of an expert as one run of bytes; the 4-bit formats keep two per
byte, the even element in the low nibble (gpt-oss's MXFP4 layout). Edge blocks are partial
(DeepSeek-V3 pads its FP8 scale grid the same way).

| format | code | scale | block |
| int8   | int8, symmetric | float32 | (1, K) per output channel, or (1, 32/64/128) |
| int4   | uint4, zero 8 or a zero point per group | float32 | (1, 32/64/128) |
| fp8    | float8_e4m3fn | float32 multiplier | (128, 128) |
| mxfp4  | e2m1 | e8m0 (uint8, 2^(s-127)) | (1, 32) |

Checkpoints come in through QuantizedWeight's importers: from_fp8_blocks (DeepSeek-V3),
from_mxfp4 (gpt-oss), from_gptq, from_awq and from_compressed_tensors; each rearranges the
checkpoint's packed codes into this layout without widening them (docs/formats.md).

A weight's `precision` says how its products treat the activations: "weight-only" (every
format: the activations multiply the dequantized weight in their own dtype) or "w8a8" (fp8
only, DeepSeek-V3's recipe): each activation row is quantized per 128 columns to e4m3 with a
float32 scale (fp8_activations), and the product of both operands' values is summed in float32
and rounded once. w8a8 applies to the forward products x @ q[e].T; the input's gradient
dy @ q[e] stays weight-only (the activations' rounding passes the gradient straight through).

Quantized weights are frozen: a gradient reaches x, the routing weights and the biases, never
the codes or scales (fine-tuning around frozen quantized experts, as QLoRA does).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch

from .. import validation as check
from . import FORMATS, StoredWeight

Tensor = torch.Tensor
GROUP_SIZES = (32, 64, 128)
_ACTIVATION_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# e2m1 magnitudes by code (bit 3 is the sign)
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
WEIGHT_ONLY, W8A8 = "weight-only", "w8a8"
PRECISIONS = (WEIGHT_ONLY, W8A8)
# w8a8's activation groups: columns of a row that share one scale, as the weight's K-blocks
ACTIVATION_GROUP = 128


class QuantizedWeight(StoredWeight):
    """An expert weight [E, N, K] as codes and block scales; one subclass per format.

    codes: [E, N, K] (8-bit formats) or [E, N, K/2] uint8 (4-bit: two per byte, even element low);
    scales: [E, ceil(N/rows), ceil(K/columns)] (float32; uint8 e8m0 for mxfp4);
    zeros: int4's zero points, uint8 like scales, or None (zero 8);
    block: (rows, columns) each scale covers; dtype: the activations' dtype it multiplies;
    precision: "weight-only", or "w8a8" (fp8 in 128x128 blocks: the activations quantized per
    row per 128 columns too; see the module's docstring).
    """

    trainable = False
    dtype_bits: ClassVar[int]  # bits per stored element, scales aside
    code_dtype: ClassVar[torch.dtype]
    scale_dtype: ClassVar[torch.dtype] = torch.float32
    codes_per_byte: ClassVar[int] = 1

    def __init__(self, codes: Tensor, scales: Tensor, block: tuple[int, int], *, zeros: Optional[Tensor] = None,
                 dtype: torch.dtype = torch.bfloat16, precision: str = WEIGHT_ONLY):
        check.tensor("codes", codes, ndim=3)
        if codes.dtype != self.code_dtype:
            raise TypeError(f"{self.format} codes must be {self.code_dtype}, got {codes.dtype}")
        if dtype not in _ACTIVATION_DTYPES:
            raise TypeError(f"dtype (the activations' dtype) must be bfloat16, float16 or float32, got {dtype}")
        rows, columns = block
        check.positive_int("block rows", rows)
        check.positive_int("block columns", columns)
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if precision == W8A8 and (self.format != "fp8" or block != (ACTIVATION_GROUP, ACTIVATION_GROUP)):
            raise ValueError(f"precision='w8a8' takes fp8 weights in DeepSeek-V3's 128x128 blocks (128 columns: the "
                             f"activations' groups); got {self.format} with block {block}")
        num_experts, out_features, packed = codes.shape
        in_features = packed * self.codes_per_byte
        grid = (num_experts, -(-out_features // rows), -(-in_features // columns))
        check.tensor("scales", scales, ndim=3)
        if scales.dtype != self.scale_dtype:
            raise TypeError(f"{self.format} scales must be {self.scale_dtype}, got {scales.dtype}")
        check.shape("scales", scales, grid)
        check.same_device("scales", scales, "codes", codes)
        if zeros is not None:
            if self.format != "int4":
                raise ValueError(f"zero points are for int4 weights, not {self.format}")
            check.tensor("zeros", zeros, ndim=3)
            if zeros.dtype != torch.uint8:
                raise TypeError(f"int4 zero points must be uint8, got {zeros.dtype}")
            check.shape("zeros", zeros, grid)
            check.same_device("zeros", zeros, "codes", codes)
        self.codes, self.scales, self.zeros = codes.contiguous(), scales.contiguous(), zeros
        if zeros is not None:
            self.zeros = zeros.contiguous()
        self.block, self._dtype, self.precision = (rows, columns), dtype, precision
        # flatten's spec, made here: under torch.compile a block size that differs between calls
        # of one function turns symbolic, and no string can be formatted from it there
        self._spec = f"{rows},{columns},{str(dtype).removeprefix('torch.')},{precision}"

    # ---- what it holds -------------------------------------------------------------------

    @property
    def shape(self) -> torch.Size:
        num_experts, out_features, packed = self.codes.shape
        return torch.Size((num_experts, out_features, packed * self.codes_per_byte))

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self.codes.device

    @property
    def group_size(self) -> int:
        """The K elements each scale covers."""
        return self.block[1]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.flatten()[0])

    @property
    def bits_per_weight(self) -> float:
        """Bytes held per weight, in bits, scales and zero points included."""
        return 8 * self.nbytes / max(self.shape.numel(), 1)

    def __getitem__(self, experts) -> "QuantizedWeight":
        """The experts `experts` (an int or a slice) as a QuantizedWeight of views."""
        pick = slice(experts, experts + 1 or None) if isinstance(experts, int) else experts  # -1 is the last
        zeros = None if self.zeros is None else self.zeros[pick]
        return type(self)(self.codes[pick], self.scales[pick], self.block, zeros=zeros, dtype=self.dtype,
                          precision=self.precision)

    @property
    def mT(self) -> "Transposed":
        """The weight read as [E, K, N], as Tensor.mT: grouped_mm(xs, q.mT, offsets) = xs @ w[e].T per group."""
        return Transposed(self)

    def to(self, dtype: Optional[torch.dtype] = None, device=None, *,
           precision: Optional[str] = None) -> "QuantizedWeight":
        """The same codes for activations of `dtype`, moved to `device`, or multiplying them at
        another `precision` ("weight-only" or "w8a8")."""
        move = (lambda t: t) if device is None else (lambda t: None if t is None else t.to(device))
        return type(self)(move(self.codes), move(self.scales), self.block, zeros=move(self.zeros),
                          dtype=self.dtype if dtype is None else dtype,
                          precision=self.precision if precision is None else precision)

    # ---- values ------------------------------------------------------------------------------

    def code_values(self) -> Tensor:
        """float32 [E, N, K]: each code's value before its scale, less its zero point."""
        raise NotImplementedError

    def float_scales(self) -> Tensor:
        """float32 scales [E, ceil(N/rows), ceil(K/columns)]."""
        return self.scales

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> Tensor:
        """The [E, N, K] values in `dtype` (default: the activations' dtype), computed in float32."""
        values = self.code_values() * expand_blocks(self.float_scales(), self.block, self.shape)
        return values.to(self.dtype if dtype is None else dtype)

    def dense(self) -> Tensor:
        return self.dequantize()

    def check(self, name: str, x: Tensor) -> None:
        check.same_device(name, self.codes, "x", x)
        if x.dtype != self.dtype:
            raise TypeError(f"{name} is {self.format} for {self.dtype} activations but x is {x.dtype}; quantize for "
                            f"{x.dtype} (dtype=) or take {name}.to({x.dtype})")
        trained = [t for t in (self.scales, self.zeros) if t is not None and t.requires_grad]
        if trained and torch.is_grad_enabled():
            raise ValueError(f"{name} is a frozen {self.format} weight: no gradient reaches its codes or scales; "
                             f"detach its scales (gradients flow to x, the routing weights and the biases)")

    def flatten(self) -> tuple[list[Tensor], str]:
        tensors = [self.codes, self.scales] + ([] if self.zeros is None else [self.zeros])
        return tensors, self._spec

    @classmethod
    def unflatten(cls, tensors: list[Tensor], meta: str) -> "QuantizedWeight":
        rows, columns, dtype, precision = meta.split(",")
        zeros = tensors[2] if len(tensors) > 2 else None
        return cls(tensors[0], tensors[1], (int(rows), int(columns)), zeros=zeros, dtype=getattr(torch, dtype),
                   precision=precision)

    def __repr__(self) -> str:
        precision = f"precision={self.precision!r}, " if self.precision != WEIGHT_ONLY else ""
        return (f"{type(self).__name__}(shape={tuple(self.shape)}, block={self.block}, dtype={self.dtype}, "
                f"{precision}{self.bits_per_weight:.2f} bits/weight)")

    # ---- quantizing a float weight --------------------------------------------------------

    @classmethod
    def quantize(cls, w: Tensor, group_size: Optional[int], symmetric: bool, dtype: torch.dtype) -> "QuantizedWeight":
        raise NotImplementedError

    # ---- importing checkpoint tensors -----------------------------------------------------
    # Every importer takes the experts stacked on dim 0 (or a list of per-expert tensors, as
    # the checkpoint files hold them), checks each tensor under the checkpoint's own name, and
    # rearranges the packed codes without ever widening them to floats.

    @staticmethod
    def from_fp8_blocks(weight, scale_inv, *, dtype: torch.dtype = torch.bfloat16,
                        precision: str = WEIGHT_ONLY) -> "FP8Weight":
        """DeepSeek-V3's experts as shipped: weight [E, N, K] float8_e4m3fn and its multipliers
        scale_inv [E, ceil(N/128), ceil(K/128)] (float32; bfloat16/float16 are widened, exactly).
        w = weight * scale_inv of its 128x128 block; edge blocks are partial. precision="w8a8"
        multiplies activations quantized as DeepSeek-V3 does (see the module's docstring)."""
        weight = _expect("weight", weight, (torch.float8_e4m3fn,), 3, layout="[E, N, K]")
        num_experts, out_features, in_features = weight.shape
        rows, columns = FP8Weight.BLOCK
        grid = (num_experts, -(-out_features // rows), -(-in_features // columns))
        scale_inv = _expect("scale_inv", scale_inv, _FLOAT_SCALES, grid, layout="[E, ceil(N/128), ceil(K/128)]")
        return FP8Weight(weight, scale_inv.float(), FP8Weight.BLOCK, dtype=dtype, precision=precision)

    @staticmethod
    def from_mxfp4(blocks, scales, *, dtype: torch.dtype = torch.bfloat16) -> "MXFP4Weight":
        """gpt-oss's experts as shipped: blocks [E, N, K/32, 16] uint8 (two e2m1 per byte, the
        even element low) and scales [E, N, K/32] uint8 (e8m0). Its gate_up rows interleave gate
        and up: use the weight with ExpertWeights(..., interleaved=True). No copy is made."""
        blocks = _expect("blocks", blocks, (torch.uint8,), 4, layout="[E, N, K/32, 16]")
        if blocks.shape[-1] != 16:
            raise ValueError(f"blocks must be [E, N, K/32, 16] (16 bytes hold 32 e2m1 values), "
                             f"got shape {tuple(blocks.shape)}")
        scales = _expect("scales", scales, (torch.uint8,), blocks.shape[:3], layout="[E, N, K/32]")
        return MXFP4Weight(blocks.flatten(2), scales, (1, 32), dtype=dtype)

    @staticmethod
    def from_gptq(qweight, qzeros, scales, *, group_size: int, g_idx=None,
                  dtype: torch.dtype = torch.bfloat16) -> "Int4Weight":
        """4-bit GPTQ experts (AutoGPTQ / GPTQModel checkpoint format "gptq", v1):

        qweight int32 [E, K/8, N]: bits 4i..4i+3 of qweight[e, r, n] hold element k = 8r + i;
        qzeros int32 [E, K/g, N/8]: bits 4i..4i+3 of qzeros[e, j, c] hold n = 8c + i's zero
        point less one (v1 stores zero - 1; the zero is stored + 1, mod 16);
        scales float16 [E, K/g, N]; g_idx [K] or [E, K]: each k's group.
        w[e, n, k] = scales[e, k // g, n] * (q - zero). A symmetric checkpoint (every zero 8)
        gives zeros=None.
        """
        qweight = _expect("qweight", qweight, (torch.int32,), 3, layout="[E, K/8, N]")
        num_experts, packed, out_features = qweight.shape
        in_features = 8 * packed
        block = _group_block("int4", group_size, in_features, per_channel=False)
        groups = in_features // group_size
        scales = _expect("scales", scales, _FLOAT_SCALES, (num_experts, groups, out_features), layout="[E, K/g, N]")
        qzeros = _expect("qzeros", qzeros, (torch.int32,), (num_experts, groups, -(-out_features // 8)),
                         layout="[E, K/g, ceil(N/8)]")
        _check_g_idx("g_idx", g_idx, num_experts, in_features, group_size)
        # Eight codes packed along K from the lowest nibble up are, byte by byte, our layout.
        codes = _bytes_of(qweight.transpose(1, 2))
        zeros = (_unpack_words(qzeros, out_features) + 1) & 15
        return Int4Weight(codes, scales.transpose(1, 2).float(), block, zeros=_zeros_unless_8(zeros.transpose(1, 2)),
                          dtype=dtype)

    @staticmethod
    def from_awq(qweight, qzeros, scales, *, group_size: int, dtype: torch.dtype = torch.bfloat16) -> "Int4Weight":
        """4-bit AWQ experts (AutoAWQ's GEMM format):

        qweight int32 [E, K, N/8]: bits 4i..4i+3 of qweight[e, k, c] hold n = 8c + AWQ_ORDER[i]
        (the interleave 0, 2, 4, 6, 1, 3, 5, 7 its kernels unpack in pairs);
        qzeros int32 [E, K/g, N/8]: the zero points, packed the same way (stored as they are);
        scales float16 [E, K/g, N]. w[e, n, k] = scales[e, k // g, n] * (q - zero).
        """
        qweight = _expect("qweight", qweight, (torch.int32,), 3, layout="[E, K, N/8]")
        num_experts, in_features, packed = qweight.shape
        block = _group_block("int4", group_size, in_features, per_channel=False)
        groups, out_features = in_features // group_size, 8 * packed
        scales = _expect("scales", scales, _FLOAT_SCALES, (num_experts, groups, out_features), layout="[E, K/g, N]")
        qzeros = _expect("qzeros", qzeros, (torch.int32,), (num_experts, groups, packed), layout="[E, K/g, N/8]")
        # rows k = 2j and 2j + 1 become byte j's low and high nibble; then K goes last
        low = _unpack_words(qweight[:, 0::2], out_features, AWQ_ORDER)
        high = _unpack_words(qweight[:, 1::2], out_features, AWQ_ORDER)
        codes = (low | high << 4).transpose(1, 2)
        zeros = _unpack_words(qzeros, out_features, AWQ_ORDER).transpose(1, 2)
        return Int4Weight(codes, scales.transpose(1, 2).float(), block, zeros=_zeros_unless_8(zeros), dtype=dtype)

    @staticmethod
    def from_compressed_tensors(weight, weight_scale, weight_zero_point=None, *, weight_g_idx=None,
                                num_bits: Optional[int] = None,
                                dtype: torch.dtype = torch.bfloat16) -> "QuantizedWeight":
        """compressed-tensors' integer weight-only experts (llm-compressor's W8A16 / W4A16):

        "int-quantized": weight int8 [E, N, K] -> int8.
        "pack-quantized": weight_packed int32 [E, N, ceil(K*num_bits/32)], packed along K from
        the lowest bits up, each value stored plus 2^(num_bits-1) (num_bits: the config's
        weights.num_bits, 4 -> int4, 8 -> int8).
        weight_scale [E, N, 1] (channel; int8 only) or [E, N, K/g] (group, g = 32/64/128);
        weight_zero_point (4-bit asymmetric): int32 [E, ceil(N/8), K/g], packed along N the
        same way, or int8 [E, N, K/g] unpacked; an 8-bit one must be all zero.
        w[e, n, k] = weight_scale[e, n, k // g] * (q - zero_point), both signed.
        """
        weight = _stacked("weight", weight)
        packed = getattr(weight, "dtype", None) != torch.int8  # else "int-quantized"
        num_bits = 8 if num_bits is None and not packed else num_bits
        if num_bits not in (4, 8) or not packed and num_bits != 8:
            raise ValueError(f"num_bits (the quantization config's weights.num_bits) must be 4 or 8 for weight_packed "
                             f"and 8 for an int8 weight; got {num_bits!r}")
        name, per_word = ("weight_packed", 32 // num_bits) if packed else ("weight", 1)
        weight = _expect(name, weight, (torch.int32,) if packed else (torch.int8,), 3, layout=f"[E, N, K/{per_word}]")
        num_experts, out_features, in_features = *weight.shape[:2], weight.shape[2] * per_word
        weight_scale = _expect("weight_scale", weight_scale, _FLOAT_SCALES, 3, layout="[E, N, 1] or [E, N, K/g]")
        groups = weight_scale.shape[2]
        fmt = "int8" if num_bits == 8 else "int4"
        if (weight_scale.shape[:2] != (num_experts, out_features) or in_features % groups
                or (groups > 1 or fmt == "int4") and in_features // groups not in GROUP_SIZES):
            raise ValueError(f"weight_scale must be [E, N, K/g] = ({num_experts}, {out_features}, {in_features}/g) for "
                             f"g in {GROUP_SIZES}{' or [E, N, 1] (per channel)' if fmt == 'int8' else ''}; "
                             f"got shape {tuple(weight_scale.shape)}")
        block = (1, in_features // groups)
        _check_g_idx("weight_g_idx", weight_g_idx, num_experts, in_features, block[1])
        signed_zeros = _compressed_zero_points(weight_zero_point, num_bits, (num_experts, out_features, groups))
        scales = weight_scale.float()
        if fmt == "int8":
            if signed_zeros is not None and bool(signed_zeros.any()):
                raise ValueError("weight_zero_point holds nonzero zero points, but int8 weights are symmetric")
            # 8-bit packing stores q + 128 in each byte: flipping the top bit gives q's two's complement
            codes = (_bytes_of(weight) ^ 0x80).view(torch.int8) if packed else weight
            return Int8Weight(codes, scales, block, dtype=dtype)
        # The stored value q + 8 is our code; q - zero_point = code - (zero_point + 8).
        zeros = None if signed_zeros is None else _zeros_unless_8((signed_zeros + 8).to(torch.uint8))
        return Int4Weight(_bytes_of(weight), scales, block, zeros=zeros, dtype=dtype)


# AWQ's nibble order: bits 4i..4i+3 of a word hold column AWQ_ORDER[i] of its eight.
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
_FLOAT_SCALES = (torch.float32, torch.bfloat16, torch.float16)


def _expect(name: str, t, dtypes: tuple, shape, *, layout: str) -> Tensor:
    """t (a per-expert list is stacked) checked against a checkpoint tensor's dtypes and shape:
    `shape` a tuple, or the number of dims when the sizes are what defines the others."""
    t = _stacked(name, t)
    check.tensor(name, t)
    wanted = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must be {wanted} {layout}, got {t.dtype}")
    wrong = t.dim() != shape if isinstance(shape, int) else t.shape != tuple(shape)
    if wrong:
        expected = f"{shape}-D" if isinstance(shape, int) else f"shape {tuple(shape)}"
        raise ValueError(f"{name} must be {layout} ({expected}), got shape {tuple(t.shape)}")
    return t


def _check_g_idx(name: str, g_idx, num_experts: int, in_features: int, group_size: int) -> None:
    """Accept only the plain g_idx[k] == k // group_size. An act-order checkpoint's groups
    gather rows of K from all over: its codes would need x's K permuted, and K's order is x's."""
    if g_idx is None:
        return
    g_idx = _stacked(name, g_idx)
    check.integer(name, g_idx)
    if g_idx.shape not in ((in_features,), (num_experts, in_features)):
        raise ValueError(f"{name} must be [K] or [E, K] = ({in_features},) or ({num_experts}, {in_features}), "
                         f"got shape {tuple(g_idx.shape)}")
    plain = torch.arange(in_features, device=g_idx.device) // group_size
    if not bool((g_idx == plain).all()):
        raise ValueError(f"{name} is not k // group_size: an act-order (desc_act) checkpoint groups rows of K out of "
                         f"order, which contiguous groups along K cannot hold; requantize without act-order")


def _bytes_of(words: Tensor) -> Tensor:
    """int32 [..., W] -> uint8 [..., 4W], byte j of word w at 4w + j (its bits 8j..8j+7).

    A reinterpretation of the memory: the least significant byte comes first on every
    little-endian machine, which is all torch runs on."""
    if sys.byteorder != "little":
        raise RuntimeError("importing packed int32 checkpoint tensors needs a little-endian machine")
    return words.contiguous().view(torch.uint8)


def _unpack_words(words: Tensor, size: int, order: tuple = tuple(range(8))) -> Tensor:
    """int32 [..., W] of eight 4-bit values each -> uint8 [..., size]: bits 4i..4i+3 of word w
    are value 8w + order[i] (values past size are padding)."""
    values = torch.empty(*words.shape, 8, dtype=torch.uint8, device=words.device)
    for i, position in enumerate(order):
        values[..., position] = (words >> 4 * i) & 15
    return values.flatten(-2)[..., :size]


def _zeros_unless_8(zeros: Tensor) -> Optional[Tensor]:
    """int4 zero points, or None when all are 8: the symmetric layout, smaller and faster."""
    return None if bool((zeros == 8).all()) else zeros


def _compressed_zero_points(zero_point, num_bits: int, grid: tuple) -> Optional[Tensor]:
    """compressed-tensors' weight_zero_point as signed int16 [E, N, groups], or None: a 4-bit
    asymmetric one packed (int32 [E, ceil(N/8), groups], along N, each plus 8), or unpacked int8."""
    if zero_point is None:
        return None
    num_experts, out_features, groups = grid
    zero_point = _expect("weight_zero_point", zero_point, (torch.int32, torch.int8) if num_bits == 4 else (torch.int8,),
                         3, layout="[E, ceil(N/8), K/g] packed or [E, N, K/g] int8")
    if zero_point.dtype == torch.int32:
        _expect("weight_zero_point", zero_point, (torch.int32,), (num_experts, -(-out_features // 8), groups),
                layout="[E, ceil(N/8), K/g] packed")
        return _unpack_words(zero_point.transpose(1, 2), out_features).transpose(1, 2).short() - 8
    _expect("weight_zero_point", zero_point, (torch.int8,), grid, layout="[E, N, K/g] int8")
    return zero_point.short()


@dataclass(frozen=True)
class Transposed:
    """A QuantizedWeight [E, N, K] read as [E, K, N] (QuantizedWeight.mT)."""

    weight: QuantizedWeight

    @property
    def shape(self) -> torch.Size:
        num_experts, out_features, in_features = self.weight.shape
        return torch.Size((num_experts, in_features, out_features))

    @property
    def mT(self) -> QuantizedWeight:
        return self.weight


def _stacked(name: str, t) -> Tensor:
    """A per-expert list stacked on a new dim 0; a tensor as it is."""
    if isinstance(t, (list, tuple)):
        if not t:
            raise ValueError(f"{name} must hold at least one expert")
        return torch.stack(list(t))
    return t


def expand_blocks(scales: Tensor, block: tuple[int, int], shape: torch.Size) -> Tensor:
    """[E, ceil(N/rows), ceil(K/columns)] block values -> [E, N, K] (each element its block's)."""
    rows, columns = block
    _, out_features, in_features = shape
    return scales.repeat_interleave(rows, 1)[:, :out_features].repeat_interleave(columns, 2)[:, :, :in_features]


def block_amax(w: Tensor, block: tuple[int, int]) -> Tensor:
    """float32 [E, ceil(N/rows), ceil(K/columns)]: each block's largest magnitude (partial edge blocks included)."""
    rows, columns = block
    num_experts, out_features, in_features = w.shape
    padded = torch.nn.functional.pad(w.float().abs(), (0, -in_features % columns, 0, -out_features % rows))
    grid = padded.view(num_experts, padded.shape[1] // rows, rows, padded.shape[2] // columns, columns)
    return grid.amax(dim=(2, 4))


def powers_of_two(exponent: Tensor) -> Tensor:
    """float32 2^exponent, exact (2^-127 included, a subnormal)."""
    return torch.ldexp(torch.ones(exponent.shape, device=exponent.device), exponent)


def pack_nibbles(codes: Tensor) -> Tensor:
    """uint8 [..., K] of values 0..15 -> [..., K/2], element 2j in the low nibble of byte j."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_nibbles(packed: Tensor) -> Tensor:
    """pack_nibbles' inverse: uint8 [..., K/2] -> [..., K]."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)


def _group_block(fmt: str, group_size: Optional[int], in_features: int, per_channel: bool) -> tuple[int, int]:
    """(1, group_size) for a K-group format, checking group_size against K."""
    if group_size is None and per_channel:
        return (1, in_features)
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group_size for {fmt} must be one of {GROUP_SIZES}"
                         f"{' or None (per output channel)' if per_channel else ''}; got {group_size!r}")
    if in_features % group_size:
        raise ValueError(f"group_size={group_size} must divide K={in_features} (the weight's last dim)")
    return (1, group_size)


def _safe(scale: Tensor) -> Tensor:
    """Scales of all-zero blocks as 1: their codes are zero whatever the scale."""
    return torch.where(scale > 0, scale, torch.ones_like(scale))


class Int8Weight(QuantizedWeight):
    format = "int8"
    dtype_bits = 8
    code_dtype = torch.int8

    def code_values(self) -> Tensor:
        return self.codes.float()

    @classmethod
    def quantize(cls, w, group_size, symmetric, dtype):
        if not symmetric:
            raise ValueError("int8 weights are symmetric; symmetric=False is for int4")
        block = _group_block("int8", group_size, w.shape[2], per_channel=True)
        scales = _safe(block_amax(w, block) / 127)
        codes = torch.round(w.float() / expand_blocks(scales, block, w.shape)).clamp_(-127, 127).to(torch.int8)
        return cls(codes, scales, block, dtype=dtype)


class Int4Weight(QuantizedWeight):
    format = "int4"
    dtype_bits = 4
    code_dtype = torch.uint8
    codes_per_byte = 2

    def code_values(self) -> Tensor:
        codes = unpack_nibbles(self.codes).float()
        if self.zeros is None:
            return codes - 8
        return codes - expand_blocks(self.zeros.float(), self.block, self.shape)

    @classmethod
    def quantize(cls, w, group_size, symmetric, dtype):
        block = _group_block("int4", 128 if group_size is None else group_size, w.shape[2], per_channel=False)
        wf = w.float()
        if symmetric:
            # 16 levels around zero 8: [-8, 7] * scale, the top clipped by at most half a step
            scales = _safe(block_amax(w, block) / 7.5)
            zeros, zero = None, 8.0
        else:
            low = -block_amax(-wf.clamp(max=0), block)  # each block's minimum, at most 0
            high = block_amax(wf.clamp(min=0), block)
            scales = _safe((high - low) / 15)
            zeros = torch.round(-low / scales).clamp_(0, 15).to(torch.uint8)
            zero = expand_blocks(zeros.float(), block, w.shape)
        codes = torch.round(wf / expand_blocks(scales, block, w.shape) + zero).clamp_(0, 15).to(torch.uint8)
        return cls(pack_nibbles(codes), scales, block, zeros=zeros, dtype=dtype)


class FP8Weight(QuantizedWeight):
    format = "fp8"
    dtype_bits = 8
    code_dtype = torch.float8_e4m3fn
    BLOCK = (128, 128)
    MAX = 448.0  # float8_e4m3fn's largest finite value

    def code_values(self) -> Tensor:
        return self.codes.float()

    @classmethod
    def quantize(cls, w, group_size, symmetric, dtype):
        if group_size not in (None, 128) or not symmetric:
            raise ValueError("fp8 weights take DeepSeek-V3's symmetric 128x128 blocks (group_size=None or 128)")
        return cls(*e4m3_blocks(w, cls.BLOCK), cls.BLOCK, dtype=dtype)


def e4m3_blocks(w: Tensor, block: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """w [E, N, K] as (float8_e4m3fn codes [E, N, K], float32 scales [E, ceil(N/rows), ceil(K/columns)]):
    each block's largest magnitude maps to 448, each element rounds to the nearest e4m3 value
    (ties to even); an all-zero block gets scale 1."""
    scales = _safe(block_amax(w, block) / FP8Weight.MAX)
    scaled = w.float() / expand_blocks(scales, block, w.shape)
    return scaled.clamp_(-FP8Weight.MAX, FP8Weight.MAX).to(torch.float8_e4m3fn), scales


def fp8_activations(x: Tensor) -> tuple[Tensor, Tensor]:
    """x [R, K] as w8a8 multiplies it, DeepSeek-V3's activation quantization: each row's groups of
    128 columns in e4m3 with a float32 scale, the group's largest magnitude / 448 (e4m3_blocks):
    (codes [R, K] float8_e4m3fn, scales [R, ceil(K/128)] float32)."""
    codes, scales = e4m3_blocks(x[None], (1, ACTIVATION_GROUP))
    return codes[0], scales[0]


def fp8_activation_values(x: Tensor) -> Tensor:
    """float32 [R, K]: the values w8a8 multiplies in x's place, fp8_activations' codes times their scales."""
    codes, scales = fp8_activations(x)
    return codes.float() * expand_blocks(scales[None], (1, ACTIVATION_GROUP), codes[None].shape)[0]


def w8a8(w) -> bool:
    """Whether w (a weight of any kind) multiplies its activations quantized (precision "w8a8")."""
    return isinstance(w, QuantizedWeight) and w.precision == W8A8


class MXFP4Weight(QuantizedWeight):
    format = "mxfp4"
    dtype_bits = 4
    code_dtype = torch.uint8
    scale_dtype = torch.uint8
    codes_per_byte = 2

    def code_values(self) -> Tensor:
        codes = unpack_nibbles(self.codes)
        magnitude = torch.tensor(E2M1_VALUES, device=codes.device)[(codes & 7).long()]
        return torch.where(codes >= 8, -magnitude, magnitude)

    def float_scales(self) -> Tensor:
        return powers_of_two(self.scales.int() - 127)

    @classmethod
    def quantize(cls, w, group_size, symmetric, dtype):
        if group_size not in (None, 32) or not symmetric:
            raise ValueError("mxfp4 weights take symmetric groups of 32 along K (group_size=None or 32)")
        block = _group_block("mxfp4", 32, w.shape[2], per_channel=False)
        # The OCP MX rule: the shared exponent puts the block's largest magnitude in [4, 8),
        # e2m1's top binade (6 is its largest value; what lies above clips to 6).
        amax = block_amax(w, block)
        exponent = torch.where(amax > 0, torch.floor(torch.log2(amax)) - 2, torch.full_like(amax, -127))
        exponent = exponent.clamp_(-127, 127)
        scaled = w.float() / expand_blocks(powers_of_two(exponent.int()), block, w.shape)
        midpoints = torch.tensor([(a + b) / 2 for a, b in zip(E2M1_VALUES, E2M1_VALUES[1:])], device=w.device)
        magnitude = torch.bucketize(scaled.abs().contiguous(), midpoints).to(torch.uint8)
        codes = magnitude | (scaled < 0).to(torch.uint8) << 3
        return cls(pack_nibbles(codes), (exponent + 127).to(torch.uint8), block, dtype=dtype)


def quantize(w: Tensor, format: str, *, group_size: Optional[int] = None, symmetric: bool = True,
             dtype: Optional[torch.dtype] = None, precision: str = WEIGHT_ONLY) -> QuantizedWeight:
    """w [E, N, K] float (K the input dim) quantized to `format`, rounding to nearest.

    group_size: int8 None (per output channel) or 32/64/128; int4 32/64/128 (default 128);
    fp8 128x128 blocks; mxfp4 32. symmetric=False gives int4 a zero point per group.
    dtype: the activations' dtype it will multiply (default w's, when bfloat16/float16/float32).
    precision: "weight-only", or "w8a8" for fp8 (the activations quantized too, DeepSeek-V3's way).
    """
    check.floating("w", w, ndim=3)
    cls = FORMATS.get(format)
    if not isinstance(cls, type) or not issubclass(cls, QuantizedWeight):
        raise ValueError(f"format must be one of {quantized_formats()}, got {format!r}")
    if dtype is None:
        dtype = w.dtype if w.dtype in _ACTIVATION_DTYPES else torch.float32
    with torch.no_grad():
        q = cls.quantize(w.detach(), group_size, symmetric, dtype)
    return q if precision == WEIGHT_ONLY else q.to(precision=precision)


def quantized_formats() -> tuple[str, ...]:
    return tuple(name for name, cls in FORMATS.items() if issubclass(cls, QuantizedWeight))
