"""The scalar baseline the benchmarks and tests compare RBE with: asymmetric min-max b-bit per group."""

from __future__ import annotations

import torch


def minmax_quantize(w: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """``w`` rounded to ``2**bits`` levels per group of ``group`` consecutive weights, from the
    group's min to its max; scale and zero stored in fp16, so this costs ``bits + 32 / group``
    bits per weight."""
    if w.numel() % group:
        raise ValueError(f"{w.numel()} weights do not split into groups of {group}")
    g = w.float().reshape(-1, group)
    lo, hi = g.amin(1, keepdim=True), g.amax(1, keepdim=True)
    s = ((hi - lo) / (2**bits - 1)).half().float().clamp_min(1e-12)
    lo = lo.half().float()
    return (((g - lo) / s).round().clamp(0, 2**bits - 1) * s + lo).reshape(w.shape).to(w.dtype)
