"""One MoE layer's routed experts, read from a quantized checkpoint as it ships.

    from safetensors import safe_open
    from moe_dispatch.integrations.checkpoints import read_experts

    with safe_open("model-00003.safetensors", "pt") as f:
        experts = read_experts(f, "model.layers.3.mlp")        # the format from the tensor names
    layer = MoE.from_experts(experts.gate_then_up(), top_k=8)

`checkpoint` is a dict name -> tensor (safetensors.torch.load_file), a safe_open handle, or a
list of them (a sharded checkpoint): tensors are read only when asked for, so no more than one
layer's experts are ever resident. `prefix` names the MoE block ("model.layers.3.mlp"); its
experts lie under f"{prefix}.experts", as DeepSeek-V3, gpt-oss and transformers name them.

| format | tensors under {prefix}.experts |
| "fp8" (DeepSeek-V3) | {e}.{gate,up,down}_proj.weight float8_e4m3fn, .weight_scale_inv |
| "mxfp4" (gpt-oss) | gate_up_proj_blocks/_scales/_bias, down_proj_blocks/_scales/_bias |
| "gptq", "awq" | {e}.{gate,up,down}_proj.qweight, .qzeros, .scales (gptq: [.g_idx]) |
| "compressed-tensors" | {e}.{gate,up,down}_proj.weight_packed (or int8 .weight), .weight_scale [, .weight_zero_point] |

Gate and up become one w_gate_up [E, 2I, H] by concatenating their rows (codes, scales and zero
points alike); the packed codes are rearranged by QuantizedWeight's importers, never widened.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Optional

import torch

from ..activations import CLAMPED_SWIGLU
from ..experts import ExpertWeights
from ..formats.quantized import QuantizedWeight

Tensor = torch.Tensor
CHECKPOINT_FORMATS = ("fp8", "mxfp4", "gptq", "awq", "compressed-tensors")
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


class _Tensors:
    """name -> tensor over dicts and safe_open handles; a tensor is loaded when asked for."""

    def __init__(self, checkpoint):
        sources = checkpoint if isinstance(checkpoint, (list, tuple)) else [checkpoint]
        self.where = {name: source for source in sources for name in source.keys()}

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def get(self, name: str, needed_for: str) -> Tensor:
        source = self.where.get(name)
        if source is None:
            raise KeyError(f"the checkpoint has no tensor {name!r} ({needed_for})")
        return source[name] if isinstance(source, Mapping) else source.get_tensor(name)


def _as_tensors(checkpoint) -> _Tensors:
    return checkpoint if isinstance(checkpoint, _Tensors) else _Tensors(checkpoint)


def read_experts(checkpoint, prefix: str, format: Optional[str] = None, *, group_size: Optional[int] = None,
                 num_bits: Optional[int] = None, num_experts: Optional[int] = None, activation=None,
                 dtype: torch.dtype = torch.bfloat16) -> ExpertWeights:
    """The routed experts of the MoE block `prefix` as an ExpertWeights of QuantizedWeight.

    format: one of CHECKPOINT_FORMATS, or None to tell it from the tensor names present.
    group_size: GPTQ's and AWQ's (the quantization config's group_size / q_group_size);
    num_bits: compressed-tensors' weights.num_bits (8 for an int8 `weight`).
    num_experts: default, the experts numbered in the checkpoint. activation: the experts'
    (default: swiglu; gpt-oss's clamped SwiGLU for mxfp4). dtype: the activations' dtype.
    """
    tensors = _as_tensors(checkpoint)
    format = detect_format(tensors, prefix) if format is None else format
    common = dict(dtype=dtype) if activation is None else dict(activation=activation, dtype=dtype)
    if format == "mxfp4":
        return read_mxfp4_experts(tensors, prefix, **common)
    common["num_experts"] = num_experts
    if format == "fp8":
        return read_fp8_experts(tensors, prefix, **common)
    if format in ("gptq", "awq"):
        if group_size is None:
            raise ValueError(f"{format} needs group_size (the checkpoint's quantization config's group size)")
        reader = read_gptq_experts if format == "gptq" else read_awq_experts
        return reader(tensors, prefix, group_size=group_size, **common)
    if format == "compressed-tensors":
        return read_compressed_tensors_experts(tensors, prefix, num_bits=num_bits, **common)
    raise ValueError(f"format must be one of {CHECKPOINT_FORMATS} or None (told from the names), got {format!r}")


def detect_format(checkpoint, prefix: str) -> str:
    """Which of CHECKPOINT_FORMATS holds the experts of `prefix`, from the names (and, for
    GPTQ against AWQ, the shapes: qweight is [K/8, N] in one, [K, N/8] in the other)."""
    tensors = _as_tensors(checkpoint)
    base = f"{prefix}.experts"
    first = f"{base}.0.gate_proj"
    if f"{base}.gate_up_proj_blocks" in tensors:
        return "mxfp4"
    if f"{first}.weight_scale_inv" in tensors:
        return "fp8"
    if f"{first}.weight_scale" in tensors:
        return "compressed-tensors"
    if f"{first}.qweight" in tensors:
        why = "gptq or awq experts"
        columns = tensors.get(f"{first}.qweight", why).shape[1]
        return "gptq" if columns == tensors.get(f"{first}.scales", why).shape[1] else "awq"
    raise KeyError(f"the checkpoint has no quantized experts under {base!r}: looked for {base}.gate_up_proj_blocks "
                   f"(mxfp4) and {first}.weight_scale_inv (fp8), .weight_scale (compressed-tensors), .qweight (gptq, awq)")


# ---- one function per naming scheme ----------------------------------------------------------


def read_fp8_experts(checkpoint, prefix, *, num_experts=None, activation="swiglu", dtype=torch.bfloat16):
    """DeepSeek-V3: per expert, weight float8_e4m3fn [N, K] and weight_scale_inv [N/128, K/128]."""
    return _per_expert(checkpoint, prefix, "fp8", ("weight", "weight_scale_inv"), (), num_experts, activation,
                       lambda t: QuantizedWeight.from_fp8_blocks(t["weight"], t["weight_scale_inv"], dtype=dtype))


def read_gptq_experts(checkpoint, prefix, *, group_size, num_experts=None, activation="swiglu", dtype=torch.bfloat16):
    """GPTQ v1: per expert, qweight [K/8, N], qzeros [K/g, N/8], scales [K/g, N], g_idx [K] if any."""
    return _per_expert(checkpoint, prefix, "gptq", ("qweight", "qzeros", "scales"), ("g_idx",), num_experts,
                       activation, lambda t: QuantizedWeight.from_gptq(t["qweight"], t["qzeros"], t["scales"],
                                                                       group_size=group_size, g_idx=t["g_idx"],
                                                                       dtype=dtype))


def read_awq_experts(checkpoint, prefix, *, group_size, num_experts=None, activation="swiglu", dtype=torch.bfloat16):
    """AWQ GEMM: per expert, qweight [K, N/8], qzeros [K/g, N/8], scales [K/g, N]."""
    return _per_expert(checkpoint, prefix, "awq", ("qweight", "qzeros", "scales"), (), num_experts, activation,
                       lambda t: QuantizedWeight.from_awq(t["qweight"], t["qzeros"], t["scales"],
                                                          group_size=group_size, dtype=dtype))


def read_compressed_tensors_experts(checkpoint, prefix, *, num_bits=None, num_experts=None, activation="swiglu",
                                    dtype=torch.bfloat16):
    """compressed-tensors: per expert, weight_packed int32 (pack-quantized; or weight int8,
    int-quantized), weight_scale, and weight_zero_point / weight_g_idx if any."""
    tensors = _as_tensors(checkpoint)
    packed = f"{prefix}.experts.0.gate_proj.weight_packed" in tensors
    codes = "weight_packed" if packed else "weight"
    return _per_expert(tensors, prefix, "compressed-tensors", (codes, "weight_scale"),
                       ("weight_zero_point", "weight_g_idx"), num_experts, activation,
                       lambda t: QuantizedWeight.from_compressed_tensors(
                           t[codes], t["weight_scale"], t["weight_zero_point"], weight_g_idx=t["weight_g_idx"],
                           num_bits=num_bits, dtype=dtype))


def read_mxfp4_experts(checkpoint, prefix, *, activation=CLAMPED_SWIGLU, dtype=torch.bfloat16) -> ExpertWeights:
    """gpt-oss: the experts stacked, gate and up rows interleaved (interleaved=True), with biases."""
    tensors = _as_tensors(checkpoint)
    base, why = f"{prefix}.experts", f"gpt-oss mxfp4 experts under {prefix!r}"
    weights = [QuantizedWeight.from_mxfp4(tensors.get(f"{base}.{proj}_blocks", why),
                                          tensors.get(f"{base}.{proj}_scales", why), dtype=dtype)
               for proj in ("gate_up_proj", "down_proj")]
    biases = [tensors.get(f"{base}.{proj}_bias", why).to(dtype) for proj in ("gate_up_proj", "down_proj")]
    return ExpertWeights(*weights, *biases, activation, interleaved=True)


# ---- shared helpers --------------------------------------------------------------------------


def _per_expert(checkpoint, prefix, format, names, optional, num_experts, activation, import_one) -> ExpertWeights:
    """Experts stored one by one ({prefix}.experts.{e}.{gate,up,down}_proj.{name}): each
    projection's tensors listed over the experts, imported by import_one(dict name -> list
    or None), gate and up concatenated."""
    tensors = _as_tensors(checkpoint)
    base = f"{prefix}.experts"
    if num_experts is None:
        numbered = {int(m.group(1)) for name in tensors.where if (m := re.match(rf"{re.escape(base)}\.(\d+)\.", name))}
        if not numbered:
            raise KeyError(f"the checkpoint has no tensor {base + '.0.gate_proj.' + names[0]!r} ({format} experts)")
        num_experts = max(numbered) + 1
    why = f"{format} experts under {prefix!r}"

    def listed(proj: str, name: str) -> list:
        return [tensors.get(f"{base}.{e}.{proj}.{name}", why) for e in range(num_experts)]

    def projection(proj: str) -> QuantizedWeight:
        given = {name: listed(proj, name) for name in names}
        given.update({name: listed(proj, name) if f"{base}.0.{proj}.{name}" in tensors else None for name in optional})
        return import_one(given)  # the per-expert lists go once stacked: one projection's bytes twice at most

    gate, up, down = (projection(proj) for proj in PROJECTIONS)
    return ExpertWeights(cat_rows(gate, up), down, activation=activation)


def cat_rows(gate: QuantizedWeight, up: QuantizedWeight) -> QuantizedWeight:
    """[E, I, H] gate and up -> [E, 2I, H]: codes, scales and zero points concatenated along dim 1."""
    if type(gate) is not type(up) or gate.block != up.block:
        raise ValueError(f"gate and up projections differ: {gate} and {up}")
    rows, intermediate = gate.block[0], gate.shape[1]
    if intermediate % rows:
        raise ValueError(f"{gate.format} scales cover blocks of {rows} rows: concatenating gate and up needs the "
                         f"intermediate size I={intermediate} to be a multiple of {rows}")
    zeros = None
    if gate.zeros is not None or up.zeros is not None:  # a symmetric half gets its implicit zero 8
        zeros = torch.cat([torch.full_like(q.scales, 8, dtype=torch.uint8) if q.zeros is None else q.zeros
                           for q in (gate, up)], 1)
    return type(gate)(torch.cat([gate.codes, up.codes], 1), torch.cat([gate.scales, up.scales], 1), gate.block,
                      zeros=zeros, dtype=gate.dtype)


__all__ = ["CHECKPOINT_FORMATS", "read_experts", "detect_format", "read_fp8_experts", "read_mxfp4_experts",
           "read_gptq_experts", "read_awq_experts", "read_compressed_tensors_experts", "cat_rows"]
