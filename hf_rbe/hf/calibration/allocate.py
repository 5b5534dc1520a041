"""Bit allocation: more code planes where calibration measures the model's output most sensitive.

``RBEConfig(target_bits=...)`` spends a bit budget unevenly, as EXL2 does, but without quantizing
every layer at every rate. Why a model of the error is enough: after the Hadamard rotation a
layer's quantization error is close to white noise, row ``j`` with variance
``c(planes) * |W_j|^2 / n_in``, where ``c`` is the codebook's relative error on Gaussian weights
(:func:`relative_error`). Independent rows make the cross terms vanish, so the loss that layer
``l`` adds is about ``c(planes_l) * s_l`` with

    s_l = sum over tokens t of  |x_t|^2 / n_in * sum_j g_tj^2 |W_j|^2 / n_in

(``x``: the layer's input, ``g``: the gradient at its output, both measured by
``fisher.fisher``). ``g`` comes from the Fisher information: backpropagating labels
sampled from the model's own next-token distribution (a model with an output head) or random
Gaussian projections of its last hidden states (an encoder); both make ``E[g g^T]`` the
curvature of the output error at the full-precision model.
The planes are then bought greedily: every layer starts at its configured stack on
``core.format_v2.PLANE_LADDER``, and the upgrade that removes the most predicted loss per stored
bit (codes, scales, and the tables of a stack no layer used yet) is taken until the budget is
spent.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

from ...core import codec_v2, tables_v2
from ...core.errors import ConfigError, EncodingError
from ...core.format_v2 import PLANE_LADDER, LayerSpecV2, StageV2
from ...core.spec import TensorSpec
from ..config import RBEConfig
from ..replace import float_weight

logger = logging.getLogger(__name__)

@functools.lru_cache(maxsize=None)
def relative_error(planes: tuple[str, ...]) -> float:
    """Relative squared error of a plane stack (universal tables, per-row scales) on a fixed
    Gaussian matrix: what rotated weights look like to the codebook."""
    spec = LayerSpecV2(tuple(StageV2(p) for p in planes))
    w = torch.randn(128, 1024, generator=torch.Generator().manual_seed(0))
    tables = tables_v2.universal_tables(spec)
    decoded = codec_v2.decode_layer({**codec_v2.encode_layer(w, spec, tables), **tables}, spec, w.shape[1])
    return float((decoded - w).pow(2).sum() / w.pow(2).sum())


def _rung(spec: LayerSpecV2) -> int:
    planes = tuple(s.plane for s in spec.stages)
    if planes not in PLANE_LADDER:
        raise ConfigError(f"target_bits starts from planes on the allocation ladder "
                          f"{[list(p) for p in PLANE_LADDER]}, got {list(planes)}")
    return PLANE_LADDER.index(planes)


def _bits(tensors: dict[str, TensorSpec]) -> int:
    return sum(math.prod(t.shape) * t.dtype.itemsize * 8 for t in tensors.values())


@dataclass
class _Ledger:
    """Stored bits of every layer at every rung of the ladder, the rung each layer is at, and how
    many layers use each rung's plane stack (whose tables are stored once)."""

    bits: dict[str, list[int]]  # layer -> stored bits at each rung (tables aside)
    table: list[int]  # bits of each rung's tables
    rung: dict[str, int]
    weights: int

    @property
    def users(self) -> list[int]:
        return [sum(k == r for r in self.rung.values()) for k in range(len(PLANE_LADDER))]

    @property
    def spent(self) -> int:
        return sum(self.bits[n][k] for n, k in self.rung.items()) + sum(
            t for t, u in zip(self.table, self.users) if u)

    def cost(self, name: str, users: list[int]) -> int:
        """Stored bits of moving ``name`` one rung up (tables bought or freed included)."""
        k = self.rung[name]
        return self.bits[name][k + 1] - self.bits[name][k] + (self.table[k + 1] if not users[k + 1] else 0) - \
            (self.table[k] if users[k] == 1 else 0)


def _ledger(config: RBEConfig, layers: dict[str, nn.Module]) -> _Ledger | None:
    """Every layer the format can hold, at its configured planes (``None``: no such layer)."""
    bits, rung, weights, table = {}, {}, 0, None
    for name, module in layers.items():
        base = config.layer_format(name)
        shape = tuple(float_weight(module).shape)
        try:
            base.check_shape(*shape)
        except EncodingError:
            continue  # kept unquantized (``LayerFactory`` says why)
        specs = [LayerSpecV2(tuple(StageV2(p, base.stages[0].group_size) for p in planes), base.rotation,
                             base.rotation_block, base.table_seed) for planes in PLANE_LADDER]
        bits[name] = [_bits(s.tensors(*shape)) for s in specs]
        table = table or [_bits(s.table_tensors()) for s in specs]
        weights += math.prod(shape)
        # Every layer starts at its configured planes (the floor): measured on all-MiniLM-L6-v2,
        # taking planes from layers predicted insensitive cost more than the model predicts.
        rung[name] = _rung(base)
    return _Ledger(bits, table, rung, weights) if rung else None


def allocate(config: RBEConfig, layers: dict[str, nn.Module], sens: dict[str, float],
             target_bits: float) -> dict[str, tuple[str, ...]]:
    """The plane stack of each layer (module docstring) that keeps the stored bits per weight
    (every stored tensor, shared tables once: what ``packed_size`` counts) within ``target_bits``."""
    ledger = _ledger(config, layers)
    if ledger is None:
        return {}
    budget, spent = target_bits * ledger.weights, ledger.spent
    if spent > budget:
        raise ConfigError(f"target_bits={target_bits} is below what the configured planes store "
                          f"({spent / ledger.weights:.3f} bits per weight): choose fewer planes")
    err = [relative_error(p) for p in PLANE_LADDER]
    users = ledger.users
    while True:  # a scan, not a heap: buying a stack's tables makes every later move to it cheaper
        best: tuple[float, str, int] | None = None
        for name, k in ledger.rung.items():
            cost = ledger.cost(name, users) if k + 1 < len(PLANE_LADDER) else None
            if cost is not None and spent + cost <= budget:
                gain = sens[name] * (err[k] - err[k + 1]) / max(cost, 1)
                if gain > 0 and (best is None or gain > best[0]):
                    best = (gain, name, cost)
        if best is None:
            break
        _, name, cost = best
        spent += cost
        users[ledger.rung[name]] -= 1
        ledger.rung[name] += 1
        users[ledger.rung[name]] += 1
    logger.info("allocated %.3f bits per weight: %s", spent / ledger.weights,
                ", ".join(f"{'+'.join(p)} x{u}" for p, u in zip(PLANE_LADDER, users) if u))
    return {n: PLANE_LADDER[k] for n, k in ledger.rung.items()}
