"""seed64 (paper 000): a whole T x T weight tile generated from one 64-bit seed on the Poincaré disk.

The bit layout is defined in ``core.seed64_format`` (exactly as the paper gives it);
``r = (q + 0.5) / 2^20`` and ``theta = 2 pi (q + 0.5) / 2^24`` (cell centres; encoding clamps r
into [0, 1) and wraps theta), ``c = 2^log2_c`` with ``log2_c`` in [-4, 3]. The paper's test
vectors hold: ``0x7FFFF800000AFB6A`` decodes to r = 0.49999952, theta = 3.1415928, basis 10,
d_theta 3, d_r 1, rot 13, log2_c -3, reserved 42.

The generator ``w_ij = J(c, r) * Phi(theta + theta_ij + rho) * Psi(c * r * d_ij)``. The paper
leaves most of it open; our choices, each documented where it is made:

- **(i, j) onto the disk.** Cell centres of the tile, ``x = 0.7 (2j + 1 - T) / T``,
  ``y = 0.7 (2i + 1 - T) / T`` (every point inside radius 0.99), polar angle ``theta_ij`` and
  hyperbolic distance to the origin ``d_ij = 2 artanh |(x, y)|``. The paper's formula feeds
  only the seed's ``r`` to Psi, which would make every row of the disk alike; the distance
  ``d_ij`` is what lets the radial basis vary over the tile.
- **16 basis pairs**: ``basis = 4 a + b``; angular ``a``: sin t, sin 2t, sin 3t, triangle wave;
  radial ``b``: cosh, sinh, tanh, sech (so basis 0 = sin x cosh, 1 = sin x sinh, as in the paper).
- **Derivatives**: ``d_theta = k`` shifts the angular argument by k quarter periods (sin ->
  cos -> -sin -> -cos); ``d_r`` swaps each radial function for its derivative (cosh <-> sinh,
  tanh -> sech^2, sech -> -sech tanh).
- **Rotation**: ``rho = rot * pi / 8`` (the paper's examples say rot 1 = pi/8 but also
  rot 2 = pi/6; one rule has to win).
- **Jacobian**: the paper's defining formula ``J = (1 - c r^2)^-2`` (its printed test value
  matches ``1 / |1 - c r^2|`` instead). ``c r^2 >= 1`` lies outside the disk: it is clamped
  to 0.999, so J <= 10^6; the radial argument is clamped to |z| <= 20 against overflow.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from .errors import ConfigError, EncodingError
from .seed64_format import FIELDS, LOG2_C_RANGE, MASK, OFFSET, WIDTH

R_BITS, THETA_BITS = WIDTH["r"], WIDTH["theta"]
_LOG2_C_SPAN = 1 << WIDTH["log2_c"]
DISK_RADIUS = 0.7  # cell centres span [-0.7, 0.7]^2: every point inside radius 0.99
J_CLAMP = 0.999  # c r^2 is clamped below 1 (the disk's edge), so J <= 10^6
Z_CLAMP = 20.0  # |radial argument| <= 20 keeps cosh/sinh finite in fp32
ROT_STEP = math.pi / 8  # rotation field unit
_GRID_R, _GRID_THETA = 5, 12  # encoder starts: r in {0.1, 0.3, ..., 0.9} x 12 angles (x every basis, d_r, c)
_R_FIRST, _R_STEP = 0.1, 0.2
_START_ELEMENTS = 1 << 22  # generated start tiles held at once


@dataclass(frozen=True)
class Seed:
    """The decoded fields of one seed (``r`` and ``theta`` as the integers stored)."""

    r: int
    theta: int
    basis: int
    d_theta: int
    d_r: int
    rot: int
    log2_c: int  # signed, -4..3
    reserved: int = 0

    @property
    def radius(self) -> float:
        return (self.r + 0.5) / 2**R_BITS

    @property
    def angle(self) -> float:
        return (self.theta + 0.5) / 2**THETA_BITS * 2 * math.pi


def pack(s: Seed) -> int:
    """The 64-bit value (as a Python int in [0, 2^64)) of a seed; every field range-checked."""
    values = {"r": s.r, "theta": s.theta, "basis": s.basis, "d_theta": s.d_theta, "d_r": s.d_r,
              "rot": s.rot, "log2_c": s.log2_c & MASK["log2_c"], "reserved": s.reserved}
    lo, hi = LOG2_C_RANGE
    if not lo <= s.log2_c <= hi:
        raise ConfigError(f"log2_c must be in [{lo}, {hi}], got {s.log2_c}")
    out = 0
    for name, bits in FIELDS:
        v = values[name]
        if not 0 <= v <= MASK[name]:
            raise ConfigError(f"seed field {name}={v} does not fit in {bits} bits")
        out |= v << OFFSET[name]
    return out


def unpack(value: int) -> Seed:
    """Inverse of :func:`pack`; accepts a signed int64 too (as stored in tensors)."""
    value &= (1 << 64) - 1
    fields = {name: (value >> OFFSET[name]) & MASK[name] for name, _ in FIELDS}
    c = fields["log2_c"]
    fields["log2_c"] = c - _LOG2_C_SPAN if c > LOG2_C_RANGE[1] else c
    return Seed(**fields)


def quantize_r(r: float) -> int:
    """r clamped into [0, 1), then its 20-bit cell (0.5 -> 524288, the paper's clamping test)."""
    return min(max(int(math.floor(r * 2**R_BITS)), 0), 2**R_BITS - 1)


def quantize_theta(theta: float) -> int:
    return int(math.floor((theta % (2 * math.pi)) / (2 * math.pi) * 2**THETA_BITS)) % 2**THETA_BITS


# ----------------------------------------------------------------------------- fields as tensors


def unpack_tensor(seeds: torch.Tensor) -> dict[str, torch.Tensor]:
    """Fields of int64 seeds (any shape), r and theta already as floats."""
    s = seeds.to(torch.int64)
    out = {name: (s >> OFFSET[name]) & MASK[name] for name, _ in FIELDS}  # arithmetic shift is harmless: masked
    out["log2_c"] = torch.where(out["log2_c"] > LOG2_C_RANGE[1], out["log2_c"] - _LOG2_C_SPAN, out["log2_c"])
    out["r"] = (out["r"].double() + 0.5) / 2**R_BITS
    out["theta"] = (out["theta"].double() + 0.5) / 2**THETA_BITS * 2 * math.pi
    return out


def pack_tensor(f: dict[str, torch.Tensor]) -> torch.Tensor:
    """int64 seeds from integer fields (``r``, ``theta`` as their stored integers)."""
    out = torch.zeros_like(f["r"], dtype=torch.int64)
    for name, _ in FIELDS:
        v = f.get(name, torch.zeros_like(out)).to(torch.int64) & MASK[name]
        out = out | (v << OFFSET[name])  # wraps into the sign bit like a u64 reinterpreted as i64
    return out


# ----------------------------------------------------------------------------- generator


def disk_grid(tile: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(theta_ij, d_ij) [tile, tile] in float64: polar angle and hyperbolic radius of each cell."""
    u = (2 * torch.arange(tile, dtype=torch.float64, device=device) + 1 - tile) / tile * DISK_RADIUS
    y, x = torch.meshgrid(u, u, indexing="ij")  # row i -> y, column j -> x
    rho = torch.sqrt(x * x + y * y)
    return torch.atan2(y, x), 2 * torch.atanh(rho)


def _angular(a: torch.Tensor, t: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Angular basis a in {sin t, sin 2t, sin 3t, triangle}, k quarter periods ahead."""
    m = torch.where(a == 3, torch.ones_like(a), a + 1).to(t.dtype)
    phase = m * t + k.to(t.dtype) * (math.pi / 2)
    u = torch.remainder(phase / (2 * math.pi) + 0.25, 1.0)
    tri = 1 - 4 * (u - 0.5).abs()  # 0 at 0, 1 at pi/2, period 2 pi: sin's phase, straight lines
    return torch.where(a == 3, tri, torch.sin(phase))


def _radial(b: torch.Tensor, z: torch.Tensor, d_r: torch.Tensor) -> torch.Tensor:
    """Radial basis b in {cosh, sinh, tanh, sech}, or its derivative when d_r = 1."""
    z = z.clamp(-Z_CLAMP, Z_CLAMP)
    ch, sh, th = torch.cosh(z), torch.sinh(z), torch.tanh(z)
    sech = 1 / ch
    d = d_r.bool()
    return torch.where(b == 0, torch.where(d, sh, ch),
                       torch.where(b == 1, torch.where(d, ch, sh),
                                   torch.where(b == 2, torch.where(d, sech * sech, th),
                                               torch.where(d, -sech * th, sech))))


def generate_fields(f: dict[str, torch.Tensor], tile: int) -> torch.Tensor:
    """float64 tiles [*S, tile, tile] from decoded fields of shape [*S] (r, theta as floats)."""
    theta_ij, d_ij = disk_grid(tile, f["r"].device)
    ex = lambda v: v[..., None, None]  # noqa: E731
    c = torch.pow(2.0, f["log2_c"].double())
    r = f["r"].double()
    jac = (1 - torch.clamp(c * r * r, max=J_CLAMP)) ** -2
    t = ex(f["theta"].double() + f["rot"].double() * ROT_STEP) + theta_ij
    phi = _angular(ex(f["basis"] >> 2), t, ex(f["d_theta"]))
    psi = _radial(ex(f["basis"] & 3), ex(c * r) * d_ij, ex(f["d_r"]))
    return ex(jac) * phi * psi


def generate(seeds: torch.Tensor, tile: int = 32, scales: torch.Tensor | None = None) -> torch.Tensor:
    """float64 tiles [*S, tile, tile] generated from int64 seeds [*S] (the PyTorch reference).

    With per-tile ``scales`` (the scaled variant) each tile is first normalised to unit RMS,
    so the stored fp16 scale is simply the tile's RMS and never overflows, whatever J and Psi
    make of the raw tile."""
    g = generate_fields(unpack_tensor(seeds), tile)
    if scales is None:
        return g
    return g * (scales.double() / _rms(g))[..., None, None]


def _rms(g: torch.Tensor) -> torch.Tensor:
    return g.pow(2).mean((-2, -1)).sqrt().clamp_min(1e-30)


# ----------------------------------------------------------------------------- encoder


def _grid_candidates(device: torch.device | str) -> dict[str, torch.Tensor]:
    """Deterministic starting points: every basis, d_r and curvature, a grid of r and theta.

    d_theta and rot only shift the angle, which the theta grid and refinement already cover,
    so the starts keep them at 0."""
    lo, hi = LOG2_C_RANGE
    basis, d_r, log2_c, r, theta = torch.meshgrid(
        torch.arange(1 << WIDTH["basis"]), torch.arange(1 << WIDTH["d_r"]), torch.arange(lo, hi + 1),
        torch.arange(_GRID_R), torch.arange(_GRID_THETA), indexing="ij")
    z = torch.zeros_like(basis)
    f = {"basis": basis, "d_r": d_r, "log2_c": log2_c, "r": _R_FIRST + _R_STEP * r.double(),
         "theta": theta.double() * (2 * math.pi / _GRID_THETA), "d_theta": z, "rot": z}
    return {k: v.reshape(-1).to(device) for k, v in f.items()}


@functools.lru_cache(maxsize=4)
def _start_shapes(tile: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The grid starts and their generated tiles [starts, T*T] (the same for every call)."""
    starts = _grid_candidates("cpu")
    n, step = len(starts["r"]), max(1, _START_ELEMENTS // (tile * tile))  # bounded temporaries for large tiles
    shapes = [generate_fields({k: v[i : i + step] for k, v in starts.items()}, tile).reshape(-1, tile * tile)
              for i in range(0, n, step)]
    return starts, torch.cat(shapes)


def _fit(w: torch.Tensor, g: torch.Tensor, scaled: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(squared error, least-squares scale) of tiles w [..., P] against shapes g [..., P]."""
    gg = (g * g).sum(-1)
    wg = (w * g).sum(-1)
    if scaled:
        alpha = wg / gg.clamp_min(1e-300)
        return (w * w).sum(-1) - alpha * wg, alpha
    return (w * w).sum(-1) - 2 * wg + gg, torch.ones_like(wg)


def _refine(w: torch.Tensor, f: dict[str, torch.Tensor], tile: int, scaled: bool,
            steps: int) -> dict[str, torch.Tensor]:
    """Pattern search on r and theta of every kept start (fields [n, k]) of tiles ``w`` [n, T*T]:
    each step tries +-step on each, keeps improvements and halves the steps that found none.
    Returns the best start's fields per tile ([n])."""
    w = w[:, None, :]
    cur, _ = _fit(w, generate_fields(f, tile).flatten(-2), scaled)
    step_r, step_t = torch.full_like(f["r"], 0.1), torch.full_like(f["r"], math.pi / 12)
    for _ in range(steps):
        improved = torch.zeros_like(cur, dtype=torch.bool)
        for key, step, sgn in (("r", step_r, 1), ("r", step_r, -1), ("theta", step_t, 1), ("theta", step_t, -1)):
            trial = dict(f)
            trial[key] = f[key] + sgn * step
            if key == "r":
                trial["r"] = trial["r"].clamp(0.5 / 2**R_BITS, 1 - 0.5 / 2**R_BITS)
            e, _ = _fit(w, generate_fields(trial, tile).flatten(-2), scaled)
            better = torch.isfinite(e) & (e < cur)
            f[key] = torch.where(better, trial[key], f[key])
            cur = torch.where(better, e, cur)
            improved |= better
        step_r = torch.where(improved, step_r, step_r / 2)
        step_t = torch.where(improved, step_t, step_t / 2)
    pick = cur.argmin(-1, keepdim=True)
    return {k: v.gather(1, pick).squeeze(1) for k, v in f.items()}


@torch.no_grad()
def encode(tiles: torch.Tensor, scaled: bool = True, refine_steps: int = 16, starts_kept: int = 4, chunk: int = 1024,
           progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeds (int64 [n]) and per-tile scales (float [n]; ones when ``scaled`` is False) for
    tiles [n, T, T].

    Search: score every tile against all grid starts at once (one matmul), keep the
    ``starts_kept`` best, refine r and theta of each by a shrinking pattern search, keep the best.
    Deterministic; vectorised over tiles, no loop over tiles.
    ``scaled`` fits a least-squares scale per unit-RMS tile (stored next to the seed); without it the
    seed alone must carry the magnitude (the paper's setting).
    """
    from tqdm.auto import tqdm

    n, tile, _ = tiles.shape
    device = tiles.device
    w_all = tiles.reshape(n, -1).double()
    starts, shapes = _start_shapes(tile)
    starts, shapes = {k: v.to(device) for k, v in starts.items()}, shapes.to(device)
    finite = torch.isfinite(shapes).all(-1)
    seeds, scales = [], []
    for lo in tqdm(range(0, n, chunk), desc="seed64 encoding", unit="chunk", disable=not progress):
        w = w_all[lo : lo + chunk]
        gg = (shapes * shapes).sum(-1)
        wg = w @ shapes.T
        if scaled:
            err = (w * w).sum(-1, keepdim=True) - wg * wg / gg.clamp_min(1e-300)
        else:
            err = (w * w).sum(-1, keepdim=True) - 2 * wg + gg
        err = torch.where(finite, err, torch.inf)
        best = err.topk(starts_kept, dim=-1, largest=False).indices  # [n, k]: refine several starts
        f = _refine(w, {k: v[best].clone() for k, v in starts.items()}, tile, scaled, refine_steps)
        # d_theta and rot shift the angle by k pi / (2m) and rot pi / 8: exactly what theta already
        # does with 24 bits, so they add nothing to the search and stay 0.
        qr = torch.clamp(torch.floor(f["r"] * 2**R_BITS), 0, 2**R_BITS - 1).long()
        qt = torch.remainder(torch.floor(torch.remainder(f["theta"], 2 * math.pi) / (2 * math.pi) * 2**THETA_BITS),
                             2**THETA_BITS).long()
        f["r"] = (qr.double() + 0.5) / 2**R_BITS
        f["theta"] = (qt.double() + 0.5) / 2**THETA_BITS * 2 * math.pi
        g = generate_fields(f, tile)
        _, alpha = _fit(w, g.reshape(len(w), -1), scaled)
        if scaled:
            alpha = alpha * _rms(g)  # the scale of the unit-RMS tile (see ``generate``)
        seeds.append(pack_tensor({**f, "r": qr, "theta": qt}))
        scales.append(alpha)
    return torch.cat(seeds), torch.cat(scales)


def tile_matrix(weight: torch.Tensor, tile: int) -> torch.Tensor:
    """[N, K] -> tiles [(N/T)(K/T), T, T] in row-major tile order."""
    n, k = weight.shape
    if n % tile or k % tile:
        raise EncodingError(f"seed64 needs both dimensions divisible by the tile {tile}, got {tuple(weight.shape)}")
    return weight.reshape(n // tile, tile, k // tile, tile).permute(0, 2, 1, 3).reshape(-1, tile, tile)


def untile_matrix(tiles: torch.Tensor, n: int, k: int) -> torch.Tensor:
    tile = tiles.shape[-1]
    return tiles.reshape(n // tile, k // tile, tile, tile).permute(0, 2, 1, 3).reshape(n, k)
