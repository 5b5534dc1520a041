"""Poincaré-ball operations for Hb-BERT, on top of geoopt.

geoopt (maintained, on PyPI) supplies the ball and its learnable curvature parameter, the
manifold parameters and the Riemannian optimisers (``ManifoldParameter``, ``RiemannianAdam``),
and serves as the reference the tests check these operations against. The operations
themselves are written here, because geoopt's versions do not fit a transformer:

- the exp/log maps and the Möbius scalar product use ``torch.atanh``: geoopt's artanh is
  (log(1+x) - log(1-x))/2, which in float32 loses digits for small x = sqrt(c)|v| (relative
  error ~1e-7/x, large at the small curvatures that reproduce BERT);
- every map computes its per-row scalars first and then touches the [batch, tokens, hidden]
  tensor once (``_along``), Möbius addition included: on CPU these elementwise passes, not the
  matmuls, were Hb-BERT's cost (CHANGELOG.md, 0.1.0);
- ``mobius_linear`` takes the Euclidean product ``W x`` from any linear module (an
  ``nn.Linear`` or an ``RBELinear`` decoding packed codes) instead of a weight matrix, so a
  Poincaré layer stays quantizable like any other layer;
- ``gyromidpoint`` contracts attention weights [.., Lq, Lk] with points [.., Lk, d] by matmul;
  geoopt's ``weighted_midpoint`` would broadcast them to [.., Lq, Lk, d] (hundreds of MB);
- ``HyperbolicMLR`` is the multinomial logistic regression of Ganea et al. (2018), which geoopt
  does not ship.

Conventions: ``ball`` is a ``geoopt.PoincareBall`` (curvature -c, c > 0); points are the last
dimension of a tensor. Every map into the ball keeps its result a hair inside the boundary
(geoopt's margin: 4e-3 of the radius in float32), so float32 never reaches ||x|| = 1/sqrt(c).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:  # geoopt is imported where it is used: `import hf_rbe` stays light
    import geoopt


def make_ball(curvature: float, learnable: bool = True) -> geoopt.PoincareBall:
    """A Poincaré ball of curvature -``curvature`` (``curvature`` > 0)."""
    if not (isinstance(curvature, (int, float)) and math.isfinite(curvature) and curvature > 0):
        raise ValueError(f"curvature must be a finite number > 0, got {curvature!r}")
    import geoopt

    ball = geoopt.PoincareBall(c=float(curvature), learnable=learnable)
    with torch.no_grad():  # geoopt inverts softplus in float32, which gives -inf below c ~ 1e-7
        ball.isp_c.copy_(inverse_softplus(curvature))
    return ball


def inverse_softplus(c: float) -> torch.Tensor:
    """The stored parameter of a ball of curvature -c (c = softplus(p)), computed in float64."""
    return torch.tensor(float(c), dtype=torch.float64).expm1().log()


def _tan(r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """tan_c(r) = tanh(sqrt(c) r) / sqrt(c)."""
    sc = c.clamp_min(1e-30).sqrt()
    return torch.tanh((sc * r).clamp(max=15.0)) / sc


def _artan(r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """artan_c(r) = atanh(sqrt(c) r) / sqrt(c), kept finite a hair inside the boundary."""
    sc = c.clamp_min(1e-30).sqrt()
    limit = 1.0 - (4e-3 if r.dtype in (torch.float16, torch.bfloat16) else 1e-7 if r.dtype == torch.float64 else 1e-6)
    return torch.atanh((sc * r).clamp(max=limit)) / sc


def _norm(v: torch.Tensor) -> torch.Tensor:
    return v.norm(dim=-1, keepdim=True).clamp_min(1e-15)


def _max_norm(ball: geoopt.PoincareBall, dtype: torch.dtype) -> torch.Tensor:
    """The largest radius a point may have: geoopt's projection margin inside 1/sqrt(c)."""
    eps = 4e-3 if dtype in (torch.float16, torch.bfloat16, torch.float32) else 1e-5
    return (1 - eps) / ball.c.clamp_min(1e-30).sqrt()


def _along(v: torch.Tensor, v_norm: torch.Tensor, radius: torch.Tensor, ball: geoopt.PoincareBall) -> torch.Tensor:
    """The point at ``radius`` (clamped inside the ball) in the direction of ``v``: one pass over v."""
    return v * (radius.clamp(max=_max_norm(ball, v.dtype)) / v_norm)


def expmap0(ball: geoopt.PoincareBall, u: torch.Tensor) -> torch.Tensor:
    """Tangent vector at the origin -> point of the ball (strictly inside)."""
    n = _norm(u)
    return _along(u, n, _tan(n, ball.c), ball)


def logmap0(ball: geoopt.PoincareBall, x: torch.Tensor) -> torch.Tensor:
    """Point of the ball -> tangent vector at the origin (inverse of ``expmap0``)."""
    n = _norm(x)
    return x * (_artan(n, ball.c) / n)


def mobius_scalar_mul(ball: geoopt.PoincareBall, r: float | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """r ⊗_c x = tan_c(r artan_c(|x|)) x / |x|."""
    n = _norm(x)
    return _along(x, n, _tan(r * _artan(n, ball.c), ball.c), ball)


def mobius_add(ball: geoopt.PoincareBall, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x ⊕_c y = ((1 + 2c<x,y> + c|y|²) x + (1 - c|x|²) y) / (1 + 2c<x,y> + c²|x|²|y|²)."""
    c = ball.c
    xy, x2, y2 = (x * y).sum(-1, keepdim=True), x.pow(2).sum(-1, keepdim=True), y.pow(2).sum(-1, keepdim=True)
    den = (1 + 2 * c * xy + c * c * x2 * y2).clamp_min(1e-15)
    out = x * ((1 + 2 * c * xy + c * y2) / den) + y * ((1 - c * x2) / den)
    n = _norm(out)
    return _along(out, n, n, ball)


def mobius_linear(ball: geoopt.PoincareBall, linear: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None,
                  bias_scale: float = 1.0) -> torch.Tensor:
    """``(W ⊗_c x) ⊕_c exp0(b * bias_scale)`` for a ball point ``x``, with ``W x`` from ``linear``.

    Möbius matrix-vector product: tan_c(|Wx|/|x| artan_c(|x|)) Wx/|Wx| (Ganea et al. 2018),
    then the bias, mapped into the ball, is Möbius-added. As c -> 0 this is ``W x + b * bias_scale``
    (``bias_scale`` puts a bias stored in other units into the ball's coordinates). ``linear``
    must have no bias of its own: subtracting it from ``W x + b`` would cancel digits in float32.
    """
    if getattr(linear, "bias", None) is not None:
        raise ValueError("mobius_linear needs a bias-free linear module; pass the bias separately")
    wx = linear(x)
    x_norm, wx_norm = _norm(x), _norm(wx)
    out = _along(wx, wx_norm, _tan(wx_norm / x_norm * _artan(x_norm, ball.c), ball.c), ball)
    if bias is not None:
        out = mobius_add(ball, out, expmap0(ball, bias * bias_scale))
    return out


def gyromidpoint(ball: geoopt.PoincareBall, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted gyro-midpoint of points ``x`` [..., n, d] with ``weights`` [..., m, n] -> [..., m, d].

    m_i = 1/2 ⊗ (Σ_j w_ij λ_j x_j / Σ_j w_ij (λ_j - 1)), λ_j = 2 / (1 - c|x_j|²): the Poincaré
    form of the Einstein midpoint. For weights summing to one and c -> 0 it is Σ_j w_ij x_j,
    the Euclidean attention average.
    """
    lam = 2.0 / (1.0 + ball.k * x.pow(2).sum(-1)).clamp_min(1e-15)  # [..., n]
    num = weights @ (lam[..., None] * x)  # two matmuls: never a [..., m, n, d] temporary
    den = weights @ (lam - 1.0)[..., None]
    den = torch.where(den.abs() < 1e-10, torch.full_like(den, 1e-10), den)
    return mobius_scalar_mul(ball, 0.5, num / den)


class HyperbolicMLR(nn.Module):
    """Multinomial logistic regression on the ball (Ganea et al. 2018, eq. 25).

    Class k has a point p_k on the ball (a ``geoopt.ManifoldParameter``, trained by Riemannian
    Adam) and a tangent normal a_k; its logit is the signed, scaled distance to the gyroplane
    through p_k orthogonal to a_k:

        (λ_pk |a_k| / sqrt c) asinh(2 sqrt c <-p_k ⊕ x, a_k> / ((1 - c|-p_k ⊕ x|²) |a_k|))

    As c -> 0 this is 4 <x - p_k, a_k>, a Euclidean affine classifier.
    """

    def __init__(self, ball: geoopt.PoincareBall, dim: int, num_classes: int) -> None:
        import geoopt

        super().__init__()
        # the ball belongs to the encoder: referenced by the parameter, not registered twice
        self.p = geoopt.ManifoldParameter(torch.zeros(num_classes, dim), manifold=ball)
        self.a = nn.Parameter(torch.empty(num_classes, dim).normal_(0, dim**-0.5))

    def forward(self, x: torch.Tensor, ball: geoopt.PoincareBall) -> torch.Tensor:
        c = ball.c
        sc = c.sqrt()
        diff = ball.mobius_add(-self.p, x[..., None, :])  # [..., K, d] (small: geoopt's op is fine here)
        a_norm = self.a.norm(dim=-1).clamp_min(1e-15)
        lam_p = 2.0 / (1.0 - c * self.p.pow(2).sum(-1)).clamp_min(1e-15)
        inner = (diff * self.a).sum(-1)
        denom = ((1.0 - c * diff.pow(2).sum(-1)).clamp_min(1e-15)) * a_norm
        return lam_p * a_norm / sc * torch.asinh(2.0 * sc * inner / denom)
