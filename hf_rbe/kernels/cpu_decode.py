"""One format-v2 stage decoded to fp32 on the CPU (numba), bit for bit ``core.codec_v2.reference_decode_stage``.

Why: the reference decodes by int64 index arithmetic and a gather into an [N, K/8, 8] tensor, and
calibration decodes every layer several times per fine-tuning step (the forward pass, the
backward's input gradient, each scale's gradient), where nothing is fixed long enough for a
kernel's tiled copy. Here each output weight is one table read, one sign, one scale: the
reference's operations on the same fp32 values (a sign is a multiplication by +-1, exact; one
rounding at the scale), so the result is identical, and it serves inside ``ops.reference_only()``
as the compiled e8p search does. ``tests/kernels/test_cpu_decode.py`` checks the equality.
``cpu_numba``'s prefill decode does the same walk in SIMD vectors but reads fp16 scales (the stored
ones) and may reassociate (``fastmath``); the fine-tunes' scales are fp32 and their results must
not depend on a kernel, hence this one.
"""

from __future__ import annotations

import numba as nb
import numpy as np
import torch

from hf_rbe.core.format_v2 import IDX_OFFSET, PLANES, SIGN_OFFSET, VECTOR_DIM, b1_sign_table, e8p_sign_table

from .threads import follow_torch

_E8P_INDEX = PLANES["e8p"].table_size - 1
_E8P_SIGNS = (1 << PLANES["e8p"].sign) - 1


@nb.njit(cache=True, parallel=True)
def _e8p(codes: np.ndarray, table: np.ndarray, signs: np.ndarray, scale: np.ndarray, out: np.ndarray) -> None:
    n, vectors = codes.shape
    per_group = vectors // scale.shape[1]
    for r in nb.prange(n):
        for g in range(scale.shape[1]):
            s = scale[r, g]
            for v in range(g * per_group, (g + 1) * per_group):
                c = np.int64(codes[r, v]) & 0xFFFF
                idx = (c >> IDX_OFFSET) & _E8P_INDEX
                sign = (c >> SIGN_OFFSET) & _E8P_SIGNS
                for j in range(VECTOR_DIM):
                    out[r, v * VECTOR_DIM + j] = (table[idx, j] * signs[sign, j]) * s


@nb.njit(cache=True, parallel=True)
def _lookup(codes: np.ndarray, values: np.ndarray, scale: np.ndarray, nibbles: bool, out: np.ndarray) -> None:
    """``values[code] * scale`` per 8-vector; ``nibbles``: two 4-bit codes per byte, low first."""
    n = out.shape[0]
    vectors = out.shape[1] // VECTOR_DIM
    per_group = vectors // scale.shape[1]
    for r in nb.prange(n):
        for g in range(scale.shape[1]):
            s = scale[r, g]
            for v in range(g * per_group, (g + 1) * per_group):
                if nibbles:
                    byte = np.int64(codes[r, v >> 1])
                    c = (byte >> 4) if v & 1 else (byte & 0xF)
                else:
                    c = np.int64(codes[r, v])
                for j in range(VECTOR_DIM):
                    out[r, v * VECTOR_DIM + j] = values[c, j] * s


def fits(stored: torch.Tensor, scale: torch.Tensor, plane: str, table: torch.Tensor, in_features: int) -> bool:
    """Whether the arguments have the shapes and dtypes the kernels index by (anything else goes to
    the reference, which raises its own error: the kernels do not check bounds)."""
    p = PLANES.get(plane)
    if p is None or stored.dtype != p.storage_dtype or stored.dim() != 2 or scale.dim() != 2:
        return False
    vectors, rows = in_features // VECTOR_DIM, p.table_size
    return (in_features % VECTOR_DIM == 0 and stored.shape[1] * p.codes_per_byte == vectors
            and scale.shape[0] == stored.shape[0] and scale.shape[1] > 0 and vectors % scale.shape[1] == 0
            and tuple(table.shape) == (rows, VECTOR_DIM) and table.is_floating_point())


def decode_stage(stored: torch.Tensor, scale: torch.Tensor, plane: str, table: torch.Tensor,
                 in_features: int) -> torch.Tensor:
    """fp32 [N, in_features] of one stage: ``core.codec_v2.reference_decode_stage`` for CPU tensors that
    :func:`fits` (no autograd)."""
    follow_torch()
    s = np.ascontiguousarray(scale.detach().float().numpy())
    t = table.detach().float()
    out = np.empty((stored.shape[0], in_features), np.float32)
    codes = np.ascontiguousarray(stored.numpy())
    if plane == "e8p":
        _e8p(codes, np.ascontiguousarray(t.numpy()), e8p_sign_table().numpy(), s, out)
    else:
        # b1: the reference's sign rows times the one table row, the same exact products, formed once
        values = b1_sign_table() * t[0] if plane == "b1" else t
        _lookup(codes, np.ascontiguousarray(values.numpy()), s, PLANES[plane].codes_per_byte == 2, out)
    return torch.from_numpy(out)
