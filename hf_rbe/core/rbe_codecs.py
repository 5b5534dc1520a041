"""What ``RBELinear`` needs from an RBE format, for v1 (bitfield codes) and v2 (planes).

Both formats rotate the input side the same way and share tables across a model; they differ
in how a rotated weight becomes codes and back. :class:`RBECodec` names those differences
once, so the layer, the op reference and the transformers glue never branch on the format.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Union

import torch
import torch.nn.functional as F

from . import codec as v1
from . import codec_v2 as v2
from . import format as format_v1
from . import format_v2, tables_v2
from . import tables as tables_v1
from .bits import pack_codes, padding_is_clean
from .errors import CheckpointError, ConfigError
from .ldlq import StageQuantizer

Spec = Union[format_v1.LayerSpec, format_v2.LayerSpecV2]
Tensors = dict[str, torch.Tensor]
_UNIT_ROW_TOL = 1e-3
#: Bound on table and gain-curve entries. They are normalised (the fp16 scales carry each group's
#: magnitude): the universal ones stay below 4.5, fitted and trained ones near that. A value far
#: beyond it decodes to weights that overflow the activations a few layers later (NaN logits).
TABLE_MAX = 64.0


@dataclass(frozen=True)
class RBECodec:
    """One RBE format, as the layer sees it.

    ``encode(w_rot, spec, tables)`` returns the per-layer codes and scales of a rotated fp32
    weight; ``decode(named, spec, in_features)`` the rotated fp32 weight from stored tensors and
    tables; ``check(named, spec, in_features, where)`` raises CheckpointError on values the format
    cannot hold; ``constrain(tables)`` maps trained tables back to what the format allows;
    ``stage_quantizers(spec, tables)`` hands each stage to the output-aware encoder
    (``core.ldlq``).
    """

    format_id: int
    version: int
    spec_type: type
    universal_tables: Callable[[Any], Tensors]
    fit_tables: Callable[[torch.Tensor, Any], Tensors]
    table_key: Callable[[Any], str]
    encode: Callable[[torch.Tensor, Any, Tensors], Tensors]
    decode: Callable[[Tensors, Any, int], torch.Tensor]
    check: Callable[[Tensors, Any, int, str], None]
    constrain: Callable[[Tensors], Tensors]
    stage_quantizers: Callable[[Any, Tensors], list[StageQuantizer]]

    def __reduce__(self) -> tuple:
        return codec_by_id, (self.format_id,)  # a layer pickles its codec by reference (it holds functions)


def _finite(named: Tensors, names: list[str], where: str) -> None:
    for n in names:
        if not torch.isfinite(named[n].float()).all():
            raise CheckpointError(f"{where}: '{n}' holds NaN/Inf (tampered checkpoint?)")


def _bounded(named: Tensors, names: list[str], where: str) -> None:
    for n in names:
        if named[n].float().abs().max() > TABLE_MAX:
            raise CheckpointError(f"{where}: '{n}' holds entries beyond +-{TABLE_MAX:g}; tables are normalised "
                                  "(tampered checkpoint?)")


def _v1_check(named: Tensors, spec: format_v1.LayerSpec, in_features: int, where: str) -> None:
    for prefix, stage in spec.stages:
        _finite(named, [prefix + "scale", prefix + "table", prefix + "lut"], where)
        _bounded(named, [prefix + "table", prefix + "lut"], where)
        norms = named[prefix + "table"].float().norm(dim=1)
        if not torch.allclose(norms, torch.ones_like(norms), atol=_UNIT_ROW_TOL):
            raise CheckpointError(f"{where}: '{prefix}table' rows are not unit vectors (tampered checkpoint?)")
        if not padding_is_clean(named[prefix + "weight"], stage.layout.width, in_features // stage.dim):
            raise CheckpointError(f"{where}: '{prefix}weight' has bits set past its last code (tampered checkpoint?)")
    if spec.residual.kind in ("int2", "int4", "int8", "fp8"):
        _finite(named, ["residual_scale"], where)
        if spec.residual.kind == "fp8":
            _finite(named, ["residual_weight"], where)


def _v2_check(named: Tensors, spec: format_v2.LayerSpecV2, in_features: int, where: str) -> None:
    for prefix, stage in spec.prefixed_stages:
        _finite(named, [prefix + "scale", prefix + "table"], where)
        _bounded(named, [prefix + "table"], where)
        if stage.plane == "e8p":
            t = named[prefix + "table"]
            if (t[:, :-1] < 0).any() or (t[:, -1] == 0).any():
                raise CheckpointError(f"{where}: '{prefix}table' is not an e8p table (coordinates 0-6 must be >= 0 "
                                      "and coordinate 7 non-zero; tampered checkpoint?)")
        if stage.plane == "b1" and (named[prefix + "table"] < 0).any():
            raise CheckpointError(f"{where}: '{prefix}table' is not a b1 table (its entry must be >= 0; "
                                  "tampered checkpoint?)")


def _v1_constrain(tables: Tensors) -> Tensors:
    """v1 basis rows are unit vectors: training moves their directions, not their lengths."""
    return {n: F.normalize(t, dim=-1) if n.endswith("table") else t for n, t in tables.items()}


def _v2_constrain(tables: Tensors) -> Tensors:
    """e8p entries are non-negative before their signs (coordinate 7 carries the parity), as is
    b1's one entry."""
    out = {}
    for n, t in tables.items():
        if t.shape[0] == format_v2.PLANES["e8p"].table_size:
            t = torch.cat([t[:, :-1].abs(), t[:, -1:]], dim=1)
        elif t.shape[0] == format_v2.PLANES["b1"].table_size:
            t = t.abs()
        out[n] = t
    return out


def _v1_quantizers(spec: format_v1.LayerSpec, tables: Tensors) -> list[StageQuantizer]:
    if spec.residual.kind not in ("none", "rbe"):
        raise ConfigError(f"calibration encodes RBE stages; a {spec.residual.kind} residual is not supported: use "
                          "residual='rbe' or format_version=2")
    out = []
    for prefix, stage in spec.stages:
        st = tables_v1.StageTables(tables[prefix + "table"], tables[prefix + "lut"])
        out.append(StageQuantizer(prefix, stage.dim, stage.group_size,
                                  nearest=lambda u, stage=stage, st=st: v1.nearest(u, stage, st),
                                  initial_scale=lambda w, stage=stage, st=st: v1.initial_scale(w, stage, st),
                                  pack=lambda c, width=stage.layout.width: pack_codes(c, width)))
    return out


def _v2_quantizers(spec: format_v2.LayerSpecV2, tables: Tensors) -> list[StageQuantizer]:
    out = []
    for start, stop in v2.chains(spec):  # a run of b1 stages: one uniform grid (``codec_v2``)
        for i in range(start, stop):
            prefix, stage = spec.prefixed_stages[i]
            t = tables[prefix + "table"]
            if stop - start == 1:
                initial = functools.partial(v2.initial_scale, stage=stage, table=t)
            else:
                initial = functools.partial(v2.ladder_scale, stage=stage, planes=stop - start)
            out.append(StageQuantizer(prefix, format_v2.VECTOR_DIM, stage.group_size,
                                      nearest=functools.partial(v2.nearest, plane=stage.plane, table=t),
                                      initial_scale=initial,
                                      pack=functools.partial(v2.pack_plane, plane=stage.plane),
                                      joins_previous=i > start,
                                      decode=functools.partial(v2.codewords, plane=stage.plane, table=t)))
    return out


V1 = RBECodec(
    format_id=format_v1.FORMAT_ID, version=format_v1.FORMAT_VERSION, spec_type=format_v1.LayerSpec,
    universal_tables=lambda spec: tables_v1.tables_for(spec).as_tensors(),
    fit_tables=lambda w_rot, spec: tables_v1.layer_tables(w_rot, spec).as_tensors(),
    table_key=tables_v1.table_key,
    encode=lambda w_rot, spec, t: v1.encode_rotated(w_rot, spec, tables_v1.LayerTables.from_tensors(t)),
    decode=lambda named, spec, k: v1.decode_layer(named, spec, tables_v1.LayerTables.from_tensors(named), k),
    check=_v1_check, constrain=_v1_constrain, stage_quantizers=_v1_quantizers)

V2 = RBECodec(
    format_id=format_v2.FORMAT_ID, version=format_v2.FORMAT_VERSION, spec_type=format_v2.LayerSpecV2,
    universal_tables=tables_v2.universal_tables, fit_tables=tables_v2.fit_layer_tables,
    table_key=tables_v2.table_key, encode=v2.encode_layer, decode=v2.decode_layer,
    check=_v2_check, constrain=_v2_constrain, stage_quantizers=_v2_quantizers)

_BY_ID = {c.format_id: c for c in (V1, V2)}


def codec_for(spec: Spec) -> RBECodec:
    for c in (V1, V2):
        if isinstance(spec, c.spec_type):
            return c
    raise ConfigError(f"not an RBE layer format: {spec!r}")


def codec_by_id(format_id: int) -> RBECodec:
    return _BY_ID[format_id]


def universal_tables(spec: Spec) -> Tensors:
    """The universal tables of any RBE layer format, by stored name (what a fresh layer encodes against)."""
    return codec_for(spec).universal_tables(spec)
