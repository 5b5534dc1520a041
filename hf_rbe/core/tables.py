"""The shared basis table, the derivative map D and the gain curves F_{cat,sub}.

The table holds ``2**idx`` unit vectors in R^dim, fitted once by spherical k-means to
Gaussian samples (rotated weights are close to Gaussian), so one table serves every layer.
With a sign bit the fit folds antipodes together (``b`` and ``-b`` cost one entry).

``deriv`` is the paper's derivative bit made concrete: D treats consecutive coordinates as
complex numbers and multiplies them by ``i`` (``(x0, x1) -> (-x1, x0)``), the derivative of
``e^{i theta}``. D is orthogonal, D^2 = -I, so ``sign`` and ``deriv`` together walk the cycle
``b, Db, -b, -Db`` (sin, cos, -sin, -cos in paper 000). It doubles the directions a code can
reach without a bigger table; whether that beats one more ``idx`` bit is measured by
``bench/field_ablation.py`` (it does not, so its default width is 0).

Gain curves map the magnitude index q (of L levels) to a gain relative to the group scale.
``cat`` picks the shape, ``sub`` multiplies it by ``2**(sub / 2**sub_bits)``:
    cat 0  "lloyd"     Lloyd-Max levels of the gain of Gaussian vectors (the default)
    cat 1  "linear"    uniform on (0, gmax]
    cat 2  "log"       geometric, gmax * exp(-4 (1 - u))    (4: LOG_SPAN, natural-log decades)
    cat 3  "poincare"  gmax * tanh(2u) / tanh(2), a Poincare-disk radius profile  (2: POINCARE_STEEPNESS)
with ``u = (q + 0.5) / L`` and ``gmax`` the 99.9% quantile of the Gaussian gain.

A model shares one table per stage layout (``universal_tables``, fitted once per process and
keyed by :func:`table_key`); ``table="per_layer"`` refines it on one layer's own vectors.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from .format import CodeLayout, LayerSpec, StageSpec

CURVES: tuple[str, ...] = ("lloyd", "linear", "log", "poincare")
_FIT_SAMPLES_PER_ENTRY = 32
_FIT_MIN_SAMPLES = 4096
_FIT_ITERS = 20
_LAYER_FIT_ITERS = 10
_LUT_SAMPLES = 1 << 16
_LLOYD_ITERS = 40
_GMAX_QUANTILE = 0.999
LOG_SPAN = 4.0
POINCARE_STEEPNESS = 2.0
_ASSIGN_SCORES = 1 << 25  # scores held at once while assigning samples to centres
_EPS = 1e-12


def derivative(v: torch.Tensor) -> torch.Tensor:
    """Apply D along the last dim (even length): (x0, x1, ...) -> (-x1, x0, ...)."""
    pairs = v.reshape(*v.shape[:-1], -1, 2)
    return torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).reshape(v.shape)


def directions(table: torch.Tensor, deriv_bits: int) -> torch.Tensor:
    """All directions a code can name before its sign: ``table`` then ``D table`` if deriv is on."""
    return torch.cat([table, derivative(table)]) if deriv_bits else table


def _assign(x: torch.Tensor, c: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centre (by |cosine| if signed) of each row of x, in chunks of ~32M scores."""
    step = max(1, _ASSIGN_SCORES // len(c))
    idx, proj = [], []
    for lo in range(0, len(x), step):
        s = x[lo : lo + step] @ c.T
        a = s.abs().argmax(1) if signed else s.argmax(1)
        idx.append(a)
        proj.append(s.gather(1, a[:, None]).squeeze(1))
    return torch.cat(idx), torch.cat(proj)


@functools.lru_cache(maxsize=32)
def _fit_table(dim: int, size: int, signed: bool, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + dim * 131 + size)  # one stream per (seed, dim, size)
    n = max(_FIT_SAMPLES_PER_ENTRY * size, _FIT_MIN_SAMPLES)
    x = torch.randn(n, dim, generator=g, dtype=torch.float64)
    x = x / x.norm(dim=1, keepdim=True)
    if size == 1:
        c = torch.ones(1, dim, dtype=torch.float64) / dim**0.5
        return c.float()
    c = x[torch.randperm(n, generator=g)[:size]].clone()
    for _ in range(_FIT_ITERS):
        a, p = _assign(x, c, signed)
        w = torch.sign(p)[:, None] if signed else torch.ones(n, 1, dtype=x.dtype)
        acc = torch.zeros_like(c).index_add_(0, a, x * w)
        norm = acc.norm(dim=1, keepdim=True)
        empty = norm.squeeze(1) < _EPS
        c = acc / norm.clamp_min(_EPS)
        if empty.any():  # reseed empty cells with random samples
            c[empty] = x[torch.randint(0, n, (int(empty.sum()),), generator=g)]
    return c.float()


def basis_table(dim: int, idx_bits: int, signed: bool, seed: int = 0) -> torch.Tensor:
    """The universal table: fp32 [2**idx_bits, dim] unit vectors, deterministic per arguments."""
    return _fit_table(dim, 1 << idx_bits, signed, seed).clone()


def fit_layer_table(vectors: torch.Tensor, init: torch.Tensor, signed: bool,
                    iters: int = _LAYER_FIT_ITERS) -> torch.Tensor:
    """Refine ``init`` by spherical k-means on one layer's own vectors [n, dim] (per-layer tables)."""
    x = vectors.double()
    x = x / x.norm(dim=1, keepdim=True).clamp_min(_EPS)
    c = init.double().clone()
    for _ in range(iters):
        s = x @ c.T
        a = s.abs().argmax(1) if signed else s.argmax(1)
        w = torch.sign(s.gather(1, a[:, None])) if signed else torch.ones(len(x), 1, dtype=x.dtype)
        acc = torch.zeros_like(c).index_add_(0, a, x * w)
        norm = acc.norm(dim=1, keepdim=True)
        keep = norm.squeeze(1) > _EPS  # cells nobody chose keep their universal vector
        c[keep] = acc[keep] / norm[keep]
    return c.float()


def best_projection(v: torch.Tensor, dirs: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of the best direction for each row of ``v`` [n, dim] and the projection on it."""
    s = v @ dirs.T
    a = s.abs().argmax(-1) if signed else s.argmax(-1)
    p = s.gather(-1, a.unsqueeze(-1)).squeeze(-1)
    return a, (p if signed else p.clamp_min(0))


def _lloyd_levels(g: torch.Tensor, n_levels: int) -> torch.Tensor:
    if n_levels == 1:
        return g.mean().reshape(1)
    q = torch.quantile(g, torch.linspace(0.5 / n_levels, 1 - 0.5 / n_levels, n_levels, dtype=g.dtype))
    for _ in range(_LLOYD_ITERS):
        edges = (q[1:] + q[:-1]) / 2
        cell = torch.bucketize(g, edges)
        sums = torch.zeros_like(q).index_add_(0, cell, g)
        counts = torch.zeros_like(q).index_add_(0, cell, torch.ones_like(g))
        q = torch.where(counts > 0, sums / counts.clamp_min(1), q)
    return q.sort().values


def gain_lut(table: torch.Tensor, layout: CodeLayout, seed: int = 0) -> torch.Tensor:
    """fp32 [2**(cat+sub), 2**(amp+amp_fine)]: gains relative to the group scale.

    Fitted to unit-variance Gaussian vectors, so a group scale equal to the weights'
    standard deviation is the natural starting point for the encoder.
    """
    dim = table.shape[1]
    gen = torch.Generator().manual_seed(seed * 7919 + dim)  # one stream per (seed, dim)
    x = torch.randn(_LUT_SAMPLES, dim, generator=gen, dtype=torch.float64)
    _, p = best_projection(x, directions(table.double(), layout.deriv), signed=bool(layout.sign))
    g = p.abs()
    n_levels = layout.n_levels
    u = (torch.arange(n_levels, dtype=torch.float64) + 0.5) / n_levels
    gmax = torch.quantile(g, _GMAX_QUANTILE)
    shapes = {
        "lloyd": _lloyd_levels(g, n_levels),
        "linear": gmax * u,
        "log": gmax * torch.exp(-LOG_SPAN * (1 - u)),
        "poincare": gmax * torch.tanh(POINCARE_STEEPNESS * u) / math.tanh(POINCARE_STEEPNESS),
    }
    rows = []
    for cat in range(1 << layout.cat):
        for sub in range(1 << layout.sub):
            rows.append(shapes[CURVES[cat]] * 2 ** (sub / (1 << layout.sub)))
    return torch.stack(rows).float()


# ----------------------------------------------------------------------------- shared tables


@dataclass(frozen=True)
class StageTables:
    """The basis table [2**idx, dim] and gain curves [curves, levels] a stage decodes with."""

    table: torch.Tensor
    lut: torch.Tensor


@dataclass(frozen=True)
class LayerTables:
    """Tables for stage 1 and, with an RBE residual, stage 2."""

    stage: StageTables
    residual: StageTables | None = None

    def as_tensors(self) -> dict[str, torch.Tensor]:
        """The tables under their stored names (``table``, ``lut``, ``residual_table``, ...)."""
        out = {"table": self.stage.table, "lut": self.stage.lut}
        if self.residual is not None:
            out.update(residual_table=self.residual.table, residual_lut=self.residual.lut)
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> LayerTables:
        res = StageTables(tensors["residual_table"], tensors["residual_lut"]) if "residual_table" in tensors else None
        return cls(StageTables(tensors["table"], tensors["lut"]), res)


@functools.lru_cache(maxsize=32)
def _universal(stage: StageSpec, seed: int) -> StageTables:
    table = basis_table(stage.dim, stage.layout.idx, bool(stage.layout.sign), seed)
    return StageTables(table, gain_lut(table, stage.layout, seed))


def universal_tables(stage: StageSpec, seed: int = 0) -> StageTables:
    """The model-wide tables for ``stage``: fitted once per process, handed out as copies so
    that an in-place edit of one model's buffers cannot leak into the next model."""
    t = _universal(stage, seed)
    return StageTables(t.table.clone(), t.lut.clone())


def _residual_seed(spec: LayerSpec) -> int:
    return spec.table_seed + 1  # stage 2 gets its own table even when its layout equals stage 1's


def tables_for(spec: LayerSpec) -> LayerTables:
    """The universal tables of every stage of ``spec``."""
    res = spec.residual
    return LayerTables(universal_tables(spec.stage, spec.table_seed),
                       universal_tables(res.stage, _residual_seed(spec)) if res.kind == "rbe" else None)  # type: ignore[arg-type]


def layer_tables(weight_rot: torch.Tensor, spec: LayerSpec) -> LayerTables:
    """Tables for ``table="per_layer"``: stage 1's refined on the layer's own rotated vectors
    (starting from the universal one); an RBE residual stage keeps its universal table."""
    stage = spec.stage
    init = universal_tables(stage, spec.table_seed)
    vecs = weight_rot.reshape(-1, stage.dim).float().cpu()
    table = fit_layer_table(vecs, init.table, bool(stage.layout.sign))
    res = spec.residual
    return LayerTables(StageTables(table, gain_lut(table, stage.layout, spec.table_seed)),
                       universal_tables(res.stage, _residual_seed(spec)) if res.kind == "rbe" else None)  # type: ignore[arg-type]


def _stage_key(stage: StageSpec, seed: int) -> str:
    lay = stage.layout
    return f"d{stage.dim}-i{lay.idx}-s{lay.sign}-dv{lay.deriv}-c{lay.cat}-u{lay.sub}-a{lay.amp}-f{lay.amp_fine}-t{seed}"


def table_key(spec: LayerSpec) -> str:
    """Name of the universal tables a layer uses: layers with equal keys share them."""
    key = _stage_key(spec.stage, spec.table_seed)
    if spec.residual.kind == "rbe":
        key += "+" + _stage_key(spec.residual.stage, _residual_seed(spec))  # type: ignore[arg-type]
    return key
