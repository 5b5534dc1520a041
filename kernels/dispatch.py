"""Registers the kernels as device implementations of ``hf_rbe::linear`` (defined in ``core.ops``).

CUDA tensors go to the Triton kernel of their format; a format without one, or a machine
without Triton, falls back to the PyTorch reference. Triton is imported on the first CUDA
call, never at import time, so CPU-only installs need no Triton.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from typing import Optional

import torch

from hf_rbe.core import ops
from hf_rbe.core.format import FORMAT_ID as RBE_V1
from hf_rbe.core.format_v2 import FORMAT_ID as RBE_V2
from hf_rbe.core.seed64_format import FORMAT_ID as SEED64

#: format id -> module with ``supports(layout)`` and ``linear(x, tensors, layout, bias)`` (x's dtype out).
CUDA_KERNELS: dict[int, str] = {RBE_V1: "hf_rbe.kernels.triton_v1", RBE_V2: "hf_rbe.kernels.triton_v2",
                                SEED64: "hf_rbe.kernels.triton_seed64"}


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


@ops.linear.register_kernel("cuda")
def _cuda_linear(x: torch.Tensor, tensors: list[torch.Tensor], layout: list[int],
                 bias: Optional[torch.Tensor]) -> torch.Tensor:
    name = CUDA_KERNELS.get(layout[0])
    if name is None or not triton_available():
        return ops.reference_linear(x, tensors, layout, bias)
    module = importlib.import_module(name)
    if not module.supports(layout):
        return ops.reference_linear(x, tensors, layout, bias)
    return module.linear(x, tensors, layout, bias)
