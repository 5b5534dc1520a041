"""Triton generator for seed64 tiles: one program per tile, every weight computed from its seed.

Mirrors ``hf_rbe.core.seed64.generate`` (the PyTorch reference) in fp32; field offsets and
widths come from ``core.seed64_format``, the generator's constants from ``core.seed64``. The
cell geometry (polar angle and hyperbolic radius of each (i, j)) is the same for every tile,
so it comes in as two small [T*T] tensors; everything else is decoded from the seed in
registers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from hf_rbe.core import seed64 as S
from hf_rbe.core.seed64_format import LOG2_C_RANGE, OFFSET, WIDTH

from .triton_common import check_device


@triton.jit
def _bits(seed, OFF: tl.constexpr, W: tl.constexpr):
    return (seed >> OFF) & ((1 << W) - 1)


@triton.jit
def _seed64_kernel(seeds_ptr, scales_ptr, theta_ij_ptr, d_ij_ptr, out_ptr, TT: tl.constexpr, HAS_SCALE: tl.constexpr,
                   O_R: tl.constexpr, W_R: tl.constexpr, O_TH: tl.constexpr, W_TH: tl.constexpr,
                   O_BASIS: tl.constexpr, W_BASIS: tl.constexpr, O_DTH: tl.constexpr, W_DTH: tl.constexpr,
                   O_DR: tl.constexpr, W_DR: tl.constexpr, O_ROT: tl.constexpr, W_ROT: tl.constexpr,
                   O_C: tl.constexpr, W_C: tl.constexpr, C_MAX: tl.constexpr,
                   ROT_STEP: tl.constexpr, J_CLAMP: tl.constexpr, Z_CLAMP: tl.constexpr):
    t = tl.program_id(0)
    seed = tl.load(seeds_ptr + t)
    log2_c = _bits(seed, O_C, W_C)
    log2_c = tl.where(log2_c > C_MAX, log2_c - (1 << W_C), log2_c)  # two's complement
    rot = _bits(seed, O_ROT, W_ROT)
    d_r = _bits(seed, O_DR, W_DR)
    d_theta = _bits(seed, O_DTH, W_DTH)
    basis = _bits(seed, O_BASIS, W_BASIS)
    theta = (_bits(seed, O_TH, W_TH).to(tl.float32) + 0.5) * (6.283185307179586 / (1 << W_TH))
    r = (_bits(seed, O_R, W_R).to(tl.float32) + 0.5) * (1.0 / (1 << W_R))
    c = tl.exp2(log2_c.to(tl.float32))
    # 1 - c r^2 near the disk's edge cancels: r^2's rounding error (by an fma; c is a power of two)
    # is taken back after the exact 1 - c r^2, so the Jacobian keeps fp32 precision up to the clamp
    rr = r * r
    edge = (1.0 - c * rr) - c * tl.fma(r, r, -rr)
    edge = tl.where(c * rr >= J_CLAMP, 1.0 - J_CLAMP, edge)
    jac = 1.0 / (edge * edge)

    offs = tl.arange(0, TT)
    th_ij = tl.load(theta_ij_ptr + offs)
    d_ij = tl.load(d_ij_ptr + offs)
    a = basis >> 2  # angular: sin t, sin 2t, sin 3t, triangle
    m = tl.where(a == 3, 1, a + 1).to(tl.float32)
    phase = m * (theta + rot.to(tl.float32) * ROT_STEP + th_ij) + d_theta.to(tl.float32) * 1.5707963267948966
    u = phase * 0.15915494309189535 + 0.25  # phase / 2 pi, a quarter period ahead
    u = u - tl.floor(u)
    phi = tl.where(a == 3, 1.0 - 4.0 * tl.abs(u - 0.5), tl.sin(phase))

    z = tl.minimum(tl.maximum(c * r * d_ij, -Z_CLAMP), Z_CLAMP)
    ez = tl.exp(z)
    emz = tl.exp(-z)
    ch = 0.5 * (ez + emz)
    z2 = z * z  # near zero the difference of exponentials cancels (fp32): sinh by its series there
    sh = tl.where(tl.abs(z) < 0.125, z * (1.0 + z2 * (1.0 / 6.0 + z2 * (1.0 / 120.0 + z2 * (1.0 / 5040.0)))),
                  0.5 * (ez - emz))
    th = sh / ch
    sech = 1.0 / ch
    b = basis & 3  # radial: cosh, sinh, tanh, sech (or their derivatives with d_r)
    d = d_r == 1
    psi = tl.where(b == 0, tl.where(d, sh, ch),
                   tl.where(b == 1, tl.where(d, ch, sh),
                            tl.where(b == 2, tl.where(d, sech * sech, th), tl.where(d, -sech * th, sech))))
    w = jac * phi * psi
    if HAS_SCALE:  # scaled variant: unit-RMS tile times the stored scale
        rms = tl.sqrt(tl.sum(w * w, axis=0) / TT)
        w = w * (tl.load(scales_ptr + t).to(tl.float32) / tl.maximum(rms, 1e-30))
    tl.store(out_ptr + t.to(tl.int64) * TT + offs, w)


def seed64_generate(seeds: torch.Tensor, tile: int, scales: torch.Tensor | None = None,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 tiles [n, T, T] from int64 seeds [n] (unit-RMS tiles times per-tile ``scales`` if
    given), written into ``out`` when one is passed."""
    tt = tile * tile
    if tt & (tt - 1):
        raise ValueError(f"tile {tile}: T*T must be a power of two")
    seeds = seeds.reshape(-1).contiguous()
    if out is None:
        out = torch.empty(seeds.numel(), tile, tile, device=seeds.device, dtype=torch.float32)
    theta_ij, d_ij = S.disk_grid(tile, seeds.device)
    sc = scales.reshape(-1).float().contiguous() if scales is not None else out
    _seed64_kernel[(seeds.numel(),)](
        seeds, sc, theta_ij.float().contiguous(), d_ij.float().contiguous(), out, TT=tt, HAS_SCALE=scales is not None,
        O_R=OFFSET["r"], W_R=WIDTH["r"], O_TH=OFFSET["theta"], W_TH=WIDTH["theta"], O_BASIS=OFFSET["basis"],
        W_BASIS=WIDTH["basis"], O_DTH=OFFSET["d_theta"], W_DTH=WIDTH["d_theta"], O_DR=OFFSET["d_r"], W_DR=WIDTH["d_r"],
        O_ROT=OFFSET["rot"], W_ROT=WIDTH["rot"], O_C=OFFSET["log2_c"], W_C=WIDTH["log2_c"],
        C_MAX=LOG2_C_RANGE[1], ROT_STEP=S.ROT_STEP, J_CLAMP=S.J_CLAMP, Z_CLAMP=S.Z_CLAMP)
    return out


def supports(layout: list[int]) -> bool:
    return True


def linear(x: torch.Tensor, tensors: list[torch.Tensor], layout: list[int], bias: torch.Tensor | None) -> torch.Tensor:
    """``hf_rbe::linear`` of a seed64 layer: generate the weight, then one matmul."""
    check_device(x)
    _, n, k, tile, scaled = layout
    tiles = seed64_generate(tensors[0], tile, tensors[1] if scaled else None)
    return F.linear(x, S.untile_matrix(tiles, n, k).to(x.dtype), None if bias is None else bias.to(x.dtype))

