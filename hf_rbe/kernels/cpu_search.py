"""The encoder's e8p nearest-codeword search on the CPU (numba), bit for bit ``core.codec_v2.e8p_search``.

Why: encoding spends most of its time in this search (one per 8 weights, repeated by the scale
fit and by LDLQ's passes), and the PyTorch reference builds an [n, 512, 8] product per chunk of
vectors. Here each vector's 512 scores go through one scratch row, threads over blocks of vectors.
Bit for bit: the same operations in the same order, in the input's dtype (no ``fastmath``, so no
reassociation and no fused multiply-adds; doubling by adding a value to itself, exact as the
reference's ``2 *``), the first least score and the first least flip cost taken, as the reference's
``argmin`` takes them. ``tests/kernels/test_cpu_search.py`` checks the equality, ties included.
"""

from __future__ import annotations

import numba as nb
import numpy as np
import torch

from hf_rbe.core.codec_v2 import sequential_sum
from hf_rbe.core.format_v2 import VECTOR_DIM

from .threads import follow_torch

_BLOCK = 256  # vectors per parallel task: one scratch row each, reused


@nb.njit(cache=True, parallel=True)
def _search(u: np.ndarray, mag_t: np.ndarray, msq: np.ndarray, parity: np.ndarray,
            idx: np.ndarray, flip: np.ndarray) -> None:
    n, entries = u.shape[0], mag_t.shape[1]
    for b in nb.prange((n + _BLOCK - 1) // _BLOCK):
        score = np.empty(entries, u.dtype)
        for i in range(b * _BLOCK, min(n, (b + 1) * _BLOCK)):
            a0, a1, a2, a3 = abs(u[i, 0]), abs(u[i, 1]), abs(u[i, 2]), abs(u[i, 3])
            a4, a5, a6, a7 = abs(u[i, 4]), abs(u[i, 5]), abs(u[i, 6]), abs(u[i, 7])
            odd = 0
            for j in range(VECTOR_DIM):
                odd += u[i, j] < 0
            odd %= 2
            for e in range(entries):  # vectorized over entries: no reduction crosses them
                p0, p1, p2, p3 = a0 * mag_t[0, e], a1 * mag_t[1, e], a2 * mag_t[2, e], a3 * mag_t[3, e]
                p4, p5, p6, p7 = a4 * mag_t[4, e], a5 * mag_t[5, e], a6 * mag_t[6, e], a7 * mag_t[7, e]
                dot = p0 + p1
                dot = dot + p2
                dot = dot + p3
                dot = dot + p4
                dot = dot + p5
                dot = dot + p6
                dot = dot + p7
                s = msq[e] - (dot + dot)
                pen = min(min(min(p0, p1), min(p2, p3)), min(min(p4, p5), min(p6, p7)))
                twice = pen + pen
                score[e] = s + (twice + twice) if parity[e] != odd else s
            best = 0
            for e in range(1, entries):
                if score[e] < score[best]:
                    best = e
            idx[i] = best
            flip[i] = -1
            if parity[best] != odd:
                j_best = 0
                cost = abs(u[i, 0]) * mag_t[0, best]
                for j in range(1, VECTOR_DIM):
                    c = abs(u[i, j]) * mag_t[j, best]
                    if c < cost:
                        cost, j_best = c, j
                flip[i] = j_best


def e8p_search(u: torch.Tensor, mag: torch.Tensor, parity: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``core.codec_v2.e8p_search`` for CPU ``u`` [n, 8] of fp32 or fp64 (``mag`` in ``u``'s dtype)."""
    follow_torch()
    msq = sequential_sum(mag * mag)  # |m_e|^2 by the reference's own function: both score from one value
    idx = np.empty(u.shape[0], np.int64)
    flip = np.empty(u.shape[0], np.int64)
    _search(np.ascontiguousarray(u.detach().numpy()), np.ascontiguousarray(mag.T.numpy()), msq.numpy(),
            parity.to(torch.int64).numpy(), idx, flip)
    return torch.from_numpy(idx), torch.from_numpy(flip)
