"""Handing freed heap memory back to the operating system during calibration.

glibc keeps freed memory resident: once a large block is freed, its dynamic mmap threshold rises and
later tensors of that size come from the heap, where small long-lived allocations pin them. A
calibration allocates and frees one layer's decoded weights over and over, so without this its
resident size follows the largest transient working set it ever had plus fragmentation, not what
it holds. ``trim`` runs at block boundaries (forward and backward); it only trims when the heap
holds more than ``SLACK`` freed bytes, because a trim makes the next allocations fault their pages
in again. A no-op where glibc's ``malloc_trim`` is missing (macOS, musl).
"""

from __future__ import annotations

import ctypes
from typing import Any

import torch

#: Freed bytes the heap may keep before a trim hands them back.
SLACK = 16 * 2**20


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _libc() -> Any:
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    if not hasattr(libc, "malloc_trim"):
        return None
    if hasattr(libc, "mallinfo2"):  # glibc >= 2.33
        libc.mallinfo2.restype = _MallInfo2
    return libc


_LIBC = _libc()


def freed_bytes() -> int | None:
    """Bytes the heap holds freed (``None``: unknown on this C library)."""
    if _LIBC is None or not hasattr(_LIBC, "mallinfo2"):
        return None
    return int(_LIBC.mallinfo2().fordblks)


def trim(slack: int = SLACK) -> None:
    """Hand freed heap memory back to the operating system when more than ``slack`` bytes of it are held."""
    if _LIBC is None:
        return
    held = freed_bytes()
    if held is None or held > slack:
        _LIBC.malloc_trim(0)


class TrimBoundary(torch.autograd.Function):
    """The identity, trimming the heap when a block's forward starts and when its backward ends
    (the gradient flows through the block's input last)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        trim()
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        trim()
        return g
