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

import dataclasses
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
    ``pack(codes [N, K/dim])`` -> the stored code tensor; ``prefix``: the stage's tensor names.
    ``joins_previous``: the stage extends the run of the stage before it (a b1 stage after a b1
    stage, ``core.codec_v2.chains``): a run is encoded as one grid, each stage at half the scale of
    the one before, and its scales are refit together once its codes are chosen; ``decode(codes)``
    -> the unit-scale codewords [..., dim] (needed by the stages of a run)."""

    prefix: str
    dim: int
    group_size: int | None
    nearest: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    initial_scale: Callable[[torch.Tensor], torch.Tensor]
    pack: Callable[[torch.Tensor], torch.Tensor]
    joins_previous: bool = False
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None


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

    Returns (int64 codes [N, K / dim] (or [N, K / dim, stages] for a run's quantizer), fp32
    unit-scale codewords [N, K]) under the fixed ``scale`` [N, groups] (default: the stage's
    calibration-free fit, rounded to fp16)."""
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
    codes = None  # allocated by the first code's shape: one per vector, or one per stage of a run
    values = torch.empty(n, k, dtype=torch.float32, device=w.device)
    for lo in range(0, k, _LAZY):
        hi = min(lo + _LAZY, k)
        err = torch.zeros(n, hi - lo, dtype=torch.float32, device=w.device)
        for j in range(lo, hi, dim):
            cols = slice(j, j + dim)
            x = work[:, cols]
            c, v = q.nearest((x / s_cols[:, cols]).float())
            if codes is None:
                codes = torch.empty(n, k // dim, *c.shape[1:], dtype=torch.int64, device=w.device)
            codes[:, j // dim], values[:, cols] = c, v
            e = torch.linalg.solve_triangular(u_factor[cols, cols], x - v.float() * s_cols[:, cols],
                                              upper=True, left=False)  # (X - Q) U_bb^-1
            err[:, j - lo : j - lo + dim] = e
            work[:, j + dim : hi] -= e @ u_factor[cols, j + dim : hi]
        work[:, hi:] -= err @ u_factor[lo:hi, hi:]
    return codes, values


def refit_scale(w: torch.Tensor, values: torch.Tensor, h: torch.Tensor | None, n_groups: int) -> torch.Tensor:
    """fp32 scales [N, groups] minimising ``tr((w - s c) H (w - s c)^T)`` row by row, the
    unit-scale codewords ``c`` = ``values`` [N, K] fixed (closed form; a G x G solve per row;
    ``h`` ``None``: ``H = I``, each group's own least squares)."""
    n, k = w.shape
    if h is None:
        wg, cg = w.reshape(n, n_groups, -1), values.reshape(n, n_groups, -1)
        num, den = (wg * cg).sum(-1), (cg * cg).sum(-1)
        return torch.where(den > 0, num / den.clamp_min(_TINY), torch.zeros_like(num))
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
    for run in _runs(stages):
        if len(run) == 1:
            q = run[0]
            codes, values = ldlq_factored(r, u_factor, q)
            n_groups = 1 if q.group_size is None else r.shape[1] // q.group_size
            scale = refit_scale(r, values, h_rot, n_groups)
            check_fp16_scales(scale)
            scale16 = scale.half()
            out[q.prefix + "weight"], out[q.prefix + "scale"] = q.pack(codes), scale16
            r = r - values * _expand(scale16.float(), r.shape[1])
            continue
        # one LDLQ pass over the run's grid: its total error is what propagates (a pass per stage
        # would spread the first stage's one-bit error over the columns after it, which the later
        # stages would have corrected)
        top = run[0].initial_scale(r).half()
        codes, _ = ldlq_factored(r, u_factor, _run_quantizer(run), top)
        units = []
        for t, q in enumerate(run):
            out[q.prefix + "weight"] = q.pack(codes[..., t])
            units.append(q.decode(codes[..., t]).reshape(r.shape))  # type: ignore[misc]
        scales = refit_run(r, units, h_rot, [top.float() / 2**t for t in range(len(run))])
        for q, s16 in zip(run, scales):
            out[q.prefix + "scale"] = s16
        r = r - sum(u * _expand(s16.float(), r.shape[1]) for u, s16 in zip(units, scales))
    return out


def _run_quantizer(run: list[StageQuantizer]) -> StageQuantizer:
    """The stages of a run as one quantizer at the first one's scale: each vector's codes for every
    stage [n, stages], chosen in turn at scales halving from one stage to the next (for sign stages
    the nearest level of the run's uniform grid), and the sum of their codewords."""
    def nearest(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        codes, total, rest = [], torch.zeros_like(u), u
        for t, q in enumerate(run):
            c, v = q.nearest(rest * 2**t)
            codes.append(c)
            total = total + v / 2**t
            rest = rest - v / 2**t
        return torch.stack(codes, -1), total

    return dataclasses.replace(run[0], nearest=nearest)


def _runs(stages: list[StageQuantizer]) -> list[list[StageQuantizer]]:
    """``stages`` cut into runs: a stage that ``joins_previous`` extends the run before it."""
    runs: list[list[StageQuantizer]] = []
    for q in stages:
        if runs and q.joins_previous:
            runs[-1].append(q)
        else:
            runs.append([q])
    return runs


#: Sweeps of the joint refit of a run's scales (coordinate descent on a small, well-conditioned system).
REFIT_SWEEPS = 4


def refit_run(target: torch.Tensor, units: list[torch.Tensor], h: torch.Tensor | None,
              scales: list[torch.Tensor]) -> list[torch.Tensor]:
    """fp16 scales [N, groups] per stage of a run minimising ``tr(E H E^T)`` (``h`` ``None``: ``H = I``) for
    ``E = target - sum_t s_t units_t``: each stage's :func:`refit_scale` on what the others leave, in
    turn, from the ``scales`` the codes were chosen with."""
    k, n_groups = target.shape[1], scales[0].shape[1]
    scales = [s.float() for s in scales]
    for _ in range(REFIT_SWEEPS):
        for t, u in enumerate(units):
            rest = target - sum(v * _expand(s, k) for i, (v, s) in enumerate(zip(units, scales)) if i != t)
            scales[t] = refit_scale(rest, u, h, n_groups)
    for s in scales:
        check_fp16_scales(s)
    return [s.half() for s in scales]


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
