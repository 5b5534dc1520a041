"""``RBEConfig``'s settings by concern: which fields each codec uses, their defaults, and the checks
of everything that is not a layer format (those live beside each format: ``core.format``,
``core.format_v2``, ``core.seed64_format``, each with ``SETTINGS`` and ``spec_from_settings``).
Plain data and functions; ``config`` assembles them.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from typing import Any

import torch

from ..core import format as format_v1
from ..core import format_v2, seed64_format
from ..core.errors import ConfigError
from ..core.stored import STORAGE_DTYPES

#: Settings both RBE formats use, per layer (overridable).
SHARED: dict[str, Any] = {"group_size": None, "rotation": True, "rotation_block": 256}
#: Settings of a seed64 layer besides its own: its RBE residual (and the rotation, ``SHARED``).
SEED64_RESIDUAL = ("residual", "residual_stage")
#: Model-wide settings every config has.
COMMON: dict[str, Any] = {"rotation_seed": 0, "table": "universal", "table_seed": 0, "modules_to_not_convert": None,
                          "overrides": None, "qat": False, "qat_train_quantizer": False, "embedding_dtype": None,
                          "quantize_embeddings": False, "prefill_dtype": None}
#: ``prefill_dtype`` values: the products the CPU kernels can make in another dtype than x's.
PREFILL_DTYPES: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16}
#: How to calibrate (``hf.calibration``); not saved: ``calibrated_with`` records what was used.
CALIBRATION: dict[str, Any] = {
    "dataset": None, "tokenizer": None, "calibration_samples": 64, "calibration_seqlen": 512,
    "calibration_batch_size": 2, "calibration_seed": 0, "damp_percent": None, "calibration_finetune_steps": None,
    "calibration_finetune_lr": 1e-3, "calibration_code_steps": 0, "calibration_e2e_steps": None,
    "calibration_e2e_lr": 3e-4, "calibration_e2e_memory": 1.0, "calibration_fisher": None, "target_bits": None,
    "keep_calibration_statistics": False,
    "calibration_device": None, "calibration_work_dir": None}

#: Every field that belongs to one codec or format (the rest are ``COMMON`` and ``CALIBRATION``).
SPECIFIC: tuple[str, ...] = (*format_v1.SETTINGS, *format_v2.SETTINGS, *seed64_format.SETTINGS, *SHARED)

#: What hf-rbe before the house restructure wrote into every saved config whatever its format:
#: every field, at these values when the format did not use it. ``from_dict`` reads them as absent.
LEGACY_DEFAULTS: dict[str, tuple[Any, ...]] = {
    "dim": (4,), "idx": (9,), "sign": (1,), "amp": (2,), "deriv": (0,), "cat": (0,), "sub": (0,), "amp_fine": (0,),
    "residual": ("rbe", "none"), "residual_group_size": (64,),
    "residual_stage": ({"dim": 4, "idx": 7, "sign": 1, "amp": 2}, None), "tile": (32,), "seed64_scale": (True,),
    "planes": (None,), "group_size": (None,), "dataset": (None,), "tokenizer": (None,)}


def uses(format_version: int, codec: str) -> dict[str, Any]:
    """The layer settings a config of this format and codec uses, with their defaults (``planes``
    has none: ``RBEConfig`` fills in the default preset's)."""
    if codec == "seed64":
        residual = {k: format_v1.SETTINGS[k] for k in SEED64_RESIDUAL}
        return {**seed64_format.SETTINGS, **residual, "rotation": True, "rotation_block": 256}
    own = format_v1.SETTINGS if format_version == 1 else format_v2.SETTINGS
    return {**own, **SHARED}


def spec_builder(format_version: int, codec: str):  # type: ignore[no-untyped-def]
    """``spec_from_settings`` of the format that builds this config's layers."""
    if codec == "seed64":
        return seed64_format.spec_from_settings
    return format_v1.spec_from_settings if format_version == 1 else format_v2.spec_from_settings


def _int(name: str, v: Any, low: int, high: int | None = None) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v < low or (high is not None and v >= high):
        span = f">= {low}" if high is None else f"in [{low}, {high})"
        raise ConfigError(f"{name} must be an int {span}, got {v!r}")


def _positive_number(name: str, v: Any) -> None:
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or not v > 0:
        raise ConfigError(f"{name} must be a finite number > 0, got {v!r}")


def check_common(values: Mapping[str, Any]) -> None:
    """The model-wide settings (``COMMON``)."""
    for name in ("rotation_seed", "table_seed"):
        _int(name, values[name], 0, 2**63)
    if values["table"] not in ("universal", "per_layer"):
        raise ConfigError(f"table must be 'universal' or 'per_layer', got {values['table']!r}")
    for name in ("qat", "qat_train_quantizer", "quantize_embeddings"):
        if not isinstance(values[name], bool):
            raise ConfigError(f"{name} must be a bool, got {values[name]!r}")
    if values["qat_train_quantizer"] and not values["qat"]:
        raise ConfigError("qat_train_quantizer=True needs qat=True")
    if values["embedding_dtype"] not in (None, *STORAGE_DTYPES):
        raise ConfigError(f"embedding_dtype must be None or one of {sorted(STORAGE_DTYPES)}, "
                          f"got {values['embedding_dtype']!r}")
    if values["prefill_dtype"] not in (None, *PREFILL_DTYPES):
        raise ConfigError(f"prefill_dtype must be None or one of {sorted(PREFILL_DTYPES)}, "
                          f"got {values['prefill_dtype']!r}")
    skip = values["modules_to_not_convert"]
    if isinstance(skip, str) or not (skip is None or isinstance(skip, (list, tuple))):
        raise ConfigError(f"modules_to_not_convert must be a list of module names or patterns, e.g. ['lm_head'], "
                          f"got {skip!r}")
    for pattern in skip or []:
        if not isinstance(pattern, str):
            raise ConfigError(f"modules_to_not_convert holds {pattern!r}; it takes module names or patterns (str)")
        try:  # transformers matches them as regular expressions
            re.compile(pattern)
        except re.error as err:
            raise ConfigError(f"modules_to_not_convert pattern {pattern!r} is not a valid regular expression "
                              f"({err}); escape special characters with re.escape") from err
    overrides = values["overrides"]
    if overrides is not None and (not isinstance(overrides, Mapping) or not all(
            isinstance(k, str) and isinstance(v, Mapping) for k, v in overrides.items())):
        raise ConfigError(f"overrides must map glob patterns to dicts of settings, e.g. "
                          f"{{'*.down_proj': {{'planes': ['e8p', 'e8p']}}}}, got {overrides!r}")


def check_calibration(values: Mapping[str, Any]) -> None:
    """The calibration settings (``CALIBRATION``), checked before any weight is touched."""
    d = values["dataset"]
    if d is not None:
        if isinstance(d, list):
            if not d or not all(isinstance(t, str) for t in d):
                raise ConfigError("dataset must be a non-empty list of strings, a datasets.Dataset with a 'text' "
                                  "column, or the name of a corpus (e.g. 'wikipedia')")
        elif not isinstance(d, str) and "text" not in (getattr(d, "column_names", None) or []):
            raise ConfigError(f"dataset must be a list of strings, a corpus name, or a datasets.Dataset with a "
                              f"'text' column; got {type(d).__name__}")
    for name in ("calibration_samples", "calibration_seqlen", "calibration_batch_size"):
        _int(name, values[name], 1)
    _int("calibration_seed", values["calibration_seed"], 0, 2**63)
    for name in ("calibration_finetune_steps", "calibration_e2e_steps"):
        if values[name] is not None:
            _int(name, values[name], 0)
    _int("calibration_code_steps", values["calibration_code_steps"], 0)
    for name in ("calibration_finetune_lr", "calibration_e2e_lr"):
        _positive_number(name, values[name])
    memory = values["calibration_e2e_memory"]
    if not isinstance(memory, (int, float)) or isinstance(memory, bool) or not math.isfinite(memory) or memory < 0:
        raise ConfigError(f"calibration_e2e_memory must be a finite number of GiB >= 0, got {memory!r}")
    damp = values["damp_percent"]
    if damp is not None and (not isinstance(damp, (int, float)) or isinstance(damp, bool) or not 0 < damp < 1):
        raise ConfigError(f"damp_percent must be in (0, 1), got {damp!r}")
    for name in ("calibration_fisher",):
        if values[name] is not None and not isinstance(values[name], bool):
            raise ConfigError(f"{name} must be a bool or None, got {values[name]!r}")
    if not isinstance(values["keep_calibration_statistics"], bool):
        raise ConfigError(f"keep_calibration_statistics must be a bool, got {values['keep_calibration_statistics']!r}")
    if values["target_bits"] is not None:
        _positive_number("target_bits", values["target_bits"])
    device = values["calibration_device"]
    if device is not None:
        try:
            torch.device(device)
        except (RuntimeError, TypeError) as err:
            raise ConfigError(f"calibration_device must name a torch device ('cpu', 'cuda', 'cuda:1'), got "
                              f"{device!r}") from err
    work = values["calibration_work_dir"]
    if work is not None and not isinstance(work, (str, os.PathLike)):
        raise ConfigError(f"calibration_work_dir must be a directory path, got {work!r}")
