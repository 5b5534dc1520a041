"""``RBEConfig``: validated settings, nothing more; it builds each layer's format (``layer_format``).

``RBEConfig()`` is the ``v2-6`` preset (format v2, three e8p stages), picked by measurement
(``recipes/calibrate.py``, README "Choosing the default"): the fewest bits per weight among the
presets with a fast kernel that keep all-MiniLM-L6-v2 sentence embeddings at cosine >= 0.99 to
fp32 once calibrated (0.9937; v2-4 reaches 0.972) with SmolLM2 perplexity within 10% of fp32.
Format-v1 fields follow paper 002's code ``[amp_fine|cat|sub|idx|sign|deriv|amp]``; their
defaults are the ``rbe-5.5`` preset. For memory-bound use, pick a lower preset and accept the
measured loss.
"""

from __future__ import annotations

import copy
import fnmatch
import hashlib
import inspect
import math
import re
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

from ..core.format import FIELDS, CodeLayout, LayerSpec, ResidualSpec, StageSpec
from ..core.format_v2 import FORMAT_VERSION, PLANES, LayerSpecV2, StageV2
from ..core.seed64_format import Seed64Spec
from ..core.spec import FormatError
from ..core.stored import STORAGE_DTYPES

QUANT_METHOD = "rbe"

_STAGE_KEYS = ("dim", "idx", "sign", "amp", "deriv", "cat", "sub", "amp_fine", "group_size")
_LAYER_KEYS = _STAGE_KEYS + ("residual", "residual_group_size", "residual_stage", "rotation", "rotation_block")
_V2_KEYS = ("planes", "group_size", "rotation", "rotation_block")  # what a format-v2 layer is made of

#: Named settings (bits per weight: codes + scales; see README). ``rbe-*``: format v1 (the paper's
#: bitfield codes, calibration-free design); ``v2-*``: format v2 (e8p planes, faster kernels, lower error).
PRESETS: dict[str, dict[str, Any]] = {
    "v2-2": {"format_version": 2, "planes": ["e8p"]},
    "v2-2.5": {"format_version": 2, "planes": ["e8p", "vq4"]},
    "v2-3": {"format_version": 2, "planes": ["e8p", "vq8"]},
    "v2-4": {"format_version": 2, "planes": ["e8p", "e8p"]},
    "v2-6": {"format_version": 2, "planes": ["e8p", "e8p", "e8p"]},
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
DEFAULT_PRESET = "v2-6"
_DEFAULT_RESIDUAL_STAGE = {"dim": 4, "idx": 7, "sign": 1, "amp": 2}


class RBEConfig(QuantizationConfigMixin):
    """Quantization config for RBE (Riemannian Basis Encoding).

    Two formats: ``format_version=1`` (the paper's bitfield codes, the fields below) and
    ``format_version=2`` (``planes``: a stack of e8p / vq8 / vq4 code planes, see
    ``hf_rbe.core.format_v2``; the v1 code fields are not used). A saved config names its format.

    Args:
        format_version: 1 or 2, the format new layers are written in. ``None``: format 2 when
            ``planes`` is given, format 1 when a v1 code field, ``residual`` or ``codec="seed64"``
            is, else the default preset's format (and planes). Saved configs name it.
        planes: format 2: the code plane of each stage, e.g. ``["e8p", "vq8"]`` (3 bits per weight).
        dim: weights per vector (one code each), along ``in_features``.
        idx, sign, amp, deriv, cat, sub, amp_fine: code field widths in bits (0 switches one off).
        group_size: weights per gain scale along ``in_features``; ``None`` = one scale per row.
        residual: ``"none" | "int8" | "fp8" | "int4" | "int2" | "rbe"``: what corrects stage 1.
        residual_group_size: weights per scale of an int/fp8 residual.
        residual_stage: field widths (and ``dim``) of the second stage when ``residual="rbe"``
            (default ``{"dim": 4, "idx": 7, "sign": 1, "amp": 2}``).
        rotation: randomized Hadamard rotation of the input side (recommended).
        rotation_block: largest Hadamard block (power of two).
        rotation_seed: 64-bit seed; each layer's signs come from it and the layer's name.
        table: ``"universal"`` (one table per model, fitted to Gaussian vectors) or ``"per_layer"``.
        table_seed: seed of the universal table.
        modules_to_not_convert: module names or patterns kept in full precision (added to the
            defaults: the LM head and tied embeddings).
        overrides: ``{glob pattern: {field: value}}`` per-module settings, e.g.
            ``{"*.down_proj": {"idx": 9}}``; later patterns win.
        qat: keep latent float weights for quantization-aware training (``hf_rbe.training``;
            RBE codecs only).
        qat_train_quantizer: with ``qat``, also train the per-group scales, the gain curves and
            the basis tables (``prepare_qat(train_quantizer=True)``).
        dataset: calibration text (``None``: calibration-free): a list of strings, a
            ``datasets.Dataset`` with a ``text`` column, or a corpus name (``"wikipedia"``,
            ``"austen"``: offline, their held-out start excluded; any Hub dataset where reachable).
            The codes then minimise each layer's output error on it (``hf_rbe.hf.calibrate``).
        tokenizer: the tokenizer (or its name) for ``dataset``; default: the model's own.
        calibration_samples, calibration_seqlen: windows of the text used, and their length in tokens.
            The calibration defaults are the settings measured in ``recipes/calibrate.py`` (about
            11 minutes for SmolLM2-135M on 2 CPU cores, end-to-end step included).
        calibration_batch_size: windows per forward pass while calibrating.
        calibration_seed: which windows (deterministic).
        damp_percent: damping added to the calibration Hessians (fraction of their mean diagonal).
            ``None`` (default): 0.2 for Fisher-weighted Hessians, which a few heavy tokens make far
            worse conditioned (all-MiniLM-L6-v2, v2-4 with 4.48 allocated bits, chosen on movie
            reviews 1000-1999, not the scored 0-999: 0.01 / 0.05 / 0.1 / 0.2 / 0.4 gave cosine
            0.9869 / 0.9884 / 0.9898 / 0.9905 / 0.9905, worst sentence best at 0.2), else 0.01
            (GPTQ's).
        calibration_finetune_steps: Adam steps per block that train its scales, biases and norm
            weights (codes fixed) to reproduce the full-precision activations (0: none).
            ``None`` (default): 32 for a model with an output head (a language model), else 0
            (on all-MiniLM-L6-v2 at v2-6 it lowered the embedding cosine, 0.9965 -> 0.9937).
        calibration_finetune_lr: their learning rate.
        calibration_e2e_steps: Adam steps, one calibration window each, that then train the scales,
            biases and norm weights of the whole model at once against the full-precision model's
            final hidden states (a language model: KL divergence of its next-token distributions;
            0: none). Blocks tuned one at a time cannot see how their errors add up downstream.
            ``None`` (default): 32 for a model with an output head, else 0 (an encoder's loss is its
            last hidden states; on all-MiniLM-L6-v2 at v2-4 that lowered the cosine, 0.9782 -> 0.9769).
        calibration_e2e_lr: their learning rate.
        calibration_fisher: weigh each calibration token in a layer's Hessian by how much the
            model's output depends on that layer's output there (the Fisher information: one
            extra forward and backward pass, ``hf_rbe.hf.calibrate.fisher``). ``None`` (default):
            on for an encoder (all-MiniLM-L6-v2 v2-4, 512 windows of 32 tokens: cosine 0.9802 ->
            0.9828, worst sentence 0.85 -> 0.94), off for a model with an output head
            (SmolLM2-135M v2-3: Wikipedia perplexity 28.96 -> 29.36, 3.5 minutes longer).
        target_bits: format 2 with a ``dataset``: spend this many stored bits per weight on average
            (every stored tensor, shared tables once) and choose each layer's ``planes``, from the
            configured ones up, by a calibration measurement of how much its error moves the
            output (``hf_rbe.hf.allocate``); the choice is saved as per-layer ``overrides``.
            ``None``: every layer gets ``planes``.
        keep_calibration_statistics: keep each layer's Hessian in memory after calibration, so
            that re-encoding (LoRA ``merge_and_unload``, QAT) stays output-aware.
        calibrated_with: set after calibration (saved): the dataset's name, samples, length, seed.
        embedding_dtype: ``"float16"`` or ``"bfloat16"``: store the input embedding and the output
            head (tied or not) in that dtype; the head multiplies in it (4x faster decoding on a
            CPU than fp32), activations stay in the model's dtype (``None``: as loaded). On a CPU
            prefer ``"bfloat16"``: CPUs multiply many fp16 rows slowly.
        quantize_embeddings: also RBE-code the output head (a language model's LM head), with the
            ``planes`` of the other layers unless an override names it (e.g.
            ``overrides={"lm_head": {"planes": ["e8p", "e8p"]}}``); an input embedding tied to it
            (SmolLM2, GPT-2) then reads the head's codes, decoding only the rows it looks up
            (``core.rbe_embedding``). An input embedding not tied to the head stays float
            (``embedding_dtype``). ``False``: both stay float, as bitsandbytes and GPTQ keep them.
        codec: ``"rbe"``, or ``"seed64"`` (paper 000: one 64-bit seed per ``tile`` x ``tile``
            block, plus an fp16 scale per tile if ``seed64_scale``, plus an RBE residual if
            ``residual="rbe"`` with ``residual_stage``).
    """

    def __init__(
        self,
        dim: int = 4,
        idx: int = 9,
        sign: int = 1,
        amp: int = 2,
        deriv: int = 0,
        cat: int = 0,
        sub: int = 0,
        amp_fine: int = 0,
        group_size: int | None = None,
        residual: str = "rbe",
        residual_group_size: int = 64,
        residual_stage: dict[str, Any] | None = None,
        rotation: bool = True,
        rotation_block: int = 256,
        rotation_seed: int = 0,
        table: str = "universal",
        table_seed: int = 0,
        modules_to_not_convert: list[str] | None = None,
        overrides: dict[str, dict[str, Any]] | None = None,
        qat: bool = False,
        qat_train_quantizer: bool = False,
        codec: str = "rbe",
        tile: int = 32,
        seed64_scale: bool = True,
        format_version: int | None = None,
        planes: list[str] | None = None,
        dataset: str | list[str] | Any | None = None,
        tokenizer: str | Any | None = None,
        calibration_samples: int = 64,
        calibration_seqlen: int = 512,
        calibration_batch_size: int = 2,
        calibration_seed: int = 0,
        damp_percent: float | None = None,
        calibration_finetune_steps: int | None = None,
        calibration_finetune_lr: float = 1e-3,
        calibration_e2e_steps: int | None = None,
        calibration_e2e_lr: float = 3e-4,
        calibration_fisher: bool | None = None,
        target_bits: float | None = None,
        keep_calibration_statistics: bool = False,
        calibrated_with: dict[str, Any] | None = None,
        embedding_dtype: str | None = None,
        quantize_embeddings: bool = False,
        **kwargs: Any,
    ) -> None:
        method = kwargs.pop("quant_method", QUANT_METHOD)
        if method != QUANT_METHOD:
            raise ValueError(f"RBEConfig got quant_method={method!r}")
        if kwargs:
            raise ValueError(f"unknown RBEConfig arguments: {sorted(kwargs)}")
        if format_version is None:  # which format the arguments ask for (see the docstring)
            given = dict(dim=dim, idx=idx, sign=sign, amp=amp, deriv=deriv, cat=cat, sub=sub, amp_fine=amp_fine,
                         residual=residual, residual_group_size=residual_group_size, residual_stage=residual_stage)
            v1 = codec == "seed64" or any(v != _V1_DEFAULTS[k] for k, v in given.items())
            if planes is not None or not v1:
                format_version = 2 if planes is not None else PRESETS[DEFAULT_PRESET]["format_version"]
                planes = planes if planes is not None else PRESETS[DEFAULT_PRESET].get("planes")
            else:
                format_version = 1
        if not isinstance(format_version, int) or isinstance(format_version, bool) or format_version < 1:
            raise FormatError(f"format_version must be a positive int, got {format_version!r}")
        if format_version > FORMAT_VERSION:
            raise FormatError(f"this checkpoint uses RBE format v{format_version}; this hf-rbe reads up to "
                              f"v{FORMAT_VERSION}: upgrade hf-rbe")
        self.quant_method = QUANT_METHOD
        self.dim, self.idx, self.sign, self.amp = dim, idx, sign, amp
        self.deriv, self.cat, self.sub, self.amp_fine = deriv, cat, sub, amp_fine
        self.group_size = group_size
        self.residual, self.residual_group_size = residual, residual_group_size
        if residual_stage is None and residual == "rbe":
            residual_stage = _DEFAULT_RESIDUAL_STAGE
        self.residual_stage = dict(residual_stage) if residual_stage is not None else None
        self.rotation, self.rotation_block, self.rotation_seed = rotation, rotation_block, rotation_seed
        self.table, self.table_seed = table, table_seed
        if isinstance(modules_to_not_convert, str):  # list("lm_head") would be its characters
            raise ValueError(f"modules_to_not_convert must be a list of module names or patterns, "
                             f"e.g. [{modules_to_not_convert!r}], got the string {modules_to_not_convert!r}")
        self.modules_to_not_convert = list(modules_to_not_convert) if modules_to_not_convert is not None else None
        self.overrides = {k: dict(v) for k, v in (overrides or {}).items()}
        self.qat = qat
        self.qat_train_quantizer = qat_train_quantizer
        self.codec, self.tile, self.seed64_scale = codec, tile, seed64_scale
        self.format_version = format_version
        self.planes = list(planes) if planes is not None else None
        self.dataset, self.tokenizer = dataset, tokenizer
        self.calibration_samples, self.calibration_seqlen = calibration_samples, calibration_seqlen
        self.calibration_batch_size, self.calibration_seed = calibration_batch_size, calibration_seed
        self.damp_percent, self.keep_calibration_statistics = damp_percent, keep_calibration_statistics
        self.calibration_finetune_steps = calibration_finetune_steps
        self.calibration_finetune_lr = calibration_finetune_lr
        self.calibration_e2e_steps, self.calibration_e2e_lr = calibration_e2e_steps, calibration_e2e_lr
        self.calibration_fisher, self.target_bits = calibration_fisher, target_bits
        self.calibrated_with = dict(calibrated_with) if calibrated_with is not None else None
        self.embedding_dtype = embedding_dtype
        self.quantize_embeddings = quantize_embeddings
        self.post_init()

    @classmethod
    def from_preset(cls, name: str, **kwargs: Any) -> RBEConfig:
        """A config from a named preset (``PRESETS``), with any field overridden."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
        # a preset names every field it sets; anything else (no residual, in particular) is off
        return cls(**{"residual": "none", **copy.deepcopy(PRESETS[name]), **kwargs})

    def post_init(self) -> None:
        """Validate everything now, so a bad config fails before any weight is touched."""
        if self.format_version == 2:
            if not self.planes or not all(isinstance(p, str) and p in PLANES for p in self.planes):
                raise ValueError(f"format_version=2 needs planes, a list drawn from {sorted(PLANES)} "
                                 f"(e.g. ['e8p', 'vq8']), got {self.planes!r}")
            if self.codec != "rbe":
                raise ValueError("codec='seed64' stores its residual in format 1; use format_version=1")
        elif self.planes is not None:
            raise ValueError("planes are a format-2 setting: pass format_version=2 (or use a 'v2-*' preset)")
        self._check_calibration()
        if self.embedding_dtype not in (None, *STORAGE_DTYPES):
            raise ValueError(f"embedding_dtype must be None or one of {sorted(STORAGE_DTYPES)}, "
                             f"got {self.embedding_dtype!r}")
        if self.table not in ("universal", "per_layer"):
            raise ValueError(f"table must be 'universal' or 'per_layer', got {self.table!r}")
        if self.codec not in ("rbe", "seed64"):
            raise ValueError(f"codec must be 'rbe' or 'seed64', got {self.codec!r}")
        if self.codec == "seed64":
            if self.residual not in ("none", "rbe"):
                raise ValueError(f"seed64 takes residual 'none' or 'rbe', got {self.residual!r}")
            if self.qat:
                raise ValueError("qat=True is not available with codec='seed64' (its seeds have no gradient); "
                                 "use codec='rbe', or quantize with seed64 after training")
            Seed64Spec(self.tile, self.seed64_scale)
        if not all(isinstance(v, bool) for v in (self.rotation, self.qat, self.qat_train_quantizer,
                                                 self.quantize_embeddings)):
            raise ValueError("rotation, qat, qat_train_quantizer and quantize_embeddings must be booleans")
        if self.quantize_embeddings and self.codec != "rbe":
            raise ValueError("quantize_embeddings codes the head with RBE: use codec='rbe'")
        if self.qat_train_quantizer and not self.qat:
            raise ValueError("qat_train_quantizer=True needs qat=True")
        for seed_name in ("rotation_seed", "table_seed"):
            s = getattr(self, seed_name)
            if not isinstance(s, int) or not 0 <= s < 2**63:
                raise ValueError(f"{seed_name} must be an int in [0, 2**63), got {s!r}")
        for pattern in self.modules_to_not_convert or []:
            if not isinstance(pattern, str):
                raise ValueError(f"modules_to_not_convert holds {pattern!r}; it takes module names or patterns (str)")
            try:  # transformers matches them as regular expressions
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"modules_to_not_convert pattern {pattern!r} is not a valid regular expression "
                                 f"({err}); escape special characters with re.escape") from err
        self.layer_format("")
        for pattern, values in self.overrides.items():
            if not isinstance(pattern, str) or not isinstance(values, dict):
                raise ValueError("overrides must map glob patterns to dicts of settings")
            allowed = _V2_KEYS if self.format_version == 2 else _LAYER_KEYS
            unknown = set(values) - set(allowed)
            if unknown:
                raise ValueError(f"override {pattern!r} has keys {sorted(unknown)} that format v{self.format_version} "
                                 f"layers do not have (allowed: {sorted(allowed)})")
            self._format({**self._layer_settings(), **values})

    def _check_calibration(self) -> None:
        d = self.dataset
        if d is not None:
            if isinstance(d, list):
                if not d or not all(isinstance(t, str) for t in d):
                    raise ValueError("dataset must be a non-empty list of strings, a datasets.Dataset with a 'text' "
                                     "column, or the name of a corpus (e.g. 'wikipedia')")
            elif not isinstance(d, str) and "text" not in (getattr(d, "column_names", None) or []):
                raise ValueError(f"dataset must be a list of strings, a corpus name, or a datasets.Dataset with a "
                                 f"'text' column; got {type(d).__name__}")
            if self.codec != "rbe":
                raise ValueError("calibration encodes RBE layers: codec='seed64' takes no dataset")
        for name in ("calibration_finetune_steps", "calibration_e2e_steps"):
            v = getattr(self, name)
            if v is None:
                continue
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{name} must be an int >= 0, got {v!r}")
        for name in ("calibration_finetune_lr", "calibration_e2e_lr"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0:
                raise ValueError(f"{name} must be > 0, got {v!r}")
        for name in ("calibration_samples", "calibration_seqlen", "calibration_batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if not isinstance(self.calibration_seed, int) or isinstance(self.calibration_seed, bool):
            raise ValueError(f"calibration_seed must be an int, got {self.calibration_seed!r}")
        d = self.damp_percent
        if d is not None and (not isinstance(d, (int, float)) or isinstance(d, bool) or not 0 < d < 1):
            raise ValueError(f"damp_percent must be in (0, 1), got {self.damp_percent!r}")
        if self.calibration_fisher is not None and not isinstance(self.calibration_fisher, bool):
            raise ValueError(f"calibration_fisher must be a bool or None, got {self.calibration_fisher!r}")
        t = self.target_bits
        if t is not None:
            if not isinstance(t, (int, float)) or isinstance(t, bool) or not math.isfinite(t) or t <= 0:
                raise ValueError(f"target_bits must be a positive number of bits per weight, got {t!r}")
            if self.format_version != 2 or self.codec != "rbe":
                raise ValueError("target_bits chooses format-2 code planes: use format_version=2 (a v2 preset)")
            if self.table != "universal":
                raise ValueError("target_bits counts the shared universal tables: use table='universal'")

    def check_quantizable(self) -> None:
        """What only matters when this config quantizes a model (a saved config reloads without it)."""
        if self.target_bits is not None and self.dataset is None:
            raise ValueError("target_bits allocates bits by a calibration measurement: give a dataset "
                             "(e.g. dataset='wikipedia')")

    # ------------------------------------------------------------------ per-layer specs

    def _layer_settings(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in (_V2_KEYS if self.format_version == 2 else _LAYER_KEYS)}

    def _spec(self, s: dict[str, Any]) -> LayerSpec:
        def stage(d: dict[str, Any]) -> StageSpec:
            unknown = set(d) - set(_STAGE_KEYS)
            if unknown:
                raise ValueError(f"unknown stage settings {sorted(unknown)}")
            layout = CodeLayout(**{k: d[k] for k in FIELDS if k in d})
            return StageSpec(dim=d.get("dim", 4), layout=layout, group_size=d.get("group_size"))

        res_stage = None
        if s["residual"] == "rbe":
            if not s["residual_stage"]:
                raise ValueError("residual='rbe' needs residual_stage, e.g. {'dim': 6, 'idx': 9, 'amp': 2}")
            res_stage = stage(s["residual_stage"])
        elif s["residual_stage"]:
            raise ValueError(f"residual_stage is only used with residual='rbe', not {s['residual']!r}")
        return LayerSpec(
            stage=stage({k: s[k] for k in _STAGE_KEYS}),
            residual=ResidualSpec(kind=s["residual"], group_size=s["residual_group_size"], stage=res_stage),
            rotation=s["rotation"],
            rotation_block=s["rotation_block"],
            table_seed=self.table_seed,
        )

    def base_spec(self) -> LayerSpec | LayerSpecV2:
        """The RBE spec of a layer that no override matches (``codec="rbe"``)."""
        spec = self.layer_format("")
        if isinstance(spec, Seed64Spec):
            raise ValueError("base_spec() is for codec='rbe'; use layer_format() for seed64")
        return spec

    def layer_format(self, module_name: str) -> LayerSpec | LayerSpecV2 | Seed64Spec:
        """The stored format of ``module_name``: the base settings with matching overrides
        applied in order (a ``LayerSpec`` / ``LayerSpecV2`` for RBE, a ``Seed64Spec`` for seed64)."""
        s = self._layer_settings()
        for pattern, values in self.overrides.items():
            if fnmatch.fnmatchcase(module_name, pattern):
                s.update(values)
        return self._format(s)

    def _format(self, s: dict[str, Any]) -> LayerSpec | LayerSpecV2 | Seed64Spec:
        if self.format_version == 2:
            stages = tuple(StageV2(p, s["group_size"]) for p in s["planes"])
            return LayerSpecV2(stages, s["rotation"], s["rotation_block"], self.table_seed)
        if self.codec == "rbe":
            return self._spec(s)
        residual = None
        if s["residual"] == "rbe":  # the residual layer: one RBE stage with CodeLayout's defaults, per-row scale
            stage_settings = {"dim": 4, "group_size": None, "idx": 8, "sign": 1, "amp": 2, "deriv": 0, "cat": 0,
                              "sub": 0, "amp_fine": 0, **s["residual_stage"]}
            residual = self._spec({**s, **stage_settings, "residual": "none", "residual_stage": None})
        return Seed64Spec(self.tile, self.seed64_scale, residual)

    def layer_rotation_seed(self, module_name: str) -> int:
        """A 63-bit seed per layer, so no two layers share Hadamard signs."""
        h = hashlib.blake2b(f"{self.rotation_seed}:{module_name}".encode(), digest_size=8).digest()
        return int.from_bytes(h, "little") >> 1

    def to_dict(self) -> dict[str, Any]:
        """Every setting, as JSON. The calibration data and tokenizer are not settings of the saved
        model: ``calibrated_with`` records what calibrated it (name, samples, length, seed)."""
        out = {k: copy.deepcopy(v) for k, v in self.__dict__.items() if k not in ("dataset", "tokenizer")}
        return {**out, "dataset": None, "tokenizer": None}

    def calibration_record(self) -> dict[str, Any]:
        """What ``calibrated_with`` says of this config's calibration (not the data itself)."""
        d = self.dataset
        name = d if isinstance(d, str) else f"{len(d)} texts" if isinstance(d, list) else \
            f"datasets.Dataset ({getattr(d, 'num_rows', '?')} rows)"
        return {"dataset": name, "samples": self.calibration_samples, "seqlen": self.calibration_seqlen,
                "seed": self.calibration_seed, "damp_percent": self.damp_percent,
                "finetune_steps": self.calibration_finetune_steps, "e2e_steps": self.calibration_e2e_steps,
                "fisher": self.calibration_fisher, "target_bits": self.target_bits}


#: The v1 field defaults (``format_version=None`` reads any other value as a request for format 1).
_V1_DEFAULTS = {k: v.default for k, v in inspect.signature(RBEConfig.__init__).parameters.items()
                if k in ("dim", "idx", "sign", "amp", "deriv", "cat", "sub", "amp_fine", "residual",
                         "residual_group_size", "residual_stage")}
