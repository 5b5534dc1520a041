"""The v2 tables: fitting them (k-means with the e8p sign structure) and the universal set hf-rbe ships.

Universal tables are fitted offline to unit-variance Gaussian vectors (rotated weights are
close to i.i.d. Gaussian) and, for later stages, to the unit-variance residual an e8p stage
leaves, by ``python bench/v2_codebook.py`` (minutes; deterministic), which writes
``v2_tables.safetensors`` next to this module. Every checkpoint also stores the tables it
decodes with, so a checkpoint never depends on this file. The b1 plane's table is not fitted: its
one entry is all ones (a sign per weight, the stage's scale its magnitude).
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from .codec_v2 import _e8p_nearest, e8p_parts, nearest
from .errors import ConfigError
from .format_v2 import PLANES, VECTOR_DIM, LayerSpecV2, stage_prefix

TABLE_FILE = Path(__file__).with_name("v2_tables.safetensors")
_EPS = 1e-12


def universal_key(plane: str, first: bool) -> str:
    """Name of a universal table in the shipped file: the plane, fitted to the weights (the
    first stage) or to the residual of an e8p stage."""
    return f"{plane}/{'weight' if first else 'residual'}"


@functools.lru_cache(maxsize=1)
def _shipped() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not TABLE_FILE.exists():
        raise FileNotFoundError(f"{TABLE_FILE} is missing: reinstall hf-rbe or run `python bench/v2_codebook.py`")
    return load_file(TABLE_FILE)


def universal_tables(spec: LayerSpecV2) -> dict[str, torch.Tensor]:
    """The shipped tables of every stage of ``spec``, under their stored names (copies)."""
    if spec.table_seed != 0:
        raise ConfigError(f"hf-rbe ships universal v2 table set 0, not {spec.table_seed}")
    tables = _shipped()
    return {prefix + "table": torch.ones(1, VECTOR_DIM) if s.plane == "b1"
            else tables[universal_key(s.plane, i == 0)].clone() for i, (prefix, s) in enumerate(spec.prefixed_stages)}


def table_key(spec: LayerSpecV2) -> str:
    """Name of the universal tables a v2 layer uses: layers with equal keys share them."""
    return "v2-t{}-".format(spec.table_seed) + "+".join(s.plane for s in spec.stages)


# ----------------------------------------------------------------------------- fitting


def _init(x: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    return x[torch.randperm(len(x), generator=generator)[:size]].clone()


def fit_vq(x: torch.Tensor, size: int, iters: int, seed: int = 0, init: torch.Tensor | None = None) -> torch.Tensor:
    """Plain k-means: ``size`` signed 8-vectors for samples ``x`` [n, 8] (float64 inside)."""
    g = torch.Generator().manual_seed(seed)
    x = x.double()
    c = _init(x, size, g) if init is None else init.double().clone()
    for _ in range(iters):
        idx, _ = nearest(x, "vq8", c)
        c = _update(x, idx, c, g)
    return c.float()


def fit_e8p(x: torch.Tensor, iters: int, seed: int = 0, init: torch.Tensor | None = None) -> torch.Tensor:
    """k-means under the e8p structure: 512 entries, free signs on 7 coordinates, the 8th set by
    parity. Returns the stored form (coordinates 0-6 >= 0, coordinate 7 signed by parity)."""
    g = torch.Generator().manual_seed(seed)
    x = x.double()
    a = x.abs()
    size = PLANES["e8p"].table_size
    if init is None:  # random samples, folded into the orthant with the sample's own parity
        pick = _init(x, size, g)
        par = (pick < 0).sum(1) % 2
        init = pick.abs()
        init[:, -1] = torch.where(par == 1, -init[:, -1], init[:, -1])
    table = init.double().clone()
    for _ in range(iters):
        mag, parity = e8p_parts(table)
        idx, flip = [], []
        for lo in range(0, len(x), 4096):
            i, f = _e8p_nearest(x[lo : lo + 4096], mag, parity)
            idx.append(i)
            flip.append(f)
        idx, flip = torch.cat(idx), torch.cat(flip)
        folded = a.clone()  # each sample brought into its entry's orthant: |x|, the flipped coordinate negative
        rows = (flip >= 0).nonzero().squeeze(1)
        folded[rows, flip[rows]] *= -1
        centre = _update(folded, idx, mag, g, fallback=a)
        # a centre coordinate that came out negative moves the entry's parity, not its orthant
        odd = (parity + (centre < 0).sum(1)) % 2
        table = centre.abs()
        last = table[:, -1].clamp_min(_EPS)  # its sign carries the parity, so it must not be 0
        table[:, -1] = torch.where(odd == 1, -last, last)
    return table.float()


def _update(x: torch.Tensor, idx: torch.Tensor, c: torch.Tensor, g: torch.Generator,
            fallback: torch.Tensor | None = None) -> torch.Tensor:
    """Centroids of the samples assigned to each entry; empty entries get a random sample."""
    size = len(c)
    sums = torch.zeros(size, x.shape[1], dtype=x.dtype).index_add_(0, idx, x)
    counts = torch.bincount(idx, minlength=size).to(x.dtype)
    out = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], c)
    empty = counts == 0
    if empty.any():
        pool = x if fallback is None else fallback
        out[empty] = pool[torch.randint(0, len(pool), (int(empty.sum()),), generator=g)]
    return out


def fit_layer_tables(w_rot: torch.Tensor, spec: LayerSpecV2, iters: int = 10) -> dict[str, torch.Tensor]:
    """``table="per_layer"``: the first stage's e8p table refined on the layer's own (row-normalised)
    vectors, starting from the universal one; later stages (and b1 planes) keep their universal tables."""
    tables = universal_tables(spec)
    if spec.stages[0].plane != "e8p":
        return tables
    rows = w_rot / w_rot.pow(2).mean(1, keepdim=True).sqrt().clamp_min(_EPS)
    tables[stage_prefix(0) + "table"] = fit_e8p(rows.reshape(-1, VECTOR_DIM).cpu(), iters,
                                                init=tables[stage_prefix(0) + "table"])
    return tables
