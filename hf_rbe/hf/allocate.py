"""Bit allocation: more code planes where calibration measures the model's output most sensitive.

``RBEConfig(target_bits=...)`` spends a bit budget unevenly, as EXL2 does, but without quantizing
every layer at every rate. Why a model of the error is enough: after the Hadamard rotation a
layer's quantization error is close to white noise, row ``j`` with variance
``c(planes) * |W_j|^2 / n_in``, where ``c`` is the codebook's relative error on Gaussian weights
(:func:`relative_error`). Independent rows make the cross terms vanish, so the loss that layer
``l`` adds is about ``c(planes_l) * s_l`` with

    s_l = sum over tokens t of  |x_t|^2 / n_in * sum_j g_tj^2 |W_j|^2 / n_in

(``x``: the layer's input, ``g``: the gradient at its output, both measured by
``calibrate.sensitivities``). ``g`` comes from the Fisher information: backpropagating labels
sampled from the model's own next-token distribution (a model with an output head) or random
Gaussian projections of its last hidden states (an encoder); both make ``E[g g^T]`` the
curvature of the output error at the full-precision model.
The planes are then bought greedily: every layer starts at the cheapest stack of
:data:`LADDER`, and the upgrade that removes the most predicted loss per stored bit (codes,
scales, and the tables of a stack no layer used yet) is taken until the budget is spent.
"""

from __future__ import annotations

import functools
import logging
import math

import torch
from torch import nn

from ..core import codec_v2, tables_v2
from ..core.errors import ConfigError, EncodingError
from ..core.format_v2 import LayerSpecV2, StageV2
from ..core.spec import TensorSpec
from .config import RBEConfig
from .replace import float_weight

logger = logging.getLogger(__name__)

#: The plane stacks allocation chooses from, cheapest first. Each step lowers the error per bit
#: less than the one before (:func:`relative_error`, tested), which is what makes buying the best
#: step first a sound greedy choice (tables aside, optimal up to the last step that does not fit).
LADDER: tuple[tuple[str, ...], ...] = (
    ("e8p",), ("e8p", "vq4"), ("e8p", "vq8"), ("e8p", "e8p"), ("e8p", "e8p", "vq4"), ("e8p", "e8p", "vq8"),
    ("e8p", "e8p", "e8p"), ("e8p", "e8p", "e8p", "vq4"), ("e8p", "e8p", "e8p", "vq8"), ("e8p", "e8p", "e8p", "e8p"),
)


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
    if planes not in LADDER:
        raise ConfigError(f"target_bits starts from planes on the allocation ladder {[list(p) for p in LADDER]}, "
                          f"got {list(planes)}")
    return LADDER.index(planes)


def _bits(tensors: dict[str, TensorSpec]) -> int:
    return sum(math.prod(t.shape) * t.dtype.itemsize * 8 for t in tensors.values())


def allocate(config: RBEConfig, layers: dict[str, nn.Module], sens: dict[str, float],
             target_bits: float) -> dict[str, tuple[str, ...]]:
    """The plane stack of each layer (module docstring) that keeps the stored bits per weight
    (every stored tensor, shared tables once: what ``packed_size`` counts) within ``target_bits``."""
    specs, shapes, rung = {}, {}, {}
    for name, module in layers.items():
        base = config.layer_format(name)
        shape = tuple(float_weight(module).shape)
        try:
            base.check_shape(*shape)
        except EncodingError:
            continue  # kept unquantized (``LayerFactory`` says why)
        specs[name] = [LayerSpecV2(tuple(StageV2(p, base.stages[0].group_size) for p in planes),
                                   base.rotation, base.rotation_block, base.table_seed) for planes in LADDER]
        shapes[name] = shape
        # Every layer starts at its configured planes (the floor): measured on all-MiniLM-L6-v2,
        # taking planes from layers predicted insensitive cost more than the model predicts.
        rung[name] = _rung(base)
    if not rung:
        return {}
    sizes = {n: math.prod(shape) for n, shape in shapes.items()}
    bits = {n: [_bits(s.tensors(*shapes[n])) for s in specs[n]] for n in specs}
    table = [_bits(s.table_tensors()) for s in specs[next(iter(specs))]]
    users = [sum(k == r for r in rung.values()) for k in range(len(LADDER))]
    total = sum(sizes.values())
    spent = sum(bits[n][k] for n, k in rung.items()) + sum(t for t, u in zip(table, users) if u)
    if spent > target_bits * total:
        raise ConfigError(f"target_bits={target_bits} is below what the configured planes store "
                          f"({spent / total:.3f} bits per weight): choose fewer planes")
    budget = target_bits * total
    err = [relative_error(p) for p in LADDER]

    def cost(name: str) -> float:  # stored bits of moving ``name`` one rung up
        k = rung[name]
        return bits[name][k + 1] - bits[name][k] + (table[k + 1] if not users[k + 1] else 0) - \
            (table[k] if users[k] == 1 else 0)

    while True:  # a scan, not a heap: buying a stack's tables makes every later move to it cheaper
        best: tuple[float, str] | None = None
        for name, k in rung.items():
            if k + 1 < len(LADDER) and spent + cost(name) <= budget:
                gain = sens[name] * (err[k] - err[k + 1]) / max(cost(name), 1.0)
                if gain > 0 and (best is None or gain > best[0]):
                    best = (gain, name)
        if best is None:
            break
        name = best[1]
        spent += cost(name)
        users[rung[name]] -= 1
        rung[name] += 1
        users[rung[name]] += 1
    logger.info("allocated %.3f bits per weight: %s", spent / total,
                ", ".join(f"{'+'.join(p)} x{u}" for p, u in zip(LADDER, users) if u))
    return {n: LADDER[k] for n, k in rung.items()}
