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

read_deepseek_v3_layer reads a whole MoE layer (router, correction bias, routed and shared
experts) from a DeepSeek-V3 checkpoint directory as it ships, shard by shard:

    layer = read_deepseek_v3_layer("DeepSeek-V3", 3)       # an MoE with FP8 experts, 11 GB

| format | tensors under {prefix}.experts |
| "fp8" (DeepSeek-V3) | {e}.{gate,up,down}_proj.weight float8_e4m3fn, .weight_scale_inv |
| "mxfp4" (gpt-oss) | gate_up_proj_blocks/_scales/_bias, down_proj_blocks/_scales/_bias |
| "gptq", "awq" | {e}.{gate,up,down}_proj.qweight, .qzeros, .scales (gptq: [.g_idx]) |
| "compressed-tensors" | {e}.{gate,up,down}_proj.weight_packed (or int8 .weight), .weight_scale [, .weight_zero_point] |

Gate and up become one w_gate_up [E, 2I, H] by stacking their rows (codes, scales and zero
points alike); the packed codes are rearranged by QuantizedWeight's importers, never widened.
Experts stored one by one are read one at a time into the layer's tensors, allocated once.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Optional

import torch

from ..activations import CLAMPED_SWIGLU
from ..experts import ExpertWeights
from ..formats.quantized import QuantizedWeight
from ..layers import MoE

Tensor = torch.Tensor
CHECKPOINT_FORMATS = ("fp8", "mxfp4", "gptq", "awq", "compressed-tensors")
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


class _Tensors:
    """name -> tensor over dicts, safe_open handles or shard files; a tensor is loaded when
    asked for. A shard file is opened when first asked for and closed when another one is:
    reading in the order of `rank` opens each once and keeps one open at a time; the
    tensors named to read_along (small ones, asked for later) are read when their shard is."""

    def __init__(self, checkpoint):
        sources = checkpoint if isinstance(checkpoint, (list, tuple)) else [checkpoint]
        self.where = {name: source for source in sources for name in source.keys()}
        self._ranks = {id(source): i for i, source in enumerate(sources)}
        self._open: Optional[tuple] = None  # (path, safe_open handle) of the shard file open now
        self._along: set = set()
        self._read: dict = {}  # name -> tensor, read along with its shard

    @classmethod
    def from_directory(cls, directory: Path) -> "_Tensors":
        """A checkpoint directory: its shards as model.safetensors.index.json lists them (or
        its one model.safetensors), opened only when read."""
        index = directory / "model.safetensors.index.json"
        if not index.exists():
            single = directory / "model.safetensors"
            if not single.exists():
                raise FileNotFoundError(f"{directory} holds neither model.safetensors.index.json nor model.safetensors")
            from safetensors import safe_open

            with safe_open(single, "pt") as f:
                names = list(f.keys())
            weight_map = dict.fromkeys(names, single.name)
        else:
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index} has no weight_map (tensor name -> shard file)")
        tensors = cls([])
        shards = {file: directory / file for file in sorted(set(weight_map.values()))}
        tensors.where = {name: shards[file] for name, file in weight_map.items()}
        tensors._ranks = {id(path): i for i, path in enumerate(shards.values())}
        return tensors

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def rank(self, name: str) -> int:
        """Where name's source comes among the sources (a missing name: first, to fail early)."""
        return self._ranks.get(id(self.where.get(name)), -1)

    def read_along(self, names) -> None:
        """Read these tensors when their shard file is opened for others."""
        self._along.update(names)

    def get(self, name: str, needed_for: str) -> Tensor:
        source = self.where.get(name)
        if source is None:
            raise KeyError(f"the checkpoint has no tensor {name!r} ({needed_for})")
        if name in self._read:
            return self._read.pop(name)
        if isinstance(source, Mapping):
            return source[name]
        if isinstance(source, Path):
            source = self._shard(source, name)
        return source.get_tensor(name)

    def _shard(self, path: Path, name: str):
        if self._open is None or self._open[0] != path:
            self.close()
            if not path.exists():
                raise FileNotFoundError(f"the shard {path} is missing (the index puts {name!r} there)")
            from safetensors import safe_open

            try:  # each tensor read into memory of its own: no page of the shard stays mapped while it is open
                handle = safe_open(path, "pt", backend="pread")
            except TypeError:  # an older safetensors maps the file: the pages read count as resident till closed
                handle = safe_open(path, "pt")
            handle.__enter__()
            self._open = (path, handle)
            for along in [n for n in self._along if self.where.get(n) == path]:
                self._read[along] = handle.get_tensor(along)
                self._along.discard(along)
        return self._open[1]

    def close(self) -> None:
        """Close the shard file open now, if any."""
        if self._open is not None:
            self._open[1].__exit__(None, None, None)
            self._open = None


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
    """Experts stored one by one ({prefix}.experts.{e}.{gate,up,down}_proj.{name}), each
    projection of each expert imported by import_one(dict name -> [tensor], or None for an
    optional one absent) and copied into place: what is resident is the experts' bytes and one
    expert's tensors. They are read in the order of the sources that hold them (each shard
    file opened once)."""
    tensors = _as_tensors(checkpoint)
    base = f"{prefix}.experts"
    if num_experts is None:
        numbered = {int(m.group(1)) for name in tensors.where if (m := re.match(rf"{re.escape(base)}\.(\d+)\.", name))}
        if not numbered:
            raise KeyError(f"the checkpoint has no tensor {base + '.0.gate_proj.' + names[0]!r} ({format} experts)")
        num_experts = max(numbered) + 1
    why = f"{format} experts under {prefix!r}"

    def imported(name: str) -> QuantizedWeight:
        given = {n: [tensors.get(f"{name}.{n}", why)] for n in names}
        given.update({n: [tensors.get(f"{name}.{n}", why)] if f"{name}.{n}" in tensors else None for n in optional})
        try:
            return import_one(given)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{name}: {exc}") from None

    gate_up, down = _Stacked(num_experts, 2), _Stacked(num_experts, 1)
    where = {"gate_proj": (gate_up, 0), "up_proj": (gate_up, 1), "down_proj": (down, 0)}
    parts = sorted(((e, proj) for e in range(num_experts) for proj in PROJECTIONS),
                   key=lambda part: tensors.rank(f"{base}.{part[0]}.{part[1]}.{names[0]}"))
    for e, proj in parts:
        name = f"{base}.{e}.{proj}"
        stacked, part = where[proj]
        stacked.put(e, part, imported(name), name)
    return ExpertWeights(gate_up.weight(), down.weight(), activation=activation)


class _Stacked:
    """The weight [E, parts * N, K] of E experts, filled from QuantizedWeights of one expert
    and one part each (gate and up: the parts of w_gate_up, gate rows first), its codes,
    scales and zero points allocated at the first one."""

    def __init__(self, num_experts: int, parts: int):
        self.num_experts, self.parts = num_experts, parts
        self.first: Optional[tuple[str, QuantizedWeight]] = None
        self.codes = self.scales = self.zeros = None

    def put(self, expert: int, part: int, q: QuantizedWeight, name: str) -> None:
        if self.first is None:
            self._allocate(q, name)
        first_name, first = self.first
        if type(q) is not type(first) or q.block != first.block or q.shape[1:] != first.shape[1:]:
            raise ValueError(f"{name} is {q}, unlike {first_name}, {first}: the experts' projections must agree")
        rows, scale_rows = q.codes.shape[1], q.scales.shape[1]
        self.codes[expert, part * rows:(part + 1) * rows] = q.codes[0]
        self.scales[expert, part * scale_rows:(part + 1) * scale_rows] = q.scales[0]
        if q.zeros is not None:
            if self.zeros is None:  # the experts read before hold the implicit zero 8
                self.zeros = torch.full(self.scales.shape, 8, dtype=torch.uint8, device=self.scales.device)
            self.zeros[expert, part * scale_rows:(part + 1) * scale_rows] = q.zeros[0]

    def _allocate(self, q: QuantizedWeight, name: str) -> None:
        rows, intermediate = q.block[0], q.shape[1]
        if self.parts > 1 and intermediate % rows:
            raise ValueError(f"{name}: {q.format} scales cover blocks of {rows} rows: stacking gate and up needs "
                             f"the intermediate size I={intermediate} to be a multiple of {rows}")
        self.first = (name, q)
        self.codes = q.codes.new_empty((self.num_experts, self.parts * q.codes.shape[1], q.codes.shape[2]))
        self.scales = q.scales.new_empty((self.num_experts, self.parts * q.scales.shape[1], q.scales.shape[2]))

    def weight(self) -> QuantizedWeight:
        _, first = self.first
        return type(first)(self.codes, self.scales, first.block, zeros=self.zeros, dtype=first.dtype)


# ---- a whole DeepSeek-V3 MoE layer from its checkpoint directory ---------------------------


def read_deepseek_v3_layer(directory, layer: int, *, dtype: torch.dtype = torch.bfloat16,
                           backend: str = "auto") -> MoE:
    """MoE layer `layer` of a DeepSeek-V3 checkpoint directory as it ships (DeepSeek-V3, R1,
    and models built the same way): an MoE with its routed experts in FP8, and its router,
    correction bias and shared experts as float parameters of `dtype`.

    The directory holds config.json (n_routed_experts, num_experts_per_tok, n_group,
    topk_group, routed_scaling_factor, norm_topk_prob, n_shared_experts, first_k_dense_replace)
    and safetensors shards listed by model.safetensors.index.json, with, under
    f"model.layers.{layer}.mlp": gate.weight [E, H] and gate.e_score_correction_bias [E];
    experts.{e}.{gate,up,down}_proj.weight float8_e4m3fn [N, K] and .weight_scale_inv
    float32 [ceil(N/128), ceil(K/128)]; shared_experts.{gate,up,down}_proj.weight (FP8 with
    its weight_scale_inv, dequantized here, or float).

    Read shard by shard, each expert copied into place as it is read: the layer holds the
    experts' FP8 bytes and scales (11.3 GB for DeepSeek-V3), never a float copy of them. A
    missing file or tensor raises naming it; a tensor of the wrong shape or dtype, a ValueError
    or TypeError naming it.
    """
    directory = Path(directory)
    config = _read_json(directory / "config.json")

    def option(key: str, default=None):
        if key not in config and default is None:
            raise KeyError(f"{directory / 'config.json'} has no {key!r}, which DeepSeek-V3's MoE layers need")
        return config.get(key, default)

    if layer < option("first_k_dense_replace", 0):
        raise ValueError(f"layer {layer} is a dense MLP: the MoE layers start at first_k_dense_replace="
                         f"{config['first_k_dense_replace']}")
    prefix = f"model.layers.{layer}.mlp"
    num_experts = option("n_routed_experts")
    tensors = _Tensors.from_directory(directory)
    small = [f"{prefix}.gate.{name}" for name in ("weight", "e_score_correction_bias")]
    small += [f"{prefix}.shared_experts.{proj}.{name}" for proj in PROJECTIONS for name in ("weight", "weight_scale_inv")]
    tensors.read_along(small)
    try:
        experts = read_fp8_experts(tensors, prefix, num_experts=num_experts, dtype=dtype)
        moe = MoE.from_experts(experts, option("num_experts_per_tok"), scoring="sigmoid",
                               renormalize=bool(option("norm_topk_prob", True)), n_groups=option("n_group"),
                               topk_groups=option("topk_group"), routed_scaling=float(option("routed_scaling_factor")),
                               n_shared_experts=option("n_shared_experts", 0), backend=backend)
        hidden, width = experts.hidden_size, moe.intermediate_size * option("n_shared_experts", 0)
        why = f"the MoE layer {prefix!r}"
        moe_tensors = [(moe.router.weight, f"{prefix}.gate.weight", (num_experts, hidden)),
                       (moe.expert_bias, f"{prefix}.gate.e_score_correction_bias", (num_experts,))]
        if width:
            gate_up, down = moe.shared_experts.gate_up.weight, moe.shared_experts.down.weight
            shared = f"{prefix}.shared_experts"
            moe_tensors += [(gate_up[:width], f"{shared}.gate_proj", (width, hidden)),
                            (gate_up[width:], f"{shared}.up_proj", (width, hidden)),
                            (down, f"{shared}.down_proj", (hidden, width))]
        with torch.no_grad():
            for ours, name, shape in moe_tensors:
                ours.copy_(_float_tensor(tensors, name, shape, why))
    finally:
        tensors.close()
    return moe


def _float_tensor(tensors: _Tensors, name: str, shape: tuple, why: str) -> Tensor:
    """The tensor `name`, or the weight under `name`: float, or FP8 with its weight_scale_inv
    (dequantized), checked against `shape`."""
    weight_name = name if name.endswith(("weight", "bias")) else f"{name}.weight"
    weight = tensors.get(weight_name, why)
    if tuple(weight.shape) != shape:
        raise ValueError(f"{weight_name} must have shape {shape}, got {tuple(weight.shape)}")
    if weight.dtype == torch.float8_e4m3fn:
        try:
            return QuantizedWeight.from_fp8_blocks([weight], [tensors.get(f"{name}.weight_scale_inv", why)],
                                                   dtype=torch.float32).dequantize()[0]
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{name}: {exc}") from None
    if not weight.is_floating_point():
        raise TypeError(f"{weight_name} must be float (or float8_e4m3fn with a weight_scale_inv), got {weight.dtype}")
    return weight


def _read_json(path: Path) -> dict:
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing")
    with open(path) as f:
        return json.load(f)


__all__ = ["CHECKPOINT_FORMATS", "read_experts", "detect_format", "read_fp8_experts", "read_mxfp4_experts",
           "read_gptq_experts", "read_awq_experts", "read_compressed_tensors_experts", "read_deepseek_v3_layer"]
