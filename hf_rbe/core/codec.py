"""Encode a weight matrix into the RBE format and decode it back (the PyTorch reference).

Encoding is calibration-free and vectorised: every vector's code comes from one matrix
product with the table (best direction), then a few Lloyd steps fit each group's scale to
the gain levels. No loop runs over vectors; rows are processed in chunks to bound memory.
All functions run on the tensor's own device.
"""

from __future__ import annotations

import torch

from .bits import pack_codes, unpack_codes
from .format import LayerSpec, ResidualSpec, StageSpec
from .rotation import rotate_weight
from .spec import check_finite, check_fp16_scales
from .tables import LayerTables, StageTables, best_projection, directions

_CHUNK_ELEMENTS = 1 << 20  # projections held at once (vectors x directions): a few MiB per temporary
_SCALE_STEPS = 4  # Lloyd steps on each group scale
_FP8_MAX = 448.0  # largest finite float8_e4m3fn
_CLIP_RATIOS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)  # int residual: fractions of the group max tried as its range
_TINY = 1e-30


# ----------------------------------------------------------------------------- one stage


def _nearest_level(t: torch.Tensor, levels_sorted: torch.Tensor) -> torch.Tensor:
    """Index into ``levels_sorted`` of the level nearest to each element of ``t``."""
    j = torch.searchsorted(levels_sorted, t.contiguous()).clamp(1, len(levels_sorted) - 1)
    lo, hi = levels_sorted[j - 1], levels_sorted[j]
    return torch.where((t - lo) <= (hi - t), j - 1, j)


def _projections(vecs: torch.Tensor, stage: StageSpec, tables: StageTables) -> tuple[torch.Tensor, torch.Tensor]:
    """(best direction index, signed projection on it) of each vector [n, dim], in chunks."""
    dirs = directions(tables.table.to(vecs.device), stage.layout.deriv)
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // len(dirs))
    best, proj = [], []
    for start in range(0, len(vecs), rows_per_chunk):
        a, p = best_projection(vecs[start : start + rows_per_chunk], dirs, bool(stage.layout.sign))
        best.append(a)
        proj.append(p)
    return torch.cat(best), torch.cat(proj)


def _levels(tables: StageTables, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return tables.lut.to(device).flatten().sort()


def _codes(a: torch.Tensor, p: torch.Tensor, stage: StageSpec, tables: StageTables) -> torch.Tensor:
    """int64 codes of direction ``a`` and (scale-divided) projection ``p``: the nearest gain level."""
    lay = stage.layout
    levels, order = _levels(tables, p.device)
    flat_idx = order[_nearest_level(p.abs(), levels)]
    curve, q = flat_idx // lay.n_levels, flat_idx % lay.n_levels
    n_table = lay.table_size
    return lay.pack_fields(idx=a % n_table, deriv=a // n_table, sign=(p < 0).to(torch.int64),
                           amp=q >> lay.amp_fine, amp_fine=q & ((1 << lay.amp_fine) - 1),
                           cat=curve >> lay.sub, sub=curve & ((1 << lay.sub) - 1))


def initial_scale(w: torch.Tensor, stage: StageSpec, tables: StageTables,
                  proj: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 scales [N, groups] fitted to ``w`` [N, K]: Lloyd steps between each group's
    projections and the gain levels (``proj``: the projections, if already computed)."""
    n_rows, k = w.shape
    if proj is None:
        _, proj = _projections(w.reshape(-1, stage.dim), stage, tables)
    n_groups = stage.n_groups(k)
    g = proj.abs().reshape(n_rows, n_groups, -1)
    levels, _ = _levels(tables, w.device)
    scale = w.reshape(n_rows, n_groups, -1).pow(2).mean(-1).sqrt()
    for _ in range(_SCALE_STEPS):  # Lloyd steps on the group scale
        f = levels[_nearest_level(g / scale.clamp_min(_TINY)[..., None], levels)]
        num, den = (g * f).sum(-1), (f * f).sum(-1)
        scale = torch.where(den > 0, num / den.clamp_min(_TINY), scale)
    check_fp16_scales(scale)
    return scale


def nearest(u: torch.Tensor, stage: StageSpec, tables: StageTables) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest codewords (unit scale) of vectors ``u`` [n, dim]: (int64 codes [n], fp32 values [n, dim])."""
    a, p = _projections(u, stage, tables)
    codes = _codes(a, p, stage, tables)
    vec, gain = _codeword_parts(codes, stage, tables)
    return codes, vec * gain[..., None]


def _codeword_parts(codes: torch.Tensor, stage: StageSpec, tables: StageTables) -> tuple[torch.Tensor, torch.Tensor]:
    """(unit direction [..., dim], signed gain [...]) of int64 codes [...]."""
    lay = stage.layout
    f = lay.unpack_fields(codes)
    table, lut = tables.table.to(codes.device).float(), tables.lut.to(codes.device).float()
    vec = directions(table, lay.deriv)[f["idx"] + len(table) * f["deriv"]]
    gain = lut[(f["cat"] << lay.sub) | f["sub"], (f["amp"] << lay.amp_fine) | f["amp_fine"]]
    return vec, gain * (1 - 2 * f["sign"]).float()


def encode_stage(w: torch.Tensor, stage: StageSpec, tables: StageTables) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (int32 words [N, words]) and scales (fp16 [N, groups]) for ``w`` [N, K] (fp32)."""
    n_rows, k = w.shape
    a, p = _projections(w.reshape(-1, stage.dim), stage, tables)
    scale16 = initial_scale(w, stage, tables, p).half()
    s = scale16.float().clamp_min(_TINY)[..., None]
    codes = _codes(a, (p.reshape(n_rows, scale16.shape[1], -1) / s).reshape(-1), stage, tables)
    return pack_codes(codes.reshape(n_rows, k // stage.dim), stage.layout.width), scale16


def decode_stage(
    words: torch.Tensor, scale: torch.Tensor, stage: StageSpec, tables: StageTables, in_features: int
) -> torch.Tensor:
    """fp32 [N, in_features] from packed codes and scales (the reference decoder). The order of the
    products below is part of the format: v1 checkpoints decode bit-identically to the code that
    wrote them."""
    n_rows, n_vec = words.shape[0], in_features // stage.dim
    vec, gain = _codeword_parts(unpack_codes(words, stage.layout.width, n_vec), stage, tables)  # [N, V, dim], [N, V]
    groups = scale.float().repeat_interleave(n_vec // scale.shape[1], dim=1)
    return (vec * (gain * groups)[..., None]).reshape(n_rows, in_features)


# ----------------------------------------------------------------------------- residuals


def _int_levels(bits: int) -> float:
    return ((1 << bits) - 1) / 2  # codes q in [0, 2**b - 1] stand for (q - half) * scale


def encode_int_residual(r: torch.Tensor, spec: ResidualSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-scaled integers: packed int32 words and fp16 scales [N, K // group]."""
    bits = spec.int_bits or 0
    n_rows, k = r.shape
    half = _int_levels(bits)
    grp = r.reshape(n_rows, k // spec.group_size, spec.group_size)
    amax = grp.abs().amax(-1)
    best_err, best_scale = None, None
    for clip in _CLIP_RATIOS:  # clipping search: pick the lowest MSE per group
        s = (amax * clip / half).half().float().clamp_min(_TINY)
        q = (grp / s[..., None] + half).round().clamp(0, 2 * half)
        err = ((q - half) * s[..., None] - grp).pow(2).sum(-1)
        if best_err is None:
            best_err, best_scale = err, s
        else:
            better = err < best_err
            best_err, best_scale = torch.where(better, err, best_err), torch.where(better, s, best_scale)
    q = (grp / best_scale[..., None] + half).round().clamp(0, 2 * half).to(torch.int64)
    return pack_codes(q.reshape(n_rows, k), bits), best_scale.half()


def decode_int_residual(words: torch.Tensor, scale: torch.Tensor, spec: ResidualSpec, in_features: int) -> torch.Tensor:
    bits = spec.int_bits or 0
    q = unpack_codes(words, bits, in_features).float() - _int_levels(bits)
    return q * scale.float().repeat_interleave(spec.group_size, dim=1)


def encode_fp8_residual(r: torch.Tensor, spec: ResidualSpec) -> tuple[torch.Tensor, torch.Tensor]:
    n_rows, k = r.shape
    grp = r.reshape(n_rows, k // spec.group_size, spec.group_size)
    s = (grp.abs().amax(-1) / _FP8_MAX).half().float().clamp_min(_TINY)
    q = (grp / s[..., None]).clamp(-_FP8_MAX, _FP8_MAX).to(torch.float8_e4m3fn)
    return q.reshape(n_rows, k), s.half()


def decode_fp8_residual(values: torch.Tensor, scale: torch.Tensor, spec: ResidualSpec) -> torch.Tensor:
    return values.float() * scale.float().repeat_interleave(spec.group_size, dim=1)


# ----------------------------------------------------------------------------- whole layer


def encode_layer(
    weight: torch.Tensor, spec: LayerSpec, tables: LayerTables, rotation_seed: int = 0
) -> dict[str, torch.Tensor]:
    """All stored tensors of one layer (see ``core.format``), tables excluded."""
    check_finite(weight)
    spec.check_shape(*weight.shape)
    out = encode_rotated(rotate_weight(weight, spec, rotation_seed), spec, tables)
    if spec.rotation:
        out["rotation_seed"] = torch.tensor([rotation_seed], dtype=torch.int64, device=weight.device)
    return out


def encode_rotated(w: torch.Tensor, spec: LayerSpec, tables: LayerTables) -> dict[str, torch.Tensor]:
    """The codes and scales of every stage for an already rotated fp32 weight ``W S H``."""
    k = w.shape[1]
    words, scale = encode_stage(w, spec.stage, tables.stage)
    out = {"weight": words, "scale": scale}
    res = spec.residual
    if res.kind == "none":
        return out
    r = w - decode_stage(words, scale, spec.stage, tables.stage, k)
    if res.kind == "rbe":
        out["residual_weight"], out["residual_scale"] = encode_stage(r, res.stage, tables.residual)  # type: ignore[arg-type]
    elif res.kind == "fp8":
        out["residual_weight"], out["residual_scale"] = encode_fp8_residual(r, res)
    else:
        out["residual_weight"], out["residual_scale"] = encode_int_residual(r, res)
    return out


def decode_layer(
    tensors: dict[str, torch.Tensor], spec: LayerSpec, tables: LayerTables, in_features: int
) -> torch.Tensor:
    """fp32 rotated weight ``W S H`` [N, in_features] from the stored tensors."""
    w = decode_stage(tensors["weight"], tensors["scale"], spec.stage, tables.stage, in_features)
    res = spec.residual
    if res.kind == "rbe":
        w = w + decode_stage(tensors["residual_weight"], tensors["residual_scale"], res.stage,  # type: ignore[arg-type]
                             tables.residual, in_features)
    elif res.kind == "fp8":
        w = w + decode_fp8_residual(tensors["residual_weight"], tensors["residual_scale"], res)
    elif res.kind != "none":
        w = w + decode_int_residual(tensors["residual_weight"], tensors["residual_scale"], res, in_features)
    return w
