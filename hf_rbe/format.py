"""The RBE on-disk format: every field's name, width and offset, defined once.

One code per vector of ``dim`` consecutive (rotated) weights along ``in_features``. A code is a
bitfield, most significant field first (paper 002)::

    [ amp_fine | cat | sub | idx | sign | deriv | amp ]   (amp in the least significant bits)

- ``idx``   picks one of ``2**idx`` unit basis vectors of the shared table;
- ``sign``  negates it; ``deriv`` applies the derivative map D (see ``codec.tables``);
- ``amp`` (coarse) and ``amp_fine`` (fine) form the magnitude index ``q = amp << fine | amp_fine``;
- ``cat``, ``sub`` pick the gain curve ``F_{cat,sub}``; the gain is ``scale[group] * F(q)``.

Codes of ``width`` bits are packed as one little-endian bit stream per row into int32 words:
code ``j`` of a row occupies bits ``[j*width, (j+1)*width)``; word ``i`` holds bits
``[32*i, 32*i+32)``; the unused high bits of a row's last word are zero. A layer stores::

    weight          int32 [out_features, words]          packed stage-1 codes
    scale           fp16  [out_features, in_features // group_size]
    rotation_seed   int64 [1]  (only with rotation) seeds the random Hadamard signs
    table           fp32  [2**idx, dim]   (only in the layer that owns the shared table)
    lut             fp32  [2**(cat+sub), 2**(amp+amp_fine)]   (with the table)
    residual_*      the residual, by kind (see ``ResidualSpec``)

This module is plain Python + torch; it knows nothing of transformers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

FORMAT_VERSION = 1

#: Field order from the most to the least significant bits (paper 002).
FIELDS: tuple[str, ...] = ("amp_fine", "cat", "sub", "idx", "sign", "deriv", "amp")
_MAX_WIDTH = {"amp_fine": 8, "cat": 2, "sub": 2, "idx": 16, "sign": 1, "deriv": 1, "amp": 8}

RESIDUAL_KINDS: tuple[str, ...] = ("none", "int8", "fp8", "int4", "int2", "rbe")
_INT_RESIDUAL_BITS = {"int8": 8, "int4": 4, "int2": 2}


class FormatError(ValueError):
    """A format setting, or a stored tensor, that the RBE format cannot hold."""


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
            if not isinstance(w, int) or isinstance(w, bool) or not 0 <= w <= _MAX_WIDTH[name]:
                raise FormatError(f"field '{name}' must be an int in [0, {_MAX_WIDTH[name]}], got {w!r}")
        if self.width == 0:
            raise FormatError("a code needs at least one bit")
        if self.width > 32:
            raise FormatError(f"a code holds at most 32 bits, these widths add up to {self.width}")

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
            raise FormatError("no field values given")
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
        if not isinstance(self.dim, int) or not 1 <= self.dim <= 32:
            raise FormatError(f"vector dim must be an int in [1, 32], got {self.dim!r}")
        if self.layout.deriv and self.dim % 2:
            raise FormatError("the deriv field needs an even vector dim (D rotates pairs)")
        if self.group_size is not None and (self.group_size <= 0 or self.group_size % self.dim):
            raise FormatError(f"group_size {self.group_size} must be a positive multiple of dim {self.dim}")

    @property
    def bits_per_code_weight(self) -> float:
        return self.layout.width / self.dim

    def check_shape(self, out_features: int, in_features: int) -> None:
        if in_features % self.dim:
            raise FormatError(f"in_features {in_features} is not a multiple of the vector dim {self.dim}")
        if self.group_size is not None and in_features % self.group_size:
            raise FormatError(f"in_features {in_features} is not a multiple of group_size {self.group_size}")

    def n_groups(self, in_features: int) -> int:
        return 1 if self.group_size is None else in_features // self.group_size

    def n_words(self, in_features: int) -> int:
        return math.ceil(in_features // self.dim * self.layout.width / 32)


@dataclass(frozen=True)
class ResidualSpec:
    """What corrects stage 1: nothing, group-scaled integers or fp8, or a second RBE stage."""

    kind: str = "none"
    group_size: int = 64
    stage: StageSpec | None = None  # only for kind == "rbe"

    def __post_init__(self) -> None:
        if self.kind not in RESIDUAL_KINDS:
            raise FormatError(f"residual kind must be one of {RESIDUAL_KINDS}, got {self.kind!r}")
        if self.kind == "rbe" and self.stage is None:
            raise FormatError("residual kind 'rbe' needs a stage spec")
        if self.kind != "rbe" and self.stage is not None:
            raise FormatError(f"residual kind {self.kind!r} takes no stage spec")
        if self.kind in _INT_RESIDUAL_BITS or self.kind == "fp8":
            if not isinstance(self.group_size, int) or self.group_size <= 0 or self.group_size % 16:
                raise FormatError(f"residual group_size must be a positive multiple of 16, got {self.group_size!r}")

    @property
    def int_bits(self) -> int | None:
        return _INT_RESIDUAL_BITS.get(self.kind)

    def check_shape(self, out_features: int, in_features: int) -> None:
        if self.kind == "rbe":
            self.stage.check_shape(out_features, in_features)  # type: ignore[union-attr]
        elif self.kind != "none" and in_features % self.group_size:
            raise FormatError(f"in_features {in_features} is not a multiple of residual group {self.group_size}")


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
        if not isinstance(b, int) or b < 1 or b & (b - 1):
            raise FormatError(f"rotation_block must be a power of two, got {b!r}")

    def check_shape(self, out_features: int, in_features: int) -> None:
        """Raise FormatError if a [out_features, in_features] weight cannot be stored."""
        self.stage.check_shape(out_features, in_features)
        self.residual.check_shape(out_features, in_features)

    def hadamard_block(self, in_features: int) -> int:
        """Largest power of two dividing ``in_features``, capped at ``rotation_block``."""
        return min(in_features & -in_features, self.rotation_block)

    def bits_per_weight_estimate(self, in_features: int) -> float:
        """Bits per weight of codes, scales and residual (no shared tables, no padding)."""
        bits = _stage_bits(self.stage, in_features)
        r = self.residual
        if r.kind == "rbe":
            bits += _stage_bits(r.stage, in_features)  # type: ignore[arg-type]
        elif r.kind != "none":
            bits += (r.int_bits or 8) + 16 / r.group_size
        return bits


def _stage_bits(stage: StageSpec, in_features: int) -> float:
    return stage.bits_per_code_weight + 16 * stage.n_groups(in_features) / in_features


# ----------------------------------------------------------------------------- bit streams


def pack_codes(codes: torch.Tensor, width: int) -> torch.Tensor:
    """Pack ``codes`` [rows, n] (values < 2**width) into int32 words [rows, ceil(n*width/32)]."""
    rows, n = codes.shape
    n_words = math.ceil(n * width / 32)
    codes = codes.to(torch.int64)
    bit = torch.arange(n, device=codes.device, dtype=torch.int64) * width
    word, shift = bit // 32, bit % 32
    out = torch.zeros(rows, n_words + 1, dtype=torch.int64, device=codes.device)
    lo = (codes << shift) & 0xFFFFFFFF
    hi = codes >> (32 - shift)  # bits that spill into the next word (0 when none do)
    out.index_add_(1, word, lo)  # fields never overlap, so add == or
    out.index_add_(1, word + 1, hi)
    out = out[:, :n_words]
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)


def unpack_codes(words: torch.Tensor, width: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: int32 words [rows, W] -> int64 codes [rows, n]."""
    rows = words.shape[0]
    w64 = torch.cat([words, words.new_zeros(rows, 1)], dim=1).to(torch.int64) & 0xFFFFFFFF
    bit = torch.arange(n, device=words.device, dtype=torch.int64) * width
    word, shift = bit // 32, bit % 32
    both = w64[:, word] | (w64[:, word + 1] << 32)
    return (both >> shift) & ((1 << width) - 1)


def padding_is_clean(words: torch.Tensor, width: int, n: int) -> bool:
    """True if the unused bits after the last code of every row are zero."""
    used = n * width
    if used % 32 == 0:
        return True
    last = words[:, used // 32].to(torch.int64) & 0xFFFFFFFF
    return bool(((last >> (used % 32)) == 0).all())
