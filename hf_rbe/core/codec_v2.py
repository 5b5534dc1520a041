"""Encode and decode the RBE v2 planes (``core.format_v2``): the PyTorch reference.

``nearest(u, plane, table)`` finds the exact nearest codeword of each 8-vector (the building
block every encoder shares: calibration-free here, output-aware in ``core.ldlq``);
``encode_stage`` fits a scale per row or group around it; ``decode_stage`` inverts the codes.
All functions run on the tensor's own device, in chunks that bound memory.

A run of b1 stages (:func:`chains`) is encoded as one uniform grid: the first stage's scale is the
grid's top (``ladder_top``), each next stage's half the one before, so that taking each stage's sign
in turn picks the nearest of the ``2**run`` levels; the run's scales are refit together once its
codes are chosen. Fitted one at a time, as the other planes are, the first sign stage would take
the mean magnitude as its scale and leave the later ones a residual no grid covers well.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch

from .format_v2 import (
    IDX_OFFSET,
    PLANES,
    SIGN_OFFSET,
    VECTOR_DIM,
    LayerSpecV2,
    StageV2,
    b1_sign_table,
    e8p_sign_table,
    stage_prefix,
)
from .ldlq import refit_run
from .spec import check_finite, check_fp16_scales

_CHUNK = 1024  # vectors searched at once: a few MiB per temporary (the full e8p search is 1024 x 512 x 8)
_SCALE_STEPS = 3  # Lloyd steps on each group scale
_TINY = 1e-30
_E8P_BITS = PLANES["e8p"].bits
_U16 = 0xFFFF


# ----------------------------------------------------------------------------- codewords


def e8p_parts(table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(|entries| [512, 8], parity [512]: 1 where the entry needs an odd number of minus signs),
    from the stored form (coordinates 0-6 non-negative, coordinate 7 signed by the parity)."""
    return table.abs(), (table[:, VECTOR_DIM - 1] < 0).to(torch.int64)


def sequential_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over the last dimension, left to right, one rounding per add: the order is part of the
    e8p search's definition, so that every implementation rounds alike (``set_cpu_search``)."""
    s = t[..., 0]
    for j in range(1, t.shape[-1]):
        s = s + t[..., j]
    return s


def e8p_search(u: torch.Tensor, mag: torch.Tensor, parity: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(entry index [n], coordinate to flip against sign(u) or -1 [n]) of the nearest e8p codeword
    of each 8-vector ``u`` [n, 8]: the reference, in ``u``'s dtype.

    Every entry ``e`` is scored as ``|m_e|^2 - 2 |u| . m_e`` (the squared distance to ``|u|`` up to
    ``|u|^2``), plus ``4 min_j |u_j| m_ej`` where the signs of ``u`` do not meet the entry's parity
    (the cheapest coordinate to flip); sums run left to right, no fused multiply-add; the first
    entry of least score wins, and the first coordinate of least cost is flipped."""
    a = u.abs()
    mis = ((u < 0).sum(1) % 2)[:, None] != parity[None, :]  # [n, 512]
    p = a[:, None, :] * mag[None]  # [n, 512, 8]
    score = sequential_sum(mag * mag)[None, :] - 2 * sequential_sum(p)
    score = torch.where(mis, score + 4 * p.min(-1).values, score)
    idx = score.argmin(1)
    flip = (a * mag[idx]).argmin(1)
    return idx, torch.where(mis.gather(1, idx[:, None]).squeeze(1), flip, torch.full_like(flip, -1))


#: ``search(u, mag, parity)``: an implementation of :func:`e8p_search` for CPU tensors of fp32 or fp64
#: that gives the same results bit for bit (``set_cpu_search``; ``hf_rbe.kernels`` sets a compiled one).
_cpu_search: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None


def set_cpu_search(search: Callable[[torch.Tensor, torch.Tensor, torch.Tensor],
                                    tuple[torch.Tensor, torch.Tensor]] | None) -> None:
    """Install (or with ``None`` remove) the CPU implementation of :func:`e8p_search`."""
    global _cpu_search
    _cpu_search = search


def _e8p_nearest(u: torch.Tensor, mag: torch.Tensor, parity: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`e8p_search`, by the installed CPU implementation where it applies."""
    if _cpu_search is not None and u.device.type == "cpu" and u.dtype in (torch.float32, torch.float64):
        return _cpu_search(u, mag.to(u.dtype), parity)
    return e8p_search(u, mag.to(u.dtype), parity)


def nearest(u: torch.Tensor, plane: str, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest codewords of the 8-vectors ``u`` [n, 8] (fp32): (codes int64 [n], decoded fp32 [n, 8])."""
    codes, values = [], []
    for lo in range(0, len(u), _CHUNK):
        c, v = _nearest_chunk(u[lo : lo + _CHUNK], plane, table)
        codes.append(c)
        values.append(v)
    return torch.cat(codes), torch.cat(values)


def _nearest_chunk(u: torch.Tensor, plane: str, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    table = table.to(device=u.device, dtype=u.dtype)
    if plane == "b1":  # coordinates are independent: each takes the sign of u (the table is non-negative)
        neg = u < 0
        code = (neg.to(torch.int64) << torch.arange(VECTOR_DIM, device=u.device)).sum(1)
        return code, torch.where(neg, -table[0], table[0])
    if plane != "e8p":
        idx = ((table * table).sum(1)[None, :] - 2 * u @ table.T).argmin(1)
        return idx, table[idx]
    mag, parity = e8p_parts(table)
    idx, flip = _e8p_nearest(u, mag, parity)
    neg = u < 0
    has_flip = flip >= 0
    rows = has_flip.nonzero().squeeze(1)
    neg[rows, flip[rows]] ^= True
    values = torch.where(neg, -mag[idx], mag[idx])
    sign_bits = neg[:, : VECTOR_DIM - 1].to(torch.int64)
    weights = torch.arange(VECTOR_DIM - 1, device=u.device)
    code = (idx << IDX_OFFSET) | ((sign_bits << weights).sum(1) << SIGN_OFFSET)
    return code, values


def codewords(codes: torch.Tensor, plane: str, table: torch.Tensor) -> torch.Tensor:
    """fp32 [..., 8] codewords of int64 codes [...] (the reference decoder of one plane)."""
    table = table.float().to(codes.device)
    if plane == "b1":
        return b1_sign_table().to(codes.device)[codes] * table[0]
    if plane != "e8p":
        return table[codes]
    idx = (codes >> IDX_OFFSET) & (PLANES["e8p"].table_size - 1)
    signs = e8p_sign_table().to(codes.device)[(codes >> SIGN_OFFSET) & ((1 << PLANES["e8p"].sign) - 1)]
    return table[idx] * signs


# ----------------------------------------------------------------------------- code storage


def pack_plane(codes: torch.Tensor, plane: str) -> torch.Tensor:
    """int64 codes [N, V] -> the stored plane ([N, V] int16 / uint8, or [N, V/2] uint8 nibbles)."""
    p = PLANES[plane]
    if p.bits == _E8P_BITS:
        return codes.to(torch.int32).to(torch.int16)  # two's-complement wrap: bit 15 is a sign bit
    if p.codes_per_byte == 2:
        codes = codes[:, 0::2] | (codes[:, 1::2] << 4)  # low nibble first
    return codes.to(torch.uint8)


def unpack_plane(stored: torch.Tensor, plane: str) -> torch.Tensor:
    """Inverse of :func:`pack_plane`: int64 codes [N, V]."""
    p = PLANES[plane]
    if p.bits == _E8P_BITS:
        return stored.to(torch.int64) & _U16
    c = stored.to(torch.int64)
    if p.codes_per_byte == 2:
        c = torch.stack([c & 0xF, c >> 4], -1).flatten(-2)
    return c


# ----------------------------------------------------------------------------- stages


def _group_view(t: torch.Tensor, stage: StageV2) -> torch.Tensor:
    n, k = t.shape
    return t.reshape(n, stage.n_groups(k), -1)


def _codes_at(g: torch.Tensor, s: torch.Tensor, plane: str, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest codes [N, V] and unit codewords [N, G, K/G] of grouped weights ``g`` under scales ``s``."""
    u = (g / s.clamp_min(_TINY)[..., None]).reshape(-1, VECTOR_DIM)
    c, v = nearest(u, plane, table)
    return c.reshape(g.shape[0], -1), v.reshape(g.shape)


def initial_scale(w: torch.Tensor, stage: StageV2, table: torch.Tensor) -> torch.Tensor:
    """fp32 scales [N, groups] for ``w`` [N, K]: each group's RMS (the universal tables are fitted
    to unit variance), then a few Lloyd steps refitting it to the codes by least squares."""
    g = _group_view(w, stage)
    s = g.pow(2).mean(-1).sqrt()
    for _ in range(_SCALE_STEPS):
        _, v = _codes_at(g, s, stage.plane, table)
        num, den = (g * v).sum(-1), (v * v).sum(-1)
        s = torch.where(den > 0, num / den.clamp_min(_TINY), s)
    check_fp16_scales(s)
    return s


@functools.lru_cache(maxsize=16)
def ladder_top(planes: int) -> float:
    """Scale of the first of ``planes`` b1 stages whose scales halve from one to the next, in units
    of the weights' RMS: the uniform grid of ``2**planes`` levels with the least squared error on a
    unit Gaussian (evaluated at its quantiles, so deterministic)."""
    n, levels = 1 << 16, (1 << planes) - 1  # levels: the steps between the lowest and highest level
    x = math.sqrt(2) * torch.erfinv(2 * (torch.arange(n, dtype=torch.float64) + 0.5) / n - 1)
    best, top = math.inf, 1.0
    for s in torch.linspace(0.3, 3.0, 2701, dtype=torch.float64).tolist():
        step = 2 * s / (1 << planes - 1)  # the last stage's +-scale: levels this far apart
        q = ((x / step + levels / 2).round().clamp(0, levels) - levels / 2) * step
        err = float((x - q).pow(2).mean())
        if err < best:
            best, top = err, s
    return top


def chains(spec: LayerSpecV2) -> list[tuple[int, int]]:
    """Stage ranges ``[start, stop)`` encoded together: each run of b1 stages with the same scale
    groups, every other stage alone."""
    out: list[tuple[int, int]] = []
    for i, stage in enumerate(spec.stages):
        if out and stage.plane == "b1" and spec.stages[i - 1] == stage:
            out[-1] = (out[-1][0], i + 1)
        else:
            out.append((i, i + 1))
    return out


def ladder_scale(w: torch.Tensor, stage: StageV2, planes: int) -> torch.Tensor:
    """fp32 scales [N, groups] of the first stage of a run of ``planes`` b1 stages for ``w`` [N, K]."""
    s = _group_view(w, stage).pow(2).mean(-1).sqrt() * ladder_top(planes)
    check_fp16_scales(s)
    return s


def encode_stage(w: torch.Tensor, stage: StageV2,
                 table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(stored codes, fp16 scales [N, groups], decoded fp32 [N, K]) for a rotated ``w`` [N, K].

    The codes are chosen under the fitted scale (rounded to fp16); each group's scale is then
    the least-squares one for those codes (what ``core.ldlq`` does with ``H = I``)."""
    n, k = w.shape
    g = _group_view(w, stage)
    codes, v = _codes_at(g, initial_scale(w, stage, table).half().float(), stage.plane, table)
    num, den = (g * v).sum(-1), (v * v).sum(-1)
    s16 = torch.where(den > 0, num / den.clamp_min(_TINY), torch.zeros_like(num)).half()
    return pack_plane(codes, stage.plane), s16, (v * s16.float()[..., None]).reshape(n, k)


def reference_decode_stage(stored: torch.Tensor, scale: torch.Tensor, plane: str, table: torch.Tensor,
                           in_features: int) -> torch.Tensor:
    """fp32 [N, in_features] from one stage's stored codes and scales: the reference decoder."""
    n = stored.shape[0]
    v = codewords(unpack_plane(stored, plane), plane, table)  # [N, K/8, 8]
    per_group = v.shape[1] // scale.shape[1]
    v = v.reshape(n, scale.shape[1], per_group * VECTOR_DIM) * scale.float()[..., None]
    return v.reshape(n, in_features)


#: ``decode(stored, scale, plane, table, in_features)``: an implementation of
#: :func:`reference_decode_stage` for CPU tensors that gives the same result bit for bit
#: (``set_cpu_decode``; ``hf_rbe.kernels`` sets a compiled one).
_cpu_decode: Callable[[torch.Tensor, torch.Tensor, str, torch.Tensor, int], torch.Tensor] | None = None


def set_cpu_decode(decode: Callable[[torch.Tensor, torch.Tensor, str, torch.Tensor, int], torch.Tensor] | None) -> None:
    """Install (or with ``None`` remove) the CPU implementation of :func:`reference_decode_stage`."""
    global _cpu_decode
    _cpu_decode = decode


def decode_stage(stored: torch.Tensor, scale: torch.Tensor, stage: StageV2, table: torch.Tensor,
                 in_features: int) -> torch.Tensor:
    """fp32 [N, in_features] from one stage's stored codes and scales, by the installed CPU decoder
    where it applies (CPU tensors, and no scale or table that autograd must see)."""
    if (_cpu_decode is not None and all(t.device.type == "cpu" for t in (stored, scale, table))
            and not (torch.is_grad_enabled() and (scale.requires_grad or table.requires_grad))):
        return _cpu_decode(stored, scale, stage.plane, table, in_features)
    return reference_decode_stage(stored, scale, stage.plane, table, in_features)


def encode_layer(w_rot: torch.Tensor, spec: LayerSpecV2, tables: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Stored tensors of every stage for a rotated fp32 weight (rotation seed and tables excluded)."""
    check_finite(w_rot)
    out, r = {}, w_rot.float()
    for start, stop in chains(spec):
        if stop - start == 1:
            prefix, stage = spec.prefixed_stages[start]
            codes, scale, decoded = encode_stage(r, stage, tables[prefix + "table"])
            out[prefix + "weight"], out[prefix + "scale"] = codes, scale
            r = r - decoded
            continue
        run = spec.prefixed_stages[start:stop]
        s = ladder_scale(r, run[0][1], stop - start)
        target, units, ladder = r, [], []
        for prefix, stage in run:
            s16 = s.half().float()
            codes, v = _codes_at(_group_view(r, stage), s16, stage.plane, tables[prefix + "table"])
            out[prefix + "weight"] = pack_plane(codes, stage.plane)
            units.append(v)
            ladder.append(s16)
            r = r - (v * s16[..., None]).reshape(r.shape)
            s = s16 / 2
        scales = refit_run(target, [v.reshape(r.shape) for v in units], None, ladder)
        for (prefix, _), v, s16 in zip(run, units, scales):
            out[prefix + "scale"] = s16
        r = target - sum((v * s16.float()[..., None]).reshape(r.shape) for v, s16 in zip(units, scales))
    return out


def decode_layer(tensors: dict[str, torch.Tensor], spec: LayerSpecV2, in_features: int) -> torch.Tensor:
    """fp32 rotated weight [N, in_features]: the sum of every stage."""
    w = None
    for i, stage in enumerate(spec.stages):
        p = stage_prefix(i)
        part = decode_stage(tensors[p + "weight"], tensors[p + "scale"], stage, tensors[p + "table"], in_features)
        w = part if w is None else w + part
    return w  # type: ignore[return-value]
