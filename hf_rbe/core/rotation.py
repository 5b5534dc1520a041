"""Randomized Hadamard rotation on the input side (incoherence processing).

Weights ``W`` [N, K] are stored as ``W_rot = W S H``, with ``S`` a diagonal of random signs
drawn from a 64-bit seed and ``H`` a block-diagonal orthonormal Sylvester-Hadamard matrix.
Because ``S H`` is orthogonal, ``x W^T = (x S H) W_rot^T``: the forward pass rotates the
activations the same way and never needs ``W`` back. The rotation spreads outliers across a
block so that rotated rows look like i.i.d. Gaussian samples, which is what the shared basis
table is fitted to.
"""

from __future__ import annotations

import functools
from typing import Any

import torch


@functools.lru_cache(maxsize=16)
def _hadamard_cpu(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / n**0.5


def hadamard(n: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
    """Orthonormal symmetric Sylvester-Hadamard matrix of size ``n`` (a power of two)."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Hadamard size must be a power of two, got {n}")
    return _hadamard_cpu(n).to(dtype=dtype, device=device)


def random_signs(seed: int, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """±1 vector of length ``n`` from a 64-bit seed (CPU generator: same on every machine)."""
    g = torch.Generator().manual_seed(int(seed) & 0xFFFF_FFFF_FFFF_FFFF)
    bits = torch.randint(0, 2, (n,), generator=g)
    return (1 - 2 * bits).to(dtype=torch.float32, device=device)


def rotate(x: torch.Tensor, signs: torch.Tensor, block: int) -> torch.Tensor:
    """``x S H`` along the last dim of ``x`` (any leading dims), in ``x``'s dtype."""
    k = x.shape[-1]
    h = hadamard(block, dtype=x.dtype, device=x.device)
    y = (x * signs.to(x.dtype)).reshape(*x.shape[:-1], k // block, block) @ h
    return y.reshape(x.shape)


def unrotate(y: torch.Tensor, signs: torch.Tensor, block: int) -> torch.Tensor:
    """Inverse of :func:`rotate`: ``y H S`` (H is symmetric and orthonormal)."""
    k = y.shape[-1]
    h = hadamard(block, dtype=y.dtype, device=y.device)
    x = (y.reshape(*y.shape[:-1], k // block, block) @ h).reshape(y.shape)
    return x * signs.to(y.dtype)


def rotate_weight(weight: torch.Tensor, spec: Any, rotation_seed: int) -> torch.Tensor:
    """fp32 ``W S H`` (or ``W`` when ``spec.rotation`` is off): the matrix a layer's codes describe
    (``spec``: any layer format with ``rotation`` and ``hadamard_block``)."""
    w = weight.float()
    if not spec.rotation:
        return w
    k = w.shape[1]
    return rotate(w, random_signs(rotation_seed, k, device=w.device), spec.hadamard_block(k))
