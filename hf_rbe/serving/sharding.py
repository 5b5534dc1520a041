"""Tensor-parallel shards of an RBE layer: which splits a format allows, and each rank's tensors.

A serving engine splits a linear layer over ranks in one of two ways:

- **column** (``ColumnParallelLinear`` and its fused q/k/v and gate/up kin): each rank computes a
  contiguous block of output rows. Rows of a v2 layer are independent (codes and scales per row,
  one rotation of the input for all of them), so every rank keeps the whole input rotation and
  its rows of every stage's codes and scales.
- **row** (``RowParallelLinear``): each rank holds a contiguous block of ``in_features`` and the
  partial outputs are summed. The randomized Hadamard rotation is block diagonal, so a rank can
  rotate its slice of the input on its own only when its block boundaries fall on rotation
  blocks; it must also hold whole code vectors (8 weights, 16 for a 4-bit plane) and whole scale
  groups. A layer with one scale per row keeps that scale on every rank.

Format v1 packs its codes as one bit stream per layer; it is served on one rank only. Every
function here works on the layout of ``hf_rbe::linear`` (``core.op_layout``) and plain tensors,
so the shards are tested without a serving engine.
"""

from __future__ import annotations

import torch

from ..core.errors import ConfigError
from ..core.format_v2 import FORMAT_ID as RBE_V2
from ..core.format_v2 import VECTOR_DIM, LayerSpecV2
from ..core.op_layout import parse_rbe
from ..core.rotation import random_signs

#: How an engine splits a layer over ranks (module docstring).
COLUMN, ROW = "column", "row"


def _v2_spec(layout: list[int], what: str) -> LayerSpecV2:
    if layout[0] != RBE_V2:
        raise ConfigError(f"{what}: format v{layout[0]} layers are served on one rank only (their codes are one bit "
                          "stream per layer); use tensor_parallel_size=1, or quantize with a v2 preset")
    return parse_rbe(tuple(layout))[1]  # type: ignore[return-value]


def shard_layout(layout: list[int], kind: str, rank: int, world: int, what: str = "layer") -> list[int]:
    """The layout of rank ``rank``'s shard of a layer split ``kind``-wise over ``world`` ranks, or
    ConfigError naming what does not align."""
    if kind not in (COLUMN, ROW):
        raise ValueError(f"kind must be {COLUMN!r} or {ROW!r}, got {kind!r}")
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in [0, {world})")
    if world == 1:
        return list(layout)
    spec = _v2_spec(layout, what)
    fid, out_f, in_f, *rest = layout
    if kind == COLUMN:
        if out_f % world:
            raise ConfigError(f"{what}: {out_f} output rows do not split over {world} ranks")
        return [fid, out_f // world, in_f, *rest]
    if in_f % world:
        raise ConfigError(f"{what}: in_features {in_f} does not split over {world} ranks")
    part = in_f // world
    block = spec.hadamard_block(in_f)
    if spec.rotation and (part % block or spec.hadamard_block(part) != block):
        raise ConfigError(f"{what}: a shard of {part} inputs cuts the {block}-wide rotation blocks; "
                          f"{world} ranks do not fit this layer (rotation_block={spec.rotation_block})")
    for s in spec.stages:
        unit = VECTOR_DIM * s.kind.codes_per_byte
        if part % unit:
            raise ConfigError(f"{what}: a shard of {part} inputs cuts the {unit}-weight code vectors of its "
                              f"'{s.plane}' plane")
        if s.group_size is not None and part % s.group_size:
            raise ConfigError(f"{what}: a shard of {part} inputs cuts its scale groups of {s.group_size}")
    return [fid, out_f, part, *rest]


def shard_tensor(name: str, t: torch.Tensor, layout: list[int], kind: str, rank: int, world: int) -> torch.Tensor:
    """Rank ``rank``'s part of the stored tensor ``name`` of a layer (full ``layout``): rows for a
    column split, code and group columns for a row split; seeds and tables whole. A view."""
    if world == 1:
        return t
    spec = _v2_spec(layout, name)
    shard_layout(layout, kind, rank, world, name)  # refuse what does not align
    if name == "rotation_seed" or name in spec.table_tensors():
        return t
    if kind == COLUMN:
        n = layout[1] // world
        return t[rank * n:(rank + 1) * n]
    per_row = {prefix + "scale" for prefix, s in spec.prefixed_stages if s.group_size is None}
    if name in per_row:
        return t  # one scale per row: the same on every rank
    n = t.shape[1] // world
    return t[:, rank * n:(rank + 1) * n]


def shard_signs(rotation_seed: int, layout: list[int], kind: str, rank: int, world: int) -> torch.Tensor:
    """The Hadamard signs (fp32 +-1) rank ``rank`` rotates its input with: all of them for a
    column split, its slice of the inputs for a row split."""
    in_f = layout[2]
    signs = random_signs(rotation_seed, in_f)
    if world == 1 or kind == COLUMN:
        return signs
    n = in_f // world
    return signs[rank * n:(rank + 1) * n]
