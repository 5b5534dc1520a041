"""Named settings of ``RBEConfig`` (``RBEConfig.from_preset(name)``).

Bits per weight count codes and scales (``docs/format.md``); quality at each preset is measured in
``docs/results/``. ``v2-*``: format 2 (e8p code planes, fast CPU and GPU kernels; use these). ``v2-b*``: format 2 with
sign planes only (b1: binary-coded, a uniform grid per row), a little less accurate than the e8p
presets at the same bits and faster on the CPU, where decoding needs no table.
``rbe-*``: format 1, the paper's bitfield codes, kept for their checkpoints and the record.
"""

from __future__ import annotations

from typing import Any

from ..core.errors import ConfigError

PRESETS: dict[str, dict[str, Any]] = {
    "v2-2": {"format_version": 2, "planes": ["e8p"]},
    "v2-2.5": {"format_version": 2, "planes": ["e8p", "vq4"]},
    "v2-3": {"format_version": 2, "planes": ["e8p", "vq8"]},
    "v2-4": {"format_version": 2, "planes": ["e8p", "e8p"]},
    "v2-6": {"format_version": 2, "planes": ["e8p", "e8p", "e8p"]},
    "v2-b2": {"format_version": 2, "planes": ["b1", "b1"]},
    "v2-b3": {"format_version": 2, "planes": ["b1", "b1", "b1"]},
    "v2-b4": {"format_version": 2, "planes": ["b1", "b1", "b1", "b1"]},
    "rbe-1.5": {"format_version": 1, "dim": 4, "idx": 4, "sign": 1, "amp": 1},
    "rbe-2": {"format_version": 1, "dim": 6, "idx": 9, "sign": 1, "amp": 2},
    "rbe-2.5": {"format_version": 1, "dim": 4, "idx": 7, "sign": 1, "amp": 2},
    "rbe-3": {"format_version": 1, "dim": 4, "idx": 9, "sign": 1, "amp": 2},
    "rbe-4": {"format_version": 1, "dim": 6, "idx": 9, "sign": 1, "amp": 2, "residual": "rbe",
              "residual_stage": {"dim": 6, "idx": 9, "sign": 1, "amp": 2}},
    "rbe-4.5": {"format_version": 1, "dim": 4, "idx": 7, "sign": 1, "amp": 2, "residual": "int2",
                "residual_group_size": 64},
    "rbe-5": {"format_version": 1, "dim": 4, "idx": 7, "sign": 1, "amp": 2, "residual": "rbe",
              "residual_stage": {"dim": 4, "idx": 7, "sign": 1, "amp": 2}},
    "rbe-5.5": {"format_version": 1, "dim": 4, "idx": 9, "sign": 1, "amp": 2, "residual": "rbe",
                "residual_stage": {"dim": 4, "idx": 7, "sign": 1, "amp": 2}},
    "rbe-6": {"format_version": 1, "dim": 4, "idx": 9, "sign": 1, "amp": 2, "residual": "rbe",
              "residual_stage": {"dim": 4, "idx": 9, "sign": 1, "amp": 2}},
}
#: What ``RBEConfig()`` is: the fewest bits per weight that keep all-MiniLM-L6-v2 embeddings at
#: cosine >= 0.99 and SmolLM2 perplexity within 10% of fp32 once calibrated, among presets with a
#: fast kernel (``docs/results/calibrate.md``, "Choosing the default").
DEFAULT_PRESET = "v2-6"


def preset(name: str) -> dict[str, Any]:
    """The settings of preset ``name``: every field it names; a format-1 preset has no residual
    unless it names one."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    values = PRESETS[name]
    base = {"residual": "none"} if values["format_version"] == 1 else {}
    return {**base, **{k: (list(v) if isinstance(v, list) else dict(v) if isinstance(v, dict) else v)
                       for k, v in values.items()}}
