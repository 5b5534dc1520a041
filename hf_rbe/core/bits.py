"""Bit streams: fixed-width codes packed little-endian into int32 words, one stream per row.

Code ``j`` of a row occupies bits ``[j*width, (j+1)*width)``; word ``i`` holds bits
``[32*i, 32*i+32)``; the unused high bits of a row's last word are zero (checked on load).
"""

from __future__ import annotations

import torch

from .spec import n_words

_U32 = 0xFFFFFFFF

def pack_codes(codes: torch.Tensor, width: int) -> torch.Tensor:
    """Pack ``codes`` [rows, n] (values < 2**width) into int32 words [rows, ceil(n*width/32)]."""
    rows, n = codes.shape
    words = n_words(n, width)
    codes = codes.to(torch.int64)
    bit = torch.arange(n, device=codes.device, dtype=torch.int64) * width
    word, shift = bit // 32, bit % 32
    out = torch.zeros(rows, words + 1, dtype=torch.int64, device=codes.device)
    lo = (codes << shift) & _U32
    hi = codes >> (32 - shift)  # bits that spill into the next word (0 when none do)
    out.index_add_(1, word, lo)  # fields never overlap, so add == or
    out.index_add_(1, word + 1, hi)
    out = out[:, :words]
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)  # as signed int32


def unpack_codes(words: torch.Tensor, width: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: int32 words [rows, W] -> int64 codes [rows, n]."""
    rows = words.shape[0]
    w64 = torch.cat([words, words.new_zeros(rows, 1)], dim=1).to(torch.int64) & _U32
    bit = torch.arange(n, device=words.device, dtype=torch.int64) * width
    word, shift = bit // 32, bit % 32
    both = w64[:, word] | (w64[:, word + 1] << 32)
    return (both >> shift) & ((1 << width) - 1)


def padding_is_clean(words: torch.Tensor, width: int, n: int) -> bool:
    """True if the unused bits after the last code of every row are zero."""
    used = n * width
    if used % 32 == 0:
        return True
    last = words[:, used // 32].to(torch.int64) & _U32
    return bool(((last >> (used % 32)) == 0).all())
