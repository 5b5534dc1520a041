"""The seed64 layout (paper 000): every field of the 64-bit seed and every stored tensor, defined once.

Bit layout, most significant field first::

    r:20 | theta:24 | basis:4 | d_theta:2 | d_r:1 | rot:4 | log2_c:3 (two's complement) | reserved:6

A seed64 layer stores (shapes from :meth:`Seed64Spec.tensors`)::

    weight        int64 [out / T, in / T]   one seed per T x T tile, row-major tile order
    tile_scale    fp16  [out / T, in / T]   (``scaled``) scale of the unit-RMS tile
    residual.*    an RBE v1 layer (no bias) holding W - seed64(W), when a residual is set

The layout is part of the checkpoint format (``RBEConfig.format_version``) and has not
changed since version 1; the generator's meaning of each field is in ``core.seed64``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .errors import ConfigError, EncodingError
from .format import CodeLayout, LayerSpec
from .format import spec_from_settings as rbe_spec_from_settings
from .spec import TensorSpec

SEED64_LAYOUT_VERSION = 1
#: This format's id in the layer op's layout (``core.ops``).
FORMAT_ID = 3

#: (name, width in bits), most significant first.
FIELDS: tuple[tuple[str, int], ...] = (
    ("r", 20), ("theta", 24), ("basis", 4), ("d_theta", 2), ("d_r", 1), ("rot", 4), ("log2_c", 3), ("reserved", 6))
WIDTH: dict[str, int] = dict(FIELDS)
#: Bit offset of each field's least significant bit.
OFFSET: dict[str, int] = {name: sum(w for _, w in FIELDS[i + 1 :]) for i, (name, _) in enumerate(FIELDS)}
MASK: dict[str, int] = {name: (1 << w) - 1 for name, w in FIELDS}
LOG2_C_RANGE = (-(1 << (WIDTH["log2_c"] - 1)), (1 << (WIDTH["log2_c"] - 1)) - 1)  # two's complement
MIN_TILE, MAX_TILE = 4, 128
SCALE_DTYPE = torch.float16


@dataclass(frozen=True)
class Seed64Spec:
    """A seed64 layer: ``tile`` x ``tile`` tiles, an fp16 scale per tile if ``scaled``, and an
    optional RBE v1 residual layer."""

    tile: int = 32
    scaled: bool = True
    residual: LayerSpec | None = None

    def __post_init__(self) -> None:
        t = self.tile
        if not isinstance(t, int) or isinstance(t, bool) or not MIN_TILE <= t <= MAX_TILE or t & (t - 1):
            raise ConfigError(f"seed64 tile must be a power of two in [{MIN_TILE}, {MAX_TILE}], got {t!r}")
        if not isinstance(self.scaled, bool):
            raise ConfigError(f"seed64 'scaled' must be a bool, got {self.scaled!r}")

    def check_shape(self, out_features: int, in_features: int) -> None:
        if in_features % self.tile or out_features % self.tile:
            raise EncodingError(f"seed64 needs both dimensions divisible by the tile {self.tile}, "
                                f"got {out_features}x{in_features}")
        if self.residual is not None:
            self.residual.check_shape(out_features, in_features)

    def tensors(self, out_features: int, in_features: int) -> dict[str, TensorSpec]:
        """The seed64 layer's own tensors (its residual child stores its own)."""
        grid = (out_features // self.tile, in_features // self.tile)
        out = {"weight": TensorSpec(grid, torch.int64)}
        if self.scaled:
            out["tile_scale"] = TensorSpec(grid, SCALE_DTYPE)
        return out

    def bits_per_weight_estimate(self, in_features: int) -> float:
        bits = (64 + (16 if self.scaled else 0)) / self.tile**2
        return bits + (self.residual.bits_per_weight_estimate(in_features) if self.residual is not None else 0.0)


#: The seed64 settings of ``RBEConfig`` and their defaults. Its residual is set by the format-1
#: settings ``residual`` (``"none"`` or ``"rbe"``) and ``residual_stage``, and rotated by
#: ``rotation`` / ``rotation_block``.
SETTINGS: dict[str, Any] = {"tile": 32, "seed64_scale": True}
RESIDUAL_KINDS = ("none", "rbe")


def spec_from_settings(s: Mapping[str, Any], table_seed: int = 0) -> Seed64Spec:
    """The spec of a seed64 layer from flat settings (``tile``, ``seed64_scale``, ``residual``,
    ``residual_stage``, ``rotation``, ``rotation_block``). The residual is one RBE stage with
    ``CodeLayout``'s widths, ``dim`` 4 and a scale per row, overridden by ``residual_stage``."""
    if s["residual"] not in RESIDUAL_KINDS:
        raise ConfigError(f"seed64 takes residual 'none' or 'rbe', got {s['residual']!r}")
    residual = None
    if s["residual"] == "rbe":
        if not isinstance(s["residual_stage"], Mapping):
            raise ConfigError(f"a seed64 residual needs residual_stage, a dict of stage settings, got "
                              f"{s['residual_stage']!r}")
        stage = {"dim": 4, "group_size": None, **{k: getattr(CodeLayout(), k) for k in CodeLayout.__dataclass_fields__},
                 **s["residual_stage"]}
        residual = rbe_spec_from_settings({**stage, "residual": "none", "residual_group_size": 64,
                                           "residual_stage": None, "rotation": s["rotation"],
                                           "rotation_block": s["rotation_block"]}, table_seed)
    return Seed64Spec(s["tile"], s["seed64_scale"], residual)
