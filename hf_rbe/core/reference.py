"""The PyTorch reference of the layer ops, per format: the oracle every kernel is tested against.

``REFERENCE[format_id]`` decodes one format: ``dequantize(tensors, layout)`` gives the fp32 weight
[out, in] in the original basis and ``linear(x, tensors, layout)`` gives ``x W^T`` (no bias), for
the arguments ``core.op_layout`` describes. ``core.ops`` reads this table; nothing registers
itself as a side effect of being imported.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import seed64
from .format import FORMAT_ID as RBE_V1
from .format_v2 import FORMAT_ID as RBE_V2
from .op_layout import SIGNS, parse_rbe
from .rotation import rotate, unrotate
from .seed64_format import FORMAT_ID as SEED64


@dataclass(frozen=True)
class FormatOps:
    """How the reference decodes one format (module docstring)."""

    dequantize: Callable[[list[torch.Tensor], list[int]], torch.Tensor]
    linear: Callable[[torch.Tensor, list[torch.Tensor], list[int]], torch.Tensor]


def _rbe_rotated(tensors: list[torch.Tensor], layout: list[int]) -> tuple[torch.Tensor, dict, object, int]:
    codec, spec, k, names = parse_rbe(tuple(layout))
    named = dict(zip(names, tensors))
    return codec.decode(named, spec, k), named, spec, k


def rbe_dequantize(tensors: list[torch.Tensor], layout: list[int]) -> torch.Tensor:
    w, named, spec, k = _rbe_rotated(tensors, layout)
    return unrotate(w, named[SIGNS].float(), spec.hadamard_block(k)) if spec.rotation else w


def rbe_linear(x: torch.Tensor, tensors: list[torch.Tensor], layout: list[int]) -> torch.Tensor:
    w, named, spec, k = _rbe_rotated(tensors, layout)
    if spec.rotation:
        x = rotate(x, named[SIGNS], spec.hadamard_block(k))
    return F.linear(x, w.to(x.dtype))


@functools.lru_cache(maxsize=64)
def _seed64_layout(layout: tuple[int, ...]) -> tuple[int, int, int, bool]:
    _, out_features, in_features, tile, scaled = layout
    return out_features, in_features, tile, bool(scaled)


def seed64_dequantize(tensors: list[torch.Tensor], layout: list[int]) -> torch.Tensor:
    """float64 W [out, in] generated from the seeds (and per-tile scales)."""
    n, k, tile, scaled = _seed64_layout(tuple(layout))
    seeds, scale = tensors[0], (tensors[1] if scaled else None)
    tiles = seed64.generate(seeds.reshape(-1), tile, None if scale is None else scale.reshape(-1))
    return seed64.untile_matrix(tiles, n, k)


def seed64_linear(x: torch.Tensor, tensors: list[torch.Tensor], layout: list[int]) -> torch.Tensor:
    return F.linear(x, seed64_dequantize(tensors, layout).to(x.dtype))


REFERENCE: dict[int, FormatOps] = {
    RBE_V1: FormatOps(rbe_dequantize, rbe_linear),
    RBE_V2: FormatOps(rbe_dequantize, rbe_linear),
    SEED64: FormatOps(seed64_dequantize, seed64_linear),
}
