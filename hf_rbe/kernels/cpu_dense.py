"""A bf16 weight times one row on the CPU (numba): a decoding step's stored head.

Why: a head stored in bf16 (``embedding_dtype="bfloat16"``) reads more bytes per decoding step than
all of a small model's coded layers (SmolLM2-135M: 28M weights against 106M at three bits), and
torch's bf16 matrix-vector product reads them well below this machine's bandwidth. Here each row's
weights are widened to fp32 (exact: a bf16 is the top half of an fp32) and multiplied into the row
by fused multiply-adds, eight rows per iteration sharing each load of the row, the rows split over
the threads. The sums are exact products added in fp32, in another order than torch's, so a result
rounded to bf16 differs from ``torch.mv``'s by at most a last-bit step where a sum sits on a
rounding boundary (``hf_rbe/kernels/NOTES.md``).
"""

from __future__ import annotations

import numba as nb
import numpy as np
import torch

from .cpu_simd import LANES, vfma, vload, vload_bf16, vsum, vzero
from .threads import follow_torch

#: Output rows per iteration: eight independent FMA chains per row block (fewer left the short rows
#: of a small model's head waiting on each chain's latency).
_ROWS = 8


@nb.njit(cache=True, parallel=True)
def _rows(w: np.ndarray, x: np.ndarray, k: int, out: np.ndarray) -> None:
    """``out[n] = sum_j w[n, j] x[j]`` for ``w`` the flat bf16 bits [N * K] (K a multiple of 8)."""
    n = out.shape[0]
    blocks = n // _ROWS
    for q in nb.prange(blocks):
        base = np.int64(q) * _ROWS * k
        a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = vzero()
        for c in range(0, k, LANES):
            xv = vload(x, c)
            a0 = vfma(vload_bf16(w, base + c), xv, a0)
            a1 = vfma(vload_bf16(w, base + k + c), xv, a1)
            a2 = vfma(vload_bf16(w, base + 2 * k + c), xv, a2)
            a3 = vfma(vload_bf16(w, base + 3 * k + c), xv, a3)
            a4 = vfma(vload_bf16(w, base + 4 * k + c), xv, a4)
            a5 = vfma(vload_bf16(w, base + 5 * k + c), xv, a5)
            a6 = vfma(vload_bf16(w, base + 6 * k + c), xv, a6)
            a7 = vfma(vload_bf16(w, base + 7 * k + c), xv, a7)
        r = q * _ROWS
        out[r] = vsum(a0)
        out[r + 1] = vsum(a1)
        out[r + 2] = vsum(a2)
        out[r + 3] = vsum(a3)
        out[r + 4] = vsum(a4)
        out[r + 5] = vsum(a5)
        out[r + 6] = vsum(a6)
        out[r + 7] = vsum(a7)
    for r in range(blocks * _ROWS, n):
        a = vzero()
        for c in range(0, k, LANES):
            a = vfma(vload_bf16(w, r * k + c), vload(x, c), a)
        out[r] = vsum(a)


def fits(weight: torch.Tensor) -> bool:
    """Whether :func:`row_product` takes this weight: a contiguous bf16 [N, K] CPU matrix, K a
    multiple of the vectors' eight lanes."""
    return (weight.dtype == torch.bfloat16 and weight.dim() == 2 and weight.is_cpu and weight.is_contiguous()
            and weight.shape[1] % LANES == 0)


def row_product(weight: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
    """fp32 [N]: ``weight`` (``fits``) times ``row`` [K] (any float dtype, used as given: the caller
    rounds it to bf16 where the product is a bf16 one), the products summed in fp32."""
    follow_torch()
    n, k = weight.shape
    x = np.ascontiguousarray(row.detach().reshape(k).float().numpy())
    out = np.empty(n, dtype=np.float32)
    _rows(weight.detach().view(torch.int16).numpy().reshape(-1), x, k, out)
    return torch.from_numpy(out)
