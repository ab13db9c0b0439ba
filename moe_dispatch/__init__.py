"""moe-dispatch: fast Mixture-of-Experts dispatch for PyTorch.

route -> make_plan -> permute -> grouped_mm (-> act) -> grouped_mm -> unpermute, with
Triton kernels for GPUs, Numba kernels for CPUs and PyTorch references. Every function
takes backend="auto" | "torch" | "numba" | "triton".
"""

import importlib.metadata as _metadata

from .activations import ACTIVATIONS, Activation
from .backends import BackendUnavailable, available_backends, select_backend
from .experts import ExpertWeights
from .formats.onednn import OneDNNPacked, clear_packed_weights
from .formats.quantized import QuantizedWeight, quantize
from .layers import MoE, MoEAux
from .ops import grouped_mm, make_plan, moe_mlp, permute, unpermute
from .plan import DispatchPlan
from .routing import route
from .warm_up import warm_up

try:
    __version__ = _metadata.version("moe-dispatch")
except _metadata.PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "route",
    "make_plan",
    "permute",
    "grouped_mm",
    "unpermute",
    "moe_mlp",
    "MoE",
    "MoEAux",
    "DispatchPlan",
    "ExpertWeights",
    "Activation",
    "ACTIVATIONS",
    "OneDNNPacked",
    "QuantizedWeight",
    "quantize",
    "available_backends",
    "select_backend",
    "BackendUnavailable",
    "clear_packed_weights",
    "warm_up",
    "__version__",
]
