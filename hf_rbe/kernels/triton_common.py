"""What the Triton kernels of every format share: the device check and constants made once per device.

Imported only by the Triton kernel modules (``triton_v1``, ``triton_v2``, ``triton_seed64``), which
are themselves imported on first use by ``dispatch``; nothing here imports Triton.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

_CONSTANTS: dict[tuple, torch.Tensor] = {}


def check_device(x: torch.Tensor) -> None:
    """Triton kernels run on CUDA tensors (or anywhere under ``TRITON_INTERPRET=1``, slowly); say so
    instead of Triton's "0 active drivers". A model on the CPU reaches the numba kernels through
    ``hf_rbe::linear`` without calling these."""
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(f"hf-rbe's Triton kernels need CUDA tensors, got a {x.device.type} tensor: move the model "
                           "to a GPU, or call the layer (CPU tensors use the numba kernel), or set "
                           "TRITON_INTERPRET=1 before importing triton to run them (slowly) on the CPU")


def constant(key: tuple, make: Callable[[], torch.Tensor]) -> torch.Tensor:
    """A kernel-side constant (a sign table, split-K counters), made once per key (include the
    device and dtype in the key)."""
    if key not in _CONSTANTS:
        _CONSTANTS[key] = make()
    return _CONSTANTS[key]
