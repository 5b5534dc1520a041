"""PyTorch reference for the RBE kernels: plain tensor ops, raw arguments, no hf_rbe imports.

It is written from the format description alone (``hf_rbe/format.py`` docstring), so it is a
second, independent implementation of the decoder that the Triton kernels and the codec are
both checked against.

Arguments shared by every function:
    words   int32 [N, W]  packed codes, one little-endian bit stream per row
    scale   fp16  [N, G]  group scales (G groups of in_features // G weights)
    table   fp32  [T, dim] unit basis vectors
    lut     fp32  [C, L]  gain curves
    fields  (idx, sign, amp, deriv, cat, sub, amp_fine) widths in bits
"""

from __future__ import annotations

import torch

FIELD_ORDER = ("amp_fine", "cat", "sub", "idx", "sign", "deriv", "amp")  # MSB -> LSB


def _codes(words: torch.Tensor, width: int, n: int) -> torch.Tensor:
    w = words.to(torch.int64) & 0xFFFFFFFF
    w = torch.cat([w, torch.zeros_like(w[:, :1])], dim=1)
    start = torch.arange(n, device=words.device) * width
    lo, hi = w[:, start // 32], w[:, start // 32 + 1]
    return ((lo | (hi << 32)) >> (start % 32)) & ((1 << width) - 1)


def decode_reference(
    words: torch.Tensor, scale: torch.Tensor, table: torch.Tensor, lut: torch.Tensor,
    fields: tuple[int, int, int, int, int, int, int], dim: int, in_features: int,
) -> torch.Tensor:
    """fp32 [N, in_features]: the weight described by the codes (rotated basis)."""
    idx_b, sign_b, amp_b, deriv_b, cat_b, sub_b, fine_b = fields
    widths = dict(zip(("idx", "sign", "amp", "deriv", "cat", "sub", "amp_fine"), fields))
    width = sum(fields)
    codes = _codes(words, width, in_features // dim)
    val, pos = {}, 0
    for name in reversed(FIELD_ORDER):
        val[name] = (codes >> pos) & ((1 << widths[name]) - 1)
        pos += widths[name]
    vec = table.float()[val["idx"]]  # [N, V, dim]
    if deriv_b:
        pairs = vec.reshape(*vec.shape[:-1], dim // 2, 2)
        dvec = torch.stack([-pairs[..., 1], pairs[..., 0]], -1).reshape(vec.shape)
        vec = torch.where(val["deriv"][..., None] == 1, dvec, vec)
    q = (val["amp"] << fine_b) | val["amp_fine"]
    gain = lut.float()[(val["cat"] << sub_b) | val["sub"], q]
    gain = torch.where(val["sign"] == 1, -gain, gain)
    per_group = (in_features // dim) // scale.shape[1]
    gain = gain * scale.float().repeat_interleave(per_group, dim=1)
    return (vec * gain[..., None]).reshape(words.shape[0], in_features)


def rbe_matmul_reference(
    x: torch.Tensor, words: torch.Tensor, scale: torch.Tensor, table: torch.Tensor, lut: torch.Tensor,
    fields: tuple[int, int, int, int, int, int, int], dim: int,
) -> torch.Tensor:
    """``x @ W^T`` in fp32 for already-rotated activations ``x`` [M, K]."""
    w = decode_reference(words, scale, table, lut, fields, dim, x.shape[-1])
    return x.float() @ w.T


def int_residual_reference(words: torch.Tensor, scale: torch.Tensor, bits: int, group: int, in_features: int) -> torch.Tensor:
    """fp32 [N, in_features] of a packed unsigned-offset integer residual: (q - (2^b - 1) / 2) * scale."""
    q = _codes(words, bits, in_features).float() - ((1 << bits) - 1) / 2
    return q * scale.float().repeat_interleave(group, dim=1)


def fp8_residual_reference(values: torch.Tensor, scale: torch.Tensor, group: int) -> torch.Tensor:
    """fp32 [N, K] of an e4m3fn residual with group scales."""
    return values.float() * scale.float().repeat_interleave(group, dim=1)


def hadamard_rotate_reference(x: torch.Tensor, signs: torch.Tensor, block: int) -> torch.Tensor:
    """``x S H`` per block, with the Sylvester Hadamard matrix built by doubling."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < block:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    h = (h / block**0.5).to(x.device)
    y = (x.double() * signs.double()).reshape(*x.shape[:-1], -1, block) @ h
    return y.reshape(x.shape).float()
