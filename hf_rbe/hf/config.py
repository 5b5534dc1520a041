"""``RBEConfig``: validated settings, nothing more; it builds each layer's format (``layer_format``).

The flat argument list is the API (as every transformers quantization config); inside, the
settings are grouped by concern (``settings``): the format of the layers (format 1, format 2 or
seed64, each checked by its own format module), the model-wide settings, and how to calibrate.
``RBEConfig()`` is the ``DEFAULT_PRESET`` (``presets``).
"""

from __future__ import annotations

import copy
import fnmatch
import hashlib
from collections.abc import Mapping
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

from ..core import format as format_v1
from ..core.errors import ConfigError
from ..core.format import LayerSpec
from ..core.format_v2 import FORMAT_VERSION, PLANE_LADDER, LayerSpecV2
from ..core.seed64_format import Seed64Spec
from . import settings as S
from .presets import DEFAULT_PRESET, PRESETS, preset

QUANT_METHOD = "rbe"

__all__ = ["DEFAULT_PRESET", "PRESETS", "QUANT_METHOD", "RBEConfig"]


class RBEConfig(QuantizationConfigMixin):
    """Quantization config for RBE (Riemannian Basis Encoding); ``RBEConfig.from_preset(name)`` for
    the named settings (``PRESETS``).

    **The layer format.** ``format_version=2`` (the default): ``planes``, a stack of code planes
    (``"e8p"`` 2 bits, ``"vq8"`` 1 bit, ``"vq4"`` 0.5 bit, ``"b1"`` a sign: 1 bit per weight;
    ``hf_rbe.core.format_v2``).
    ``format_version=1``: the paper's bitfield codes, field widths ``dim, idx, sign, amp, deriv, cat,
    sub, amp_fine``, a ``residual`` (``"none" | "int8" | "fp8" | "int4" | "int2" | "rbe"`` with
    ``residual_group_size`` / ``residual_stage``); its defaults are the ``rbe-5.5`` preset.
    ``codec="seed64"``: paper 000, one 64-bit seed per ``tile`` x ``tile`` block (+ an fp16 scale if
    ``seed64_scale``), plus an RBE ``residual`` (``"none"`` or ``"rbe"``) set by ``residual_stage``.
    Without ``format_version``, a format-1 field or ``codec="seed64"`` chooses format 1; a setting
    of another format than the one chosen is refused. Both RBE formats take ``group_size``
    (weights per scale along ``in_features``; ``None``: one per row), ``rotation`` (randomized
    Hadamard on the input side) and ``rotation_block`` (its largest block, a power of two).

    **Model-wide.** ``rotation_seed``: each layer's signs come from it and the layer's name.
    ``table``: ``"universal"`` (one table set per model, fitted to Gaussian vectors, seeded by
    ``table_seed``) or ``"per_layer"``. ``modules_to_not_convert``: names or patterns kept in full
    precision, added to the default skips (the LM head, tied embeddings, task heads).
    ``overrides``: ``{glob pattern: {setting: value}}`` per module (later patterns win), e.g.
    ``{"*.down_proj": {"planes": ["e8p", "e8p"]}}``. ``qat``: keep latent float weights for
    quantization-aware training (``hf_rbe.training``); ``qat_train_quantizer``: train the scales
    and tables too. ``embedding_dtype``: ``"float16"`` or ``"bfloat16"`` storage of the input
    embedding and the output head (on a CPU prefer bf16). ``quantize_embeddings``: RBE-code the
    output head as well (with the planes of the other layers unless an override names it); an
    input embedding tied to it then decodes its rows from the head's codes. ``prefill_dtype``:
    ``"bfloat16"`` lets the CPU kernels multiply a call of many rows (a prompt's prefill) in bf16
    when the model computes in fp32 (the rows and the decoded weight rounded to bf16, the output
    back in fp32), while decoding's few-row kernels keep fp32; ``None``: every product in the
    model's dtype.

    **Calibration** (``hf_rbe.hf.calibration``; not saved, ``calibrated_with`` records it).
    ``dataset``: calibration text (a list of strings, a ``datasets.Dataset`` with a ``text``
    column, or a corpus name: ``"wikipedia"``, ``"austen"`` offline, held-out start excluded);
    ``None``: calibration-free. ``tokenizer``: its tokenizer (default: the model's).
    ``calibration_samples`` windows of ``calibration_seqlen`` tokens, ``calibration_batch_size``
    per pass, chosen by ``calibration_seed``. ``damp_percent``: damping of the Hessians
    (``None``: 0.2 when Fisher-weighted, else 0.01). ``calibration_finetune_steps`` /
    ``_lr``: per-block Adam steps on scales, biases and norms; ``calibration_code_steps``: steps that
    move a block's codes along its loss gradient between them (format 2; ``calibration.codes``, the
    fine-tune's steps split around them); ``calibration_e2e_steps`` / ``_lr``:
    steps of the whole model against the full-precision outputs (``None``: 32 each for a model with
    an output head, 0 for an encoder); ``calibration_e2e_memory``: GiB of block activations that
    fine-tune keeps for its backward pass instead of computing them again (the same result, faster;
    0: every block recomputed, the least memory). ``calibration_fisher``: Fisher-weighted Hessians
    (``None``: on for encoders). ``target_bits``: allocate that many bits per weight over the layers (format 2),
    from ``planes`` up. ``keep_calibration_statistics``: keep each layer's Hessian for re-encoding
    (LoRA merge, QAT). ``calibration_device``: where blocks are calibrated (``None``: a GPU when there
    is one), one at a time, while the model stays where it is. ``calibration_work_dir``: save every
    finished block there; a stopped run started again with the same settings resumes from its last
    finished block. The measured defaults and why: ``docs/usage.md``.
    """

    def __init__(  # the flat argument list is the API; grouped here by concern (class docstring)
        self,
        # format 1 (None: the rbe-5.5 defaults) and what both RBE formats share
        dim: int | None = None, idx: int | None = None, sign: int | None = None, amp: int | None = None,
        deriv: int | None = None, cat: int | None = None, sub: int | None = None, amp_fine: int | None = None,
        group_size: int | None = None, residual: str | None = None, residual_group_size: int | None = None,
        residual_stage: dict[str, Any] | None = None, rotation: bool = True, rotation_block: int = 256,
        # model-wide
        rotation_seed: int = 0, table: str = "universal", table_seed: int = 0,
        modules_to_not_convert: list[str] | None = None, overrides: dict[str, dict[str, Any]] | None = None,
        qat: bool = False, qat_train_quantizer: bool = False,
        # the codec and format choice; seed64; format 2
        codec: str = "rbe", tile: int | None = None, seed64_scale: bool | None = None,
        format_version: int | None = None, planes: list[str] | None = None,
        # calibration
        dataset: str | list[str] | Any | None = None, tokenizer: str | Any | None = None,
        calibration_samples: int = 64, calibration_seqlen: int = 512, calibration_batch_size: int = 2,
        calibration_seed: int = 0, damp_percent: float | None = None, calibration_finetune_steps: int | None = None,
        calibration_finetune_lr: float = 1e-3, calibration_code_steps: int = 0,
        calibration_e2e_steps: int | None = None, calibration_e2e_lr: float = 3e-4,
        calibration_e2e_memory: float = 1.0, calibration_fisher: bool | None = None,
        target_bits: float | None = None,
        keep_calibration_statistics: bool = False, calibrated_with: dict[str, Any] | None = None,
        calibration_device: str | None = None, calibration_work_dir: str | None = None,
        # embeddings and head
        embedding_dtype: str | None = None, quantize_embeddings: bool = False,
        # inference
        prefill_dtype: str | None = None,
        **kwargs: Any,
    ) -> None:
        method = kwargs.pop("quant_method", QUANT_METHOD)
        if method != QUANT_METHOD:
            raise ConfigError(f"RBEConfig got quant_method={method!r}")
        if kwargs:
            raise ConfigError(f"unknown RBEConfig arguments: {sorted(kwargs)}")
        given = {k: v for k, v in dict(
            dim=dim, idx=idx, sign=sign, amp=amp, deriv=deriv, cat=cat, sub=sub, amp_fine=amp_fine,
            residual=residual, residual_group_size=residual_group_size, residual_stage=residual_stage,
            tile=tile, seed64_scale=seed64_scale, planes=planes, group_size=group_size).items() if v is not None}
        if rotation is not True:
            given["rotation"] = rotation
        if rotation_block != 256:
            given["rotation_block"] = rotation_block
        self.quant_method = QUANT_METHOD
        self.codec = codec
        self.format_version = _format_version(format_version, codec, given)
        for name, value in self._layer_settings(given).items():
            setattr(self, name, value)
        self.rotation_seed, self.table, self.table_seed = rotation_seed, table, table_seed
        self.modules_to_not_convert = _module_names(modules_to_not_convert)
        self.overrides = dict(overrides) if isinstance(overrides, Mapping) else overrides
        self.qat, self.qat_train_quantizer = qat, qat_train_quantizer
        self.embedding_dtype, self.quantize_embeddings = embedding_dtype, quantize_embeddings
        self.prefill_dtype = prefill_dtype
        self.dataset, self.tokenizer = dataset, tokenizer
        self.calibration_samples, self.calibration_seqlen = calibration_samples, calibration_seqlen
        self.calibration_batch_size, self.calibration_seed = calibration_batch_size, calibration_seed
        self.damp_percent, self.keep_calibration_statistics = damp_percent, keep_calibration_statistics
        self.calibration_finetune_steps, self.calibration_finetune_lr = calibration_finetune_steps, \
            calibration_finetune_lr
        self.calibration_code_steps = calibration_code_steps
        self.calibration_e2e_steps, self.calibration_e2e_lr = calibration_e2e_steps, calibration_e2e_lr
        self.calibration_e2e_memory = calibration_e2e_memory
        self.calibration_fisher, self.target_bits = calibration_fisher, target_bits
        self.calibration_device, self.calibration_work_dir = calibration_device, calibration_work_dir
        self.calibrated_with = calibrated_with
        self.post_init()

    def _layer_settings(self, given: dict[str, Any]) -> dict[str, Any]:
        """Every layer-format field: the given value or the default where this config's format uses
        it, ``None`` where it does not (a given one is refused)."""
        used = S.uses(self.format_version, self.codec)
        stray = sorted(k for k in given if k not in used)
        if stray:
            what = "codec='seed64'" if self.codec == "seed64" else f"format {self.format_version}"
            seed64_only = set(S.uses(1, "seed64")) - set(S.uses(1, "rbe"))
            hint = "codec='seed64'" if seed64_only & set(stray) else \
                "residual_stage (a seed64 residual's own fields)" if self.codec == "seed64" else \
                "format_version=1 or an 'rbe-*' preset" if self.format_version == 2 else \
                "format_version=2 or a 'v2-*' preset"
            raise ConfigError(f"{stray} {'is not a setting' if len(stray) == 1 else 'are not settings'} of {what}, "
                              f"which uses {sorted(used)}; for those, use {hint}")
        out = dict.fromkeys(S.SPECIFIC)
        out.update(used)
        out.update({k: copy.deepcopy(v) for k, v in given.items()})
        if self.format_version == 2 and out["planes"] is None:
            out["planes"] = list(PRESETS[DEFAULT_PRESET]["planes"])
        if "residual" in used and "residual_stage" not in given and out["residual"] != "rbe":
            out["residual_stage"] = None  # the default stage belongs to the default residual only
        if out.get("planes") is not None and not isinstance(out["planes"], str):
            out["planes"] = list(out["planes"])
        return out

    @classmethod
    def from_preset(cls, name: str, **kwargs: Any) -> RBEConfig:
        """A config from a named preset (``PRESETS``), with any field overridden."""
        return cls(**{**preset(name), **kwargs})

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], return_unused_kwargs: bool = False,
                  **kwargs: Any) -> RBEConfig | tuple[RBEConfig, dict[str, Any]]:
        """A saved config (config.json's ``quantization_config``). Older hf-rbe saved every field
        whatever the format; those it wrote at their defaults are read as absent."""
        d = dict(config_dict)
        fv, codec = d.get("format_version"), d.get("codec", "rbe")
        if isinstance(fv, int) and codec in ("rbe", "seed64"):
            used = S.uses(fv, codec)
            for name, values in S.LEGACY_DEFAULTS.items():
                if name in d and name not in used and any(d[name] == v for v in values):
                    del d[name]
        return super().from_dict(d, return_unused_kwargs, **kwargs)

    def post_init(self) -> None:
        """Validate everything now, so a bad config fails before any weight is touched."""
        if self.codec not in ("rbe", "seed64"):
            raise ConfigError(f"codec must be 'rbe' or 'seed64', got {self.codec!r}")
        S.check_common(self.__dict__)
        S.check_calibration(self.__dict__)
        if self.codec == "seed64":
            if self.qat:
                raise ConfigError("qat=True is not available with codec='seed64' (its seeds have no gradient); "
                                  "use codec='rbe', or quantize with seed64 after training")
            if self.quantize_embeddings:
                raise ConfigError("quantize_embeddings codes the head with RBE: use codec='rbe'")
            if self.dataset is not None:
                raise ConfigError("calibration encodes RBE layers: codec='seed64' takes no dataset")
        self.overrides = {k: dict(v) for k, v in (self.overrides or {}).items()}
        used = S.uses(self.format_version, self.codec)
        for pattern, values in self.overrides.items():
            unknown = set(values) - set(used)
            if unknown:
                kind = "seed64" if self.codec == "seed64" else f"format v{self.format_version}"
                raise ConfigError(f"override {pattern!r} has keys {sorted(unknown)} that {kind} layers do not have "
                                  f"(allowed: {sorted(used)})")
        if self.target_bits is not None and (self.format_version != 2 or self.codec != "rbe"):
            raise ConfigError("target_bits chooses format-2 code planes: use format_version=2 (a v2 preset)")
        if self.target_bits is not None and self.table != "universal":
            raise ConfigError("target_bits counts the shared universal tables: use table='universal'")
        for pattern in ["", *self.overrides]:
            spec = self._format({**self._base_settings(), **self.overrides.get(pattern, {})})
            if self.target_bits is not None:
                self._check_ladder(spec, pattern)

    def _check_ladder(self, spec: LayerSpecV2, pattern: str) -> None:
        planes = tuple(s.plane for s in spec.stages)
        if planes not in PLANE_LADDER:
            where = f"override {pattern!r}" if pattern else "planes"
            ladder = [list(p) for p in PLANE_LADDER]
            raise ConfigError(f"target_bits allocates from plane stacks on the ladder {ladder}; {where} is "
                              f"{list(planes)}")

    def check_quantizable(self) -> None:
        """What only matters when this config quantizes a model (a saved config reloads without it)."""
        if self.target_bits is not None and self.dataset is None:
            raise ConfigError("target_bits allocates bits by a calibration measurement: give a dataset "
                              "(e.g. dataset='wikipedia')")

    # ------------------------------------------------------------------ per-layer formats

    def _base_settings(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in S.uses(self.format_version, self.codec)}

    def _format(self, settings: dict[str, Any]) -> LayerSpec | LayerSpecV2 | Seed64Spec:
        return S.spec_builder(self.format_version, self.codec)(settings, self.table_seed)

    def layer_format(self, module_name: str) -> LayerSpec | LayerSpecV2 | Seed64Spec:
        """The stored format of ``module_name``: the base settings with matching overrides applied
        in order (a ``LayerSpec`` / ``LayerSpecV2`` for RBE, a ``Seed64Spec`` for seed64)."""
        s = self._base_settings()
        for pattern, values in self.overrides.items():
            if fnmatch.fnmatchcase(module_name, pattern):
                s.update(values)
        return self._format(s)

    def base_spec(self) -> LayerSpec | LayerSpecV2:
        """The RBE spec of a layer that no override matches (``codec="rbe"``)."""
        spec = self.layer_format("")
        if isinstance(spec, Seed64Spec):
            raise ConfigError("base_spec() is for codec='rbe'; use layer_format() for seed64")
        return spec

    def layer_rotation_seed(self, module_name: str) -> int:
        """A 63-bit seed per layer, so no two layers share Hadamard signs."""
        h = hashlib.blake2b(f"{self.rotation_seed}:{module_name}".encode(), digest_size=8).digest()
        return int.from_bytes(h, "little") >> 1

    # ------------------------------------------------------------------ copies and saving

    def copy(self) -> RBEConfig:
        """An independent copy (quantizing never changes the caller's config); the calibration
        data and tokenizer are shared, not copied."""
        memo = {id(self.dataset): self.dataset, id(self.tokenizer): self.tokenizer}
        return copy.deepcopy(self, memo)

    def with_calibration(self, overrides: dict[str, dict[str, Any]], record: dict[str, Any]) -> RBEConfig:
        """A copy with what a calibration chose (per-layer ``overrides`` added) and recorded."""
        out = self.copy()
        for name, values in overrides.items():
            out.overrides[name] = {**out.overrides.get(name, {}), **copy.deepcopy(values)}
        out.calibrated_with = copy.deepcopy(record) or None
        out.post_init()
        return out

    def to_dict(self) -> dict[str, Any]:
        """What the checkpoint needs, as JSON: the format and codec, the settings they use, the
        model-wide settings, and ``calibrated_with``. How to calibrate is not a setting of the saved
        model (``calibrated_with`` records what was used)."""
        out = {"quant_method": QUANT_METHOD, "format_version": self.format_version, "codec": self.codec,
               **self._base_settings(), **{k: getattr(self, k) for k in S.COMMON}}
        if self.calibrated_with is not None:
            out["calibrated_with"] = self.calibrated_with
        return copy.deepcopy(out)


def _format_version(format_version: int | None, codec: str, given: dict[str, Any]) -> int:
    """The format asked for: ``format_version``, else 1 for seed64 or when a format-1 field is
    given, else the default preset's."""
    if format_version is None:
        v1 = codec == "seed64" or any(k in format_v1.SETTINGS for k in given)
        format_version = 1 if v1 else PRESETS[DEFAULT_PRESET]["format_version"]
    if not isinstance(format_version, int) or isinstance(format_version, bool) or format_version < 1:
        raise ConfigError(f"format_version must be a positive int, got {format_version!r}")
    if format_version > FORMAT_VERSION:
        raise ConfigError(f"this checkpoint uses RBE format v{format_version}; this hf-rbe reads up to "
                          f"v{FORMAT_VERSION}: upgrade hf-rbe")
    if codec == "seed64" and format_version != 1:
        raise ConfigError("codec='seed64' stores its residual in format 1; use format_version=1")
    return format_version


def _module_names(value: Any) -> str | list[str] | None:
    """``modules_to_not_convert`` as given (a name or a list of names and patterns), checked: a
    hand-edited config.json may hold anything."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ConfigError(f"modules_to_not_convert must be a list of module names or patterns, got {value!r}")
