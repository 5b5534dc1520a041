"""Output-aware encoding: LDLQ (vector GPTQ) and H-weighted scales, for any RBE stage.

With calibration inputs ``x`` of a layer, the output error of a weight error ``E`` is
``tr(E H E^T)`` with ``H = sum x^T x``. Both RBE formats rotate the input side, so ``H`` is
rotated the same way as the weight (``H' = R^T H R``) and the codes are chosen in the rotated
basis, one vector of ``dim`` columns at a time, left to right:

    X = W[:, block];  Q = nearest codewords of X / scale;  E = (X - Q) U_bb^-1
    W[:, after] -= E U_b,after          (U: upper Cholesky factor of H'^-1)

which is GPTQ's update with a block of ``dim`` columns (QuIP's LDLQ). With ``H = I`` nothing is
propagated and the codes are exactly the calibration-free ones. After the codes, each row's (or
group's) scale is refit to minimise ``tr(E H E^T)`` in closed form. A later stage repeats both
on the residual, with the same ``H``. Everything here is plain torch; the formats supply a
:class:`StageQuantizer` per stage (``core.rbe_codecs``), so the encoder does not know codebooks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .rotation import random_signs, rotate
from .spec import check_fp16_scales

DAMP = 0.01  # fraction of the mean diagonal added to H (as GPTQ), so that H is invertible
_LAZY = 128  # columns whose updates are batched before touching the rest (GPTQ's lazy batch)
_TINY = 1e-30


@dataclass(frozen=True)
class StageQuantizer:
    """What LDLQ needs from one stage of a format.

    ``nearest(u [n, dim])`` -> (int64 codes [n], fp32 unit-scale codewords [n, dim]);
    ``initial_scale(w [N, K])`` -> fp32 [N, groups] (the calibration-free fit);
    ``pack(codes [N, K/dim])`` -> the stored code tensor; ``prefix``: the stage's tensor names."""

    prefix: str
    dim: int
    group_size: int | None
    nearest: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    initial_scale: Callable[[torch.Tensor], torch.Tensor]
    pack: Callable[[torch.Tensor], torch.Tensor]


def rotate_hessian(h: torch.Tensor, rotation_seed: int | None, block: int) -> torch.Tensor:
    """``R^T H R`` for the input rotation ``R = S H_block`` (``None``: no rotation)."""
    if rotation_seed is None:
        return h
    signs = random_signs(rotation_seed, h.shape[0], device=h.device).to(h.dtype)
    h = rotate(h, signs, block)  # one K x K temporary at a time: at K = 28672 each is 6.6 GB in float64
    h = h.T.contiguous()
    return rotate(h, signs, block)


def damped(h: torch.Tensor, damp: float = DAMP, in_place: bool = False) -> torch.Tensor:
    """float64 ``H + damp * mean(diag H) I``; dead inputs (zero diagonal) get a unit diagonal instead.
    ``in_place``: change a float64 ``h`` itself instead of a copy (a wide layer's K x K is gigabytes)."""
    h = h.double() if in_place else h.double().clone()
    diag = h.diagonal()
    dead = diag <= 0
    diag[dead] = 1.0
    diag += damp * diag.mean()
    return h


def upper_inverse_cholesky(h: torch.Tensor) -> torch.Tensor:
    """fp32 upper Cholesky factor ``U`` of ``H^-1`` (``H^-1 = U^T U``), computed in float64 in one
    working copy of ``h`` (LAPACK works in place: the K x K factors are the largest buffers of a
    wide layer's encode)."""
    f = h.double().clone()
    torch.linalg.cholesky(f, out=f)
    torch.cholesky_inverse(f, out=f)
    torch.linalg.cholesky(f, upper=True, out=f)
    return f.triu_().float()


def _expand(scale: torch.Tensor, k: int) -> torch.Tensor:
    """[N, groups] -> [N, K]: each group's scale over its columns."""
    return scale.repeat_interleave(k // scale.shape[1], dim=1)


def ldlq(w: torch.Tensor, h: torch.Tensor, q: StageQuantizer,
         scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes of a rotated weight ``w`` [N, K] chosen against the (rotated, damped) ``h`` [K, K].

    Returns (int64 codes [N, K / dim], fp32 unit-scale codewords [N, K]) under the fixed
    ``scale`` [N, groups] (default: the stage's calibration-free fit, rounded to fp16)."""
    return ldlq_factored(w, upper_inverse_cholesky(h), q, scale)


def ldlq_factored(w: torch.Tensor, u_factor: torch.Tensor, q: StageQuantizer,
                  scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`ldlq` with the Hessian already factored (``u_factor = upper_inverse_cholesky(h)``):
    the stages of one layer share the factor."""
    n, k = w.shape
    dim = q.dim
    if scale is None:
        scale = q.initial_scale(w).half()
    s = scale.float()
    s_cols = _expand(torch.where(s.abs() < _TINY, _TINY, s), k)  # refit scales can be negative: keep the sign
    work = w.float().clone()
    codes = torch.empty(n, k // dim, dtype=torch.int64, device=w.device)
    values = torch.empty(n, k, dtype=torch.float32, device=w.device)
    for lo in range(0, k, _LAZY):
        hi = min(lo + _LAZY, k)
        err = torch.zeros(n, hi - lo, dtype=torch.float32, device=w.device)
        for j in range(lo, hi, dim):
            cols = slice(j, j + dim)
            x = work[:, cols]
            c, v = q.nearest((x / s_cols[:, cols]).float())
            codes[:, j // dim], values[:, cols] = c, v
            e = torch.linalg.solve_triangular(u_factor[cols, cols], x - v.float() * s_cols[:, cols],
                                              upper=True, left=False)  # (X - Q) U_bb^-1
            err[:, j - lo : j - lo + dim] = e
            work[:, j + dim : hi] -= e @ u_factor[cols, j + dim : hi]
        work[:, hi:] -= err @ u_factor[lo:hi, hi:]
    return codes, values


def refit_scale(w: torch.Tensor, values: torch.Tensor, h: torch.Tensor, n_groups: int) -> torch.Tensor:
    """fp32 scales [N, groups] minimising ``tr((w - s c) H (w - s c)^T)`` row by row, the
    unit-scale codewords ``c`` = ``values`` [N, K] fixed (closed form; a G x G solve per row)."""
    n, k = w.shape
    wd, cd, hd = w.double(), values.double(), h.double()
    ch = cd @ hd  # [N, K]
    if n_groups == 1:
        num, den = (wd * ch).sum(1), (cd * ch).sum(1)
        s = torch.where(den > 0, num / den.clamp_min(_TINY), torch.zeros_like(num))
        return s[:, None].float()
    g = k // n_groups
    cg = cd.reshape(n, n_groups, g)
    # A[n, a, b] = c_a H c_b^T over the column groups a, b; b[n, a] = w H c_a^T
    hb = hd.reshape(n_groups, g, n_groups, g).permute(0, 2, 1, 3)  # [G, G, g, g]
    a = torch.einsum("nai,abij,nbj->nab", cg, hb, cg)
    b = torch.einsum("nk,kaj,naj->na", wd, hd.reshape(k, n_groups, g), cg)
    eye = torch.eye(n_groups, dtype=a.dtype, device=a.device) * 1e-12
    return torch.linalg.solve(a + eye, b).float()


def encode_stages(w_rot: torch.Tensor, h_rot: torch.Tensor, stages: list[StageQuantizer]) -> dict[str, torch.Tensor]:
    """Stored codes and fp16 scales of every stage (each on the residual of those before it),
    chosen and scaled against ``h_rot`` (already rotated and damped)."""
    out, r = {}, w_rot.float()
    u_factor = upper_inverse_cholesky(h_rot)  # the same for every stage
    for q in stages:
        codes, values = ldlq_factored(r, u_factor, q)
        n_groups = 1 if q.group_size is None else r.shape[1] // q.group_size
        scale = refit_scale(r, values, h_rot, n_groups)
        check_fp16_scales(scale)
        scale16 = scale.half()
        out[q.prefix + "weight"], out[q.prefix + "scale"] = q.pack(codes), scale16
        r = r - values * _expand(scale16.float(), r.shape[1])
    return out


def reencode_stages(target: torch.Tensor, u_factor: torch.Tensor, stages: list[StageQuantizer],
                    units: list[torch.Tensor], scales: list[torch.Tensor]
                    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each stage's codes chosen again for a rotated ``target`` [N, K], one stage at a time with the
    others' unit-scale codewords (``units``, fp32 [N, K] per stage, updated as it goes) and every
    stage's ``scales`` [N, groups] fixed: LDLQ against ``u_factor`` on what the other stages leave.
    A ``target`` that the current codes decode to exactly gives them back. Returns (int64 codes
    [N, K / dim], fp32 unit-scale codewords [N, K]) per stage."""
    k = target.shape[1]
    units = list(units)
    placed = [u * _expand(s.float(), k) for u, s in zip(units, scales)]
    codes = []
    for t, q in enumerate(stages):
        rest = target.float() - sum(p for u, p in enumerate(placed) if u != t)
        c, units[t] = ldlq_factored(rest, u_factor, q, scales[t])
        placed[t] = units[t] * _expand(scales[t].float(), k)
        codes.append(c)
    return codes, units


def proxy_error(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> float:
    """``tr(E H E^T) / tr(W H W^T)``: the layer's relative output error on the calibration inputs."""
    e, wd, hd = (w - w_hat).double(), w.double(), h.double()
    return float(((e @ hd) * e).sum() / ((wd @ hd) * wd).sum())
