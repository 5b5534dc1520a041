"""The RBE format v2: a codebook designed with its decoder. Every plane, field and stored tensor, defined once.

Weights are rotated as in v1 (randomized Hadamard on the input side), then cut into vectors
of ``VECTOR_DIM = 8`` consecutive weights. A layer is a sum of *stages*; each stage stores one
code per vector in an aligned plane and a scale per row (or group), and decodes
``w ~ scale * table[idx] (with signs)``. Stage 1 codes the weight, every later stage the
residual of the stages before it (residual vector quantization, as QuIP# reaches 3-4 bits).

Planes (code layouts; the paper's vocabulary: a shared basis table indexed by ``idx``, and
``sign``)::

    e8p  16 bits  [ sign:7 | idx:9 ]   idx picks one of 512 non-negative 8-vectors; sign bit j
                                       (bit 9 + j) negates coordinate j < 7; coordinate 7 is
                                       negated when the 7 sign bits have odd parity, and its
                                       table value carries the entry's own parity as its sign.
                                       2^16 codewords, 2 bits per weight.
    vq8   8 bits  [ idx:8 ]            one of 256 signed 8-vectors: 1 bit per weight.
    vq4   4 bits  [ idx:4 ]            one of 16 signed 8-vectors, two codes per byte (low
                                       nibble first): 0.5 bit per weight.
    b1    8 bits  [ sign:8 ]           the table's one non-negative 8-vector with bit j negating
                                       coordinate j: a sign per weight, 1 bit per weight. A stack
                                       of b1 stages is binary-coded quantization (each weight
                                       ``sum_t s_t * (+-1)``): no table read when decoding, so the
                                       CPU kernel adds x under the sign bits as a mask.

A layer stores (shapes from :meth:`LayerSpecV2.tensors` / :meth:`table_tensors`, nowhere else)::

    weight, scale                 stage 1: codes [out, in/8] (int16 for e8p), fp16 [out, groups]
    residual_weight, _scale       stage 2 (prefix ``residual_``), stage i > 2: ``residual{i-1}_``
    rotation_seed                 int64 [1] (with rotation)
    table, residual_table, ...    fp32 [2**idx, 8] per stage, in the layer that owns the model's
                                  shared tables (universal tables ship with hf-rbe)

Why this codebook (``bench/v2_codebook.py``, docs/results/codebook.md): on Gaussian weights a
learned 512-entry table with 7 sign bits and a parity-implied 8th sits closer to the Shannon
bound at 2 bits per weight than QuIP#'s E8P lattice codebook or 256 entries with 8 free sign
bits, and decodes with one 16-byte table read and one 16-byte sign-mask read per 8 weights. For
2.5 bits a 4-bit residual plane beat 4 gain bits on each e8p code.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .errors import ConfigError, EncodingError
from .spec import TensorSpec

#: This format's id in the layer op's layout (``core.ops``), and its checkpoint version.
FORMAT_ID = 2
FORMAT_VERSION = 2
VECTOR_DIM = 8
SCALE_DTYPE = torch.float16
TABLE_DTYPE = torch.float32


@dataclass(frozen=True)
class Plane:
    """A code layout: ``idx`` bits into a table of 8-vectors and ``sign`` explicit sign bits."""

    name: str
    idx: int
    sign: int
    signed_table: bool  # table entries carry their own signs (no sign bits)

    @property
    def bits(self) -> int:
        return self.idx + self.sign

    @property
    def table_size(self) -> int:
        return 1 << self.idx

    @property
    def codes_per_byte(self) -> int:
        return 2 if self.bits == 4 else 1

    @property
    def storage_dtype(self) -> torch.dtype:
        return torch.int16 if self.bits == 16 else torch.uint8


PLANES: dict[str, Plane] = {
    "e8p": Plane("e8p", idx=9, sign=7, signed_table=False),
    "vq8": Plane("vq8", idx=8, sign=0, signed_table=True),
    "vq4": Plane("vq4", idx=4, sign=0, signed_table=True),
    "b1": Plane("b1", idx=0, sign=8, signed_table=False),
}
#: Planes a layer's first stage may use (the others code a residual: their tables are fitted to one).
FIRST_PLANES = ("e8p", "b1")
#: e8p field offsets: idx in the low bits, sign bit j of coordinate j at SIGN_OFFSET + j.
IDX_OFFSET, SIGN_OFFSET = 0, PLANES["e8p"].idx


@functools.lru_cache(maxsize=1)
def e8p_sign_table() -> torch.Tensor:
    """fp32 [128, 8] of +-1: row ``s`` holds the signs an e8p code with sign field ``s`` applies
    (bit j negates coordinate j < 7; coordinate 7 is negated when those bits have odd parity).
    The decoders (reference and kernels) read signs from this one table (shared: do not modify)."""
    bits = (torch.arange(1 << (VECTOR_DIM - 1))[:, None] >> torch.arange(VECTOR_DIM - 1)) & 1
    bits = torch.cat([bits, bits.sum(1, keepdim=True) % 2], 1)
    return (1 - 2 * bits).float()


@functools.lru_cache(maxsize=1)
def b1_sign_table() -> torch.Tensor:
    """fp32 [256, 8] of +-1: row ``s`` holds the signs a b1 code ``s`` applies (bit j negates
    coordinate j). Shared: do not modify."""
    bits = (torch.arange(1 << VECTOR_DIM)[:, None] >> torch.arange(VECTOR_DIM)) & 1
    return (1 - 2 * bits).float()


def stage_prefix(i: int) -> str:
    """Tensor-name prefix of stage ``i`` (0-based): '', 'residual_', 'residual2_', ..."""
    return "" if i == 0 else "residual_" if i == 1 else f"residual{i}_"


@dataclass(frozen=True)
class StageV2:
    """One stage: a plane and weights per scale along ``in_features`` (``None``: one per row)."""

    plane: str = "e8p"
    group_size: int | None = None

    def __post_init__(self) -> None:
        if self.plane not in PLANES:
            raise ConfigError(f"plane must be one of {sorted(PLANES)}, got {self.plane!r}")
        g = self.group_size
        if g is not None and (not isinstance(g, int) or isinstance(g, bool) or g <= 0 or g % VECTOR_DIM):
            raise ConfigError(f"group_size {g!r} must be a positive int multiple of {VECTOR_DIM}")

    @property
    def kind(self) -> Plane:
        return PLANES[self.plane]

    def n_groups(self, in_features: int) -> int:
        return 1 if self.group_size is None else in_features // self.group_size

    def check_shape(self, in_features: int) -> None:
        unit = VECTOR_DIM * self.kind.codes_per_byte
        if in_features % unit:
            raise EncodingError(f"in_features {in_features} is not a multiple of {unit} ({self.plane} codes)")
        if self.group_size is not None and in_features % self.group_size:
            raise EncodingError(f"in_features {in_features} is not a multiple of group_size {self.group_size}")

    def tensors(self, out_features: int, in_features: int, prefix: str) -> dict[str, TensorSpec]:
        k = self.kind
        codes = in_features // (VECTOR_DIM * k.codes_per_byte)
        return {prefix + "weight": TensorSpec((out_features, codes), k.storage_dtype),
                prefix + "scale": TensorSpec((out_features, self.n_groups(in_features)), SCALE_DTYPE)}

    def bits_per_weight(self, in_features: int) -> float:
        return self.kind.bits / VECTOR_DIM + 16 * self.n_groups(in_features) / in_features


@dataclass(frozen=True)
class LayerSpecV2:
    """Everything that fixes the stored format of one v2 layer."""

    stages: tuple[StageV2, ...] = (StageV2(),)
    rotation: bool = True
    rotation_block: int = 256  # cap on the Hadamard block (a power of two)
    table_seed: int = 0  # which universal table set (hf-rbe ships set 0)

    def __post_init__(self) -> None:
        if not self.stages or not all(isinstance(s, StageV2) for s in self.stages):
            raise ConfigError("a v2 layer needs at least one StageV2")
        if self.stages[0].plane not in FIRST_PLANES:
            raise ConfigError(f"the first v2 stage must be one of {list(FIRST_PLANES)} (later stages code its "
                              f"residual), got {self.stages[0].plane!r}")
        b = self.rotation_block
        if not isinstance(b, int) or isinstance(b, bool) or b < 1 or b & (b - 1):
            raise ConfigError(f"rotation_block must be a power of two, got {b!r}")
        if not isinstance(self.rotation, bool):
            raise ConfigError(f"rotation must be a bool, got {self.rotation!r}")

    @property
    def prefixed_stages(self) -> list[tuple[str, StageV2]]:
        return [(stage_prefix(i), s) for i, s in enumerate(self.stages)]

    def check_shape(self, out_features: int, in_features: int) -> None:
        for s in self.stages:
            s.check_shape(in_features)

    def hadamard_block(self, in_features: int) -> int:
        """Largest power of two dividing ``in_features``, capped at ``rotation_block``."""
        return min(in_features & -in_features, self.rotation_block)

    def tensors(self, out_features: int, in_features: int) -> dict[str, TensorSpec]:
        out: dict[str, TensorSpec] = {}
        for prefix, s in self.prefixed_stages:
            out.update(s.tensors(out_features, in_features, prefix))
        if self.rotation:
            out["rotation_seed"] = TensorSpec((1,), torch.int64)
        return out

    def table_tensors(self) -> dict[str, TensorSpec]:
        return {prefix + "table": TensorSpec((s.kind.table_size, VECTOR_DIM), TABLE_DTYPE)
                for prefix, s in self.prefixed_stages}

    def bits_per_weight_estimate(self, in_features: int) -> float:
        return sum(s.bits_per_weight(in_features) for s in self.stages)

    def to_layout(self) -> list[int]:
        """The spec as ints (the layer op's layout after ``[FORMAT_ID, out, in]``)."""
        planes = list(PLANES)
        stage_ints = [v for s in self.stages for v in (planes.index(s.plane), s.group_size or 0)]
        return [len(self.stages), *stage_ints, int(self.rotation), self.rotation_block, self.table_seed]

    @classmethod
    def from_layout(cls, ints: list[int]) -> LayerSpecV2:
        n, planes = ints[0], list(PLANES)
        stages = tuple(StageV2(planes[ints[1 + 2 * i]], ints[2 + 2 * i] or None) for i in range(n))
        rot, block, seed = ints[1 + 2 * n :]
        return cls(stages, bool(rot), block, seed)


#: Plane stacks in order of stored bits, cheapest first: what bit allocation (``target_bits``)
#: chooses each layer's planes from. Each step lowers the Gaussian error per stored bit less than
#: the one before (tested), which makes buying the best step first a sound greedy choice.
PLANE_LADDER: tuple[tuple[str, ...], ...] = (
    ("e8p",), ("e8p", "vq4"), ("e8p", "vq8"), ("e8p", "e8p"), ("e8p", "e8p", "vq4"), ("e8p", "e8p", "vq8"),
    ("e8p", "e8p", "e8p"), ("e8p", "e8p", "e8p", "vq4"), ("e8p", "e8p", "e8p", "vq8"), ("e8p", "e8p", "e8p", "e8p"),
)

#: The format-2 setting of ``RBEConfig`` (and per-layer overrides) besides the shared ``group_size``,
#: ``rotation`` and ``rotation_block``: ``planes``, which has no default here (``RBEConfig`` takes
#: the default preset's).
SETTINGS: dict[str, Any] = {"planes": None}


def spec_from_settings(s: Mapping[str, Any], table_seed: int = 0) -> LayerSpecV2:
    """The layer spec of flat settings (``planes``, ``group_size``, ``rotation``, ``rotation_block``)."""
    planes = s["planes"]
    if not planes or isinstance(planes, str) or not all(isinstance(p, str) and p in PLANES for p in planes):
        raise ConfigError(f"format 2 needs planes, a list drawn from {sorted(PLANES)} (e.g. ['e8p', 'vq8']), "
                          f"got {planes!r}")
    return LayerSpecV2(tuple(StageV2(p, s["group_size"]) for p in planes), s["rotation"], s["rotation_block"],
                       table_seed)
