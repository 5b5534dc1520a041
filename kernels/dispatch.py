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
from hf_rbe.core.seed64_format import FORMAT_ID as SEED64

#: format id -> module whose ``linear(x, tensors, layout)`` computes x W^T in fp32 on CUDA.
CUDA_KERNELS: dict[int, str] = {RBE_V1: "hf_rbe.kernels.triton_v1", SEED64: "hf_rbe.kernels.triton_seed64"}


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


@ops.linear.register_kernel("cuda")
def _cuda_linear(x: torch.Tensor, tensors: list[torch.Tensor], layout: list[int],
                 bias: Optional[torch.Tensor]) -> torch.Tensor:
    module = CUDA_KERNELS.get(layout[0])
    if module is None or not triton_available():
        return ops.reference_linear(x, tensors, layout, bias)
    y = importlib.import_module(module).linear(x, tensors, layout)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
