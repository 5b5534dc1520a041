"""The RBE format v1: every code field's name, width and offset, and every stored tensor, defined once.

One code per vector of ``dim`` consecutive (rotated) weights along ``in_features``. A code is a
bitfield, most significant field first (paper 002)::

    [ amp_fine | cat | sub | idx | sign | deriv | amp ]   (amp in the least significant bits)

- ``idx``   picks one of ``2**idx`` unit basis vectors of the shared table;
- ``sign``  negates it; ``deriv`` applies the derivative map D (see ``core.tables``);
- ``amp`` (coarse) and ``amp_fine`` (fine) form the magnitude index ``q = amp << fine | amp_fine``;
- ``cat``, ``sub`` pick the gain curve ``F_{cat,sub}``; the gain is ``scale[group] * F(q)``.

Codes of ``width`` bits are packed as one little-endian bit stream per row into int32 words
(``core.bits``). A layer stores (shapes from :meth:`LayerSpec.tensors` and
:meth:`LayerSpec.table_tensors`, nowhere else)::

    weight          int32 [out_features, words]          packed stage-1 codes
    scale           fp16  [out_features, in_features // group_size]
    rotation_seed   int64 [1]  (only with rotation) seeds the random Hadamard signs
    residual_*      the residual, by kind (see ``ResidualSpec``)
    table           fp32  [2**idx, dim]   unit rows  } only in the layer that owns the model's
    lut             fp32  [2**(cat+sub), 2**(amp+amp_fine)]  } shared table (``residual_`` twins
                                                               for an RBE residual stage)

This module is plain Python + torch; it knows nothing of transformers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import ConfigError, EncodingError
from .spec import TensorSpec, n_words

#: Format versions this code reads: 1 (this bitfield and the seed64 layout).
FORMAT_VERSION = 1
#: This format's id in the layer op's layout (``core.ops``).
FORMAT_ID = 1

#: Field order from the most to the least significant bits (paper 002), and each field's widest width.
FIELDS: tuple[str, ...] = ("amp_fine", "cat", "sub", "idx", "sign", "deriv", "amp")
MAX_WIDTH: dict[str, int] = {"amp_fine": 8, "cat": 2, "sub": 2, "idx": 16, "sign": 1, "deriv": 1, "amp": 8}
CODE_BITS_MAX = 32  # a code fits one 64-bit window of two int32 words

RESIDUAL_KINDS: tuple[str, ...] = ("none", "int8", "fp8", "int4", "int2", "rbe")
INT_RESIDUAL_BITS: dict[str, int] = {"int8": 8, "int4": 4, "int2": 2}
SCALE_DTYPE = torch.float16
TABLE_DTYPE = torch.float32


@dataclass(frozen=True)
class CodeLayout:
    """Widths in bits of the seven code fields; 0 switches a field off."""

    idx: int = 8
    sign: int = 1
    amp: int = 2
    deriv: int = 0
    cat: int = 0
    sub: int = 0
    amp_fine: int = 0

    def __post_init__(self) -> None:
        for name in FIELDS:
            w = getattr(self, name)
            if not isinstance(w, int) or isinstance(w, bool) or not 0 <= w <= MAX_WIDTH[name]:
                raise ConfigError(f"field '{name}' must be an int in [0, {MAX_WIDTH[name]}], got {w!r}")
        if self.width == 0:
            raise ConfigError("a code needs at least one bit")
        if self.width > CODE_BITS_MAX:
            raise ConfigError(f"a code holds at most {CODE_BITS_MAX} bits, these widths add up to {self.width}")

    @property
    def width(self) -> int:
        return sum(getattr(self, f) for f in FIELDS)

    @property
    def offsets(self) -> dict[str, int]:
        """Bit offset of each field's least significant bit."""
        out, pos = {}, 0
        for name in reversed(FIELDS):
            out[name] = pos
            pos += getattr(self, name)
        return out

    @property
    def table_size(self) -> int:
        return 1 << self.idx

    @property
    def n_levels(self) -> int:
        return 1 << (self.amp + self.amp_fine)

    @property
    def n_curves(self) -> int:
        return 1 << (self.cat + self.sub)

    def pack_fields(self, **values: torch.Tensor) -> torch.Tensor:
        """Combine field tensors (missing ones are 0) into int64 codes."""
        offs = self.offsets
        code = None
        for name in FIELDS:
            w = getattr(self, name)
            v = values.get(name)
            if v is None or w == 0:
                continue
            part = (v.to(torch.int64) & ((1 << w) - 1)) << offs[name]
            code = part if code is None else code | part
        if code is None:
            raise ConfigError("no field values given")
        return code

    def unpack_fields(self, codes: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split int64 codes into one int64 tensor per field (0 for absent fields)."""
        offs = self.offsets
        codes = codes.to(torch.int64)
        return {
            name: (codes >> offs[name]) & ((1 << getattr(self, name)) - 1)
            if getattr(self, name)
            else torch.zeros_like(codes)
            for name in FIELDS
        }


@dataclass(frozen=True)
class StageSpec:
    """One RBE stage: vectors of ``dim`` weights, one code each, gains scaled per group."""

    dim: int = 4
    layout: CodeLayout = field(default_factory=CodeLayout)
    group_size: int | None = None  # weights per scale along in_features; None: one per row

    def __post_init__(self) -> None:
        if not isinstance(self.dim, int) or isinstance(self.dim, bool) or not 1 <= self.dim <= 32:
            raise ConfigError(f"vector dim must be an int in [1, 32], got {self.dim!r}")
        if self.layout.deriv and self.dim % 2:
            raise ConfigError("the deriv field needs an even vector dim (D rotates pairs)")
        g = self.group_size
        if g is not None and (not isinstance(g, int) or isinstance(g, bool) or g <= 0 or g % self.dim):
            raise ConfigError(f"group_size {g!r} must be a positive int multiple of dim {self.dim}")

    @property
    def bits_per_code_weight(self) -> float:
        return self.layout.width / self.dim

    def check_shape(self, out_features: int, in_features: int) -> None:
        if in_features % self.dim:
            raise EncodingError(f"in_features {in_features} is not a multiple of the vector dim {self.dim}")
        if self.group_size is not None and in_features % self.group_size:
            raise EncodingError(f"in_features {in_features} is not a multiple of group_size {self.group_size}")

    def n_groups(self, in_features: int) -> int:
        return 1 if self.group_size is None else in_features // self.group_size

    def n_words(self, in_features: int) -> int:
        return n_words(in_features // self.dim, self.layout.width)

    def tensors(self, out_features: int, in_features: int, prefix: str = "") -> dict[str, TensorSpec]:
        return {prefix + "weight": TensorSpec((out_features, self.n_words(in_features)), torch.int32),
                prefix + "scale": TensorSpec((out_features, self.n_groups(in_features)), SCALE_DTYPE)}

    def table_tensors(self, prefix: str = "") -> dict[str, TensorSpec]:
        lay = self.layout
        return {prefix + "table": TensorSpec((lay.table_size, self.dim), TABLE_DTYPE),
                prefix + "lut": TensorSpec((lay.n_curves, lay.n_levels), TABLE_DTYPE)}

    def bits_per_weight(self, in_features: int) -> float:
        return self.bits_per_code_weight + 16 * self.n_groups(in_features) / in_features

    def to_layout(self) -> list[int]:
        return [self.dim, *(getattr(self.layout, f) for f in FIELDS), self.group_size or 0]

    @classmethod
    def from_layout(cls, ints: list[int]) -> StageSpec:
        dim, *widths, group = ints
        return cls(dim, CodeLayout(**dict(zip(FIELDS, widths))), group or None)


_STAGE_INTS = 2 + len(FIELDS)  # dim, the field widths, group_size


@dataclass(frozen=True)
class ResidualSpec:
    """What corrects stage 1: nothing, group-scaled integers or fp8, or a second RBE stage."""

    kind: str = "none"
    group_size: int = 64
    stage: StageSpec | None = None  # only for kind == "rbe"

    def __post_init__(self) -> None:
        if self.kind not in RESIDUAL_KINDS:
            raise ConfigError(f"residual kind must be one of {RESIDUAL_KINDS}, got {self.kind!r}")
        if self.kind == "rbe" and self.stage is None:
            raise ConfigError("residual kind 'rbe' needs a stage spec")
        if self.kind != "rbe" and self.stage is not None:
            raise ConfigError(f"residual kind {self.kind!r} takes no stage spec")
        if self.kind in INT_RESIDUAL_BITS or self.kind == "fp8":
            g = self.group_size
            if not isinstance(g, int) or isinstance(g, bool) or g <= 0 or g % 16:
                raise ConfigError(f"residual group_size must be a positive multiple of 16, got {g!r}")

    @property
    def int_bits(self) -> int | None:
        return INT_RESIDUAL_BITS.get(self.kind)

    def check_shape(self, out_features: int, in_features: int) -> None:
        if self.kind == "rbe":
            self.stage.check_shape(out_features, in_features)  # type: ignore[union-attr]
        elif self.kind != "none" and in_features % self.group_size:
            raise EncodingError(f"in_features {in_features} is not a multiple of residual group {self.group_size}")

    def tensors(self, out_features: int, in_features: int) -> dict[str, TensorSpec]:
        if self.kind == "none":
            return {}
        if self.kind == "rbe":
            return self.stage.tensors(out_features, in_features, "residual_")  # type: ignore[union-attr]
        scale = TensorSpec((out_features, in_features // self.group_size), SCALE_DTYPE)
        if self.kind == "fp8":
            values = TensorSpec((out_features, in_features), torch.float8_e4m3fn)
        else:
            values = TensorSpec((out_features, n_words(in_features, self.int_bits)), torch.int32)  # type: ignore[arg-type]
        return {"residual_weight": values, "residual_scale": scale}


@dataclass(frozen=True)
class LayerSpec:
    """Everything that fixes the stored format of one layer."""

    stage: StageSpec = field(default_factory=StageSpec)
    residual: ResidualSpec = field(default_factory=ResidualSpec)
    rotation: bool = True
    rotation_block: int = 256  # cap on the Hadamard block (a power of two)
    table_seed: int = 0

    def __post_init__(self) -> None:
        b = self.rotation_block
        if not isinstance(b, int) or isinstance(b, bool) or b < 1 or b & (b - 1):
            raise ConfigError(f"rotation_block must be a power of two, got {b!r}")
        if not isinstance(self.rotation, bool):
            raise ConfigError(f"rotation must be a bool, got {self.rotation!r}")

    @property
    def stages(self) -> list[tuple[str, StageSpec]]:
        """(tensor name prefix, stage) for stage 1 and, with an RBE residual, stage 2."""
        out = [("", self.stage)]
        if self.residual.kind == "rbe":
            out.append(("residual_", self.residual.stage))  # type: ignore[arg-type]
        return out

    def check_shape(self, out_features: int, in_features: int) -> None:
        """Raise EncodingError if a [out_features, in_features] weight cannot be stored."""
        self.stage.check_shape(out_features, in_features)
        self.residual.check_shape(out_features, in_features)

    def hadamard_block(self, in_features: int) -> int:
        """Largest power of two dividing ``in_features``, capped at ``rotation_block``."""
        return min(in_features & -in_features, self.rotation_block)

    def tensors(self, out_features: int, in_features: int) -> dict[str, TensorSpec]:
        """Every tensor a layer stores for its weight, the shared tables excluded."""
        out = self.stage.tensors(out_features, in_features)
        if self.rotation:
            out["rotation_seed"] = TensorSpec((1,), torch.int64)
        out.update(self.residual.tensors(out_features, in_features))
        return out

    def table_tensors(self) -> dict[str, TensorSpec]:
        """The shared tables (stored once per model, by the layer that owns them)."""
        out: dict[str, TensorSpec] = {}
        for prefix, stage in self.stages:
            out.update(stage.table_tensors(prefix))
        return out

    def to_layout(self) -> list[int]:
        """The spec as ints (the layer op's layout after ``[FORMAT_ID, out, in]``)."""
        r = self.residual
        res = r.stage.to_layout() if r.stage is not None else [0] * _STAGE_INTS
        return [*self.stage.to_layout(), RESIDUAL_KINDS.index(r.kind), r.group_size, *res,
                int(self.rotation), self.rotation_block, self.table_seed]

    @classmethod
    def from_layout(cls, ints: list[int]) -> LayerSpec:
        n = _STAGE_INTS
        stage, (kind, group), res = ints[:n], ints[n : n + 2], ints[n + 2 : 2 * n + 2]
        rot, block, seed = ints[2 * n + 2 :]
        kind_name = RESIDUAL_KINDS[kind]
        residual = ResidualSpec(kind_name, group, StageSpec.from_layout(res) if kind_name == "rbe" else None)
        return cls(StageSpec.from_layout(stage), residual, bool(rot), block, seed)

    def bits_per_weight_estimate(self, in_features: int) -> float:
        """Bits per weight of codes, scales and residual (no shared tables, no padding)."""
        bits = self.stage.bits_per_weight(in_features)
        r = self.residual
        if r.kind == "rbe":
            bits += r.stage.bits_per_weight(in_features)  # type: ignore[union-attr]
        elif r.kind != "none":
            bits += (r.int_bits or 8) + 16 / r.group_size
        return bits


# ----------------------------------------------------------------------------- settings

#: The format-1 settings (``RBEConfig`` arguments and per-layer overrides) and their defaults: the
#: ``rbe-5.5`` preset, what ``RBEConfig(format_version=1)`` gives. ``group_size``, ``rotation`` and
#: ``rotation_block`` are shared with format 2.
SETTINGS: dict[str, Any] = {"dim": 4, "idx": 9, "sign": 1, "amp": 2, "deriv": 0, "cat": 0, "sub": 0, "amp_fine": 0,
                            "residual": "rbe", "residual_group_size": 64,
                            "residual_stage": {"dim": 4, "idx": 7, "sign": 1, "amp": 2}}
STAGE_SETTINGS: tuple[str, ...] = ("dim", "group_size", *FIELDS)


def stage_from_settings(s: Mapping[str, Any]) -> StageSpec:
    """A stage from ``dim``, ``group_size`` and field widths (absent widths: ``CodeLayout``'s defaults)."""
    unknown = set(s) - set(STAGE_SETTINGS)
    if unknown:
        raise ConfigError(f"unknown stage settings {sorted(unknown)} (a stage takes {list(STAGE_SETTINGS)})")
    layout = CodeLayout(**{k: s[k] for k in FIELDS if k in s})
    return StageSpec(dim=s.get("dim", 4), layout=layout, group_size=s.get("group_size"))


def spec_from_settings(s: Mapping[str, Any], table_seed: int = 0) -> LayerSpec:
    """The layer spec of flat settings (every key of :data:`SETTINGS` plus ``group_size``,
    ``rotation``, ``rotation_block``); ConfigError names what cannot be built."""
    residual_stage = None
    if s["residual"] == "rbe":
        if not s["residual_stage"]:
            raise ConfigError("residual='rbe' needs residual_stage, e.g. {'dim': 6, 'idx': 9, 'amp': 2}")
        if not isinstance(s["residual_stage"], Mapping):
            raise ConfigError(f"residual_stage must be a dict of stage settings, got {s['residual_stage']!r}")
        residual_stage = stage_from_settings(s["residual_stage"])
    elif s["residual_stage"]:
        raise ConfigError(f"residual_stage is only used with residual='rbe', not {s['residual']!r}")
    residual = ResidualSpec(kind=s["residual"], group_size=s["residual_group_size"], stage=residual_stage)
    return LayerSpec(stage=stage_from_settings({k: s[k] for k in STAGE_SETTINGS}), residual=residual,
                     rotation=s["rotation"], rotation_block=s["rotation_block"], table_seed=table_seed)
