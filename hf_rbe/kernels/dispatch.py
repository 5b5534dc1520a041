"""Registers the kernels as device implementations of ``hf_rbe::linear`` (defined in ``core.ops``),
the compiled e8p search and stage decode of format v2 (``core.codec_v2.set_cpu_search`` /
``set_cpu_decode``), and the CPU product of a stored bf16 head and one row
(``core.stored.set_cpu_row_product``).

CUDA tensors go to the Triton kernel of their format, CPU tensors to the numba kernel of theirs;
a format without one (or a machine without Triton / numba), and every call inside
``ops.reference_only()``, falls back to the PyTorch reference.
Both libraries are imported on first use, never at import time.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from types import ModuleType
from typing import Optional

import torch

from hf_rbe.core import codec_v2, ops, stored
from hf_rbe.core.format import FORMAT_ID as RBE_V1
from hf_rbe.core.format_v2 import FORMAT_ID as RBE_V2
from hf_rbe.core.seed64_format import FORMAT_ID as SEED64

#: format id -> module with ``supports(layout)`` and ``linear(x, tensors, layout, bias)`` (x's dtype out);
#: the CPU ones also take ``prefill_dtype`` and have ``row_kernel(tensors, layout)`` (``core.ops.RowKernel``).
CUDA_KERNELS: dict[int, str] = {RBE_V1: "hf_rbe.kernels.triton_v1", RBE_V2: "hf_rbe.kernels.triton_v2",
                                SEED64: "hf_rbe.kernels.triton_seed64"}
CPU_KERNELS: dict[int, str] = {RBE_V2: "hf_rbe.kernels.cpu_numba"}


@functools.lru_cache(maxsize=4)
def available(library: str) -> bool:
    return importlib.util.find_spec(library) is not None


@functools.lru_cache(maxsize=16)
def _module(name: Optional[str], library: str) -> Optional[ModuleType]:
    """The kernel module ``name``, or ``None`` when there is none or its library is missing (once per name)."""
    if name is None or not available(library):
        return None
    return importlib.import_module(name)


def _module_for(kernels: dict[int, str], library: str, layout: list[int]) -> Optional[ModuleType]:
    """The kernel module that takes this call, or None: the reference takes it."""
    module = _module(kernels.get(layout[0]), library) if ops.kernels_allowed() else None
    return module if module is not None and module.supports(layout) else None


def _cuda_linear(x: torch.Tensor, tensors: list[torch.Tensor], layout: list[int],
                 bias: Optional[torch.Tensor], prefill_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``prefill_dtype`` is not read: the tile kernels multiply in x's dtype (on a GPU a model's
    activations are in half precision already)."""
    module = _module_for(CUDA_KERNELS, "triton", layout)
    if module is None:
        return ops.reference_linear(x, tensors, layout, bias)
    return module.linear(x, tensors, layout, bias)


def _cpu_linear(x: torch.Tensor, tensors: list[torch.Tensor], layout: list[int],
                bias: Optional[torch.Tensor], prefill_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    module = _module_for(CPU_KERNELS, "numba", layout)
    if module is None:
        return ops.reference_linear(x, tensors, layout, bias)
    return module.linear(x, tensors, layout, bias, prefill_dtype)


def _cpu_row(tensors: list[torch.Tensor], layout: list[int]) -> Optional[ops.RowKernel]:
    module = _module(CPU_KERNELS.get(layout[0]), "numba")
    if module is None or not module.supports(layout):
        return None
    return module.row_kernel(tensors, layout)


ops.register_kernel("cuda", _cuda_linear)
ops.register_kernel("cpu", _cpu_linear, row=_cpu_row)


def _cpu_e8p_search(u: torch.Tensor, mag: torch.Tensor, parity: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    module = _module("hf_rbe.kernels.cpu_search", "numba")
    if module is None:
        return codec_v2.e8p_search(u, mag, parity)
    return module.e8p_search(u, mag, parity)


# both equal the reference bit for bit, so they serve inside ``ops.reference_only()`` too (calibration)
codec_v2.set_cpu_search(_cpu_e8p_search)


def _cpu_decode_stage(stored: torch.Tensor, scale: torch.Tensor, plane: str, table: torch.Tensor,
                      in_features: int) -> torch.Tensor:
    module = _module("hf_rbe.kernels.cpu_decode", "numba")
    if module is None or not module.fits(stored, scale, plane, table, in_features):
        return codec_v2.reference_decode_stage(stored, scale, plane, table, in_features)
    return module.decode_stage(stored, scale, plane, table, in_features)


codec_v2.set_cpu_decode(_cpu_decode_stage)


def _cpu_row_product(weight: torch.Tensor, row: torch.Tensor) -> Optional[torch.Tensor]:
    module = _module("hf_rbe.kernels.cpu_dense", "numba")
    if module is None or not ops.kernels_allowed() or not module.fits(weight):
        return None
    return module.row_product(weight, row)


stored.set_cpu_row_product(_cpu_row_product)
