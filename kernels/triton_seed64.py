"""Triton generator for seed64 tiles: one program per tile, every weight computed from its seed.

Mirrors ``hf_rbe.codec.seed64.generate`` (the PyTorch reference) in fp32. The cell geometry
(polar angle and hyperbolic radius of each (i, j)) is the same for every tile, so it comes
in as two small [T*T] tensors; everything else is decoded from the 64-bit seed in registers.
Nothing here imports transformers or hf_rbe.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _seed64_kernel(seeds_ptr, scales_ptr, theta_ij_ptr, d_ij_ptr, out_ptr, TT: tl.constexpr, HAS_SCALE: tl.constexpr):
    t = tl.program_id(0)
    seed = tl.load(seeds_ptr + t)
    # MSB -> LSB: r:20 | theta:24 | basis:4 | d_theta:2 | d_r:1 | rot:4 | log2_c:3 | reserved:6
    log2_c = (seed >> 6) & 7
    log2_c = tl.where(log2_c >= 4, log2_c - 8, log2_c)
    rot = (seed >> 9) & 15
    d_r = (seed >> 13) & 1
    d_theta = (seed >> 14) & 3
    basis = (seed >> 16) & 15
    theta = (((seed >> 20) & 0xFFFFFF).to(tl.float32) + 0.5) * (6.283185307179586 / 16777216.0)
    r = (((seed >> 44) & 0xFFFFF).to(tl.float32) + 0.5) * (1.0 / 1048576.0)
    c = tl.exp2(log2_c.to(tl.float32))
    cr2 = tl.minimum(c * r * r, 0.999)
    jac = 1.0 / ((1.0 - cr2) * (1.0 - cr2))

    offs = tl.arange(0, TT)
    th_ij = tl.load(theta_ij_ptr + offs)
    d_ij = tl.load(d_ij_ptr + offs)
    a = basis >> 2
    m = tl.where(a == 3, 1, a + 1).to(tl.float32)
    phase = m * (theta + rot.to(tl.float32) * 0.39269908169872414 + th_ij) + d_theta.to(tl.float32) * 1.5707963267948966
    u = phase * 0.15915494309189535 + 0.25
    u = u - tl.floor(u)
    phi = tl.where(a == 3, 1.0 - 4.0 * tl.abs(u - 0.5), tl.sin(phase))

    z = tl.minimum(tl.maximum(c * r * d_ij, -20.0), 20.0)
    ez = tl.exp(z)
    emz = tl.exp(-z)
    ch = 0.5 * (ez + emz)
    sh = 0.5 * (ez - emz)
    th = sh / ch
    sech = 1.0 / ch
    b = basis & 3
    d = d_r == 1
    psi = tl.where(b == 0, tl.where(d, sh, ch),
                   tl.where(b == 1, tl.where(d, ch, sh),
                            tl.where(b == 2, tl.where(d, sech * sech, th), tl.where(d, -sech * th, sech))))
    w = jac * phi * psi
    if HAS_SCALE:  # scaled variant: unit-RMS tile times the stored scale
        rms = tl.sqrt(tl.sum(w * w, axis=0) / TT)
        w = w * (tl.load(scales_ptr + t).to(tl.float32) / tl.maximum(rms, 1e-30))
    tl.store(out_ptr + t.to(tl.int64) * TT + offs, w)


def seed64_generate(seeds: torch.Tensor, theta_ij: torch.Tensor, d_ij: torch.Tensor,
                    scales: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 tiles [n, T, T] from int64 seeds [n] (unit-RMS tiles times per-tile ``scales`` if given).

    ``theta_ij``/``d_ij`` [T, T]: polar angle and hyperbolic radius of each cell.
    """
    tile = theta_ij.shape[-1]
    tt = tile * tile
    if tt & (tt - 1):
        raise ValueError(f"tile {tile}: T*T must be a power of two")
    seeds = seeds.reshape(-1).contiguous()
    out = torch.empty(seeds.numel(), tile, tile, device=seeds.device, dtype=torch.float32)
    sc = scales.reshape(-1).float().contiguous() if scales is not None else out
    _seed64_kernel[(seeds.numel(),)](seeds, sc, theta_ij.float().contiguous(), d_ij.float().contiguous(), out,
                                    TT=tt, HAS_SCALE=scales is not None)
    return out


