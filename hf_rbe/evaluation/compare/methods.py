"""The rows of ``hf-rbe compare``: each method and how it gets its quantized model from the fp32 checkpoint.

RBE rows: format v1 (the paper's codes), format v2 calibration-free, and format v2 calibrated
(``RBEConfig``'s calibration defaults; the load time then includes calibration).

HQQ runs through the ``hqq`` library's own ``HQQLinear`` (transformers 5.23 has no HQQ
loader); optimum-quanto and bitsandbytes through their transformers configs; the calibrated peers
GPTQ and AutoRound through their libraries on the calibrated RBE rows' windows, and llama.cpp's
own types through llama-cpp-python (``peers``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...hf.config import PRESETS, RBEConfig
from ..llama_cpp import TYPES as LLAMA_CPP_TYPES
from .peers import GROUP, autoround, gptq, llama_cpp

SMOLLM2, MINILM = "SmolLM2-135M", "all-MiniLM-L6-v2"
PROBE_TRAIN, PROBE_TEST = 2000, 1000  # movie-review snippets for the sentiment probe
BASELINES = ("HQQ", "quanto", "bitsandbytes")
CALIBRATED_PEERS = ("GPTQ", "AutoRound")
DECODER_ONLY = ("llama.cpp",)  # families with no MiniLM row
FAMILIES = ("fp32", "RBE", "RBE v2", "RBE v2 calibrated", "seed64", *BASELINES, *CALIBRATED_PEERS,
            *DECODER_ONLY)  # table order
RBE_SETTINGS = ("rbe-1.5", "rbe-2", "rbe-2.5", "rbe-3", "rbe-4", "rbe-4.5")
RBE_V2_SETTINGS = ("v2-2", "v2-3", "v2-4")
# Calibrated on the Wikipedia text after its first 32,768 tokens: disjoint from the scored start. At the
# widths the calibrated peers run at; recipes/calibrate.py sweeps more settings and models.
CALIBRATED, CALIBRATED_SETTINGS = {"dataset": "wikipedia"}, ("v2-2", "v2-3", "v2-4")
#: The seed64 row's residual: one rbe-2.5 stage.
RESIDUAL_2_5 = {k: v for k, v in PRESETS["rbe-2.5"].items() if k in ("dim", "idx", "sign", "amp")}


@dataclass
class Method:
    """One row of the comparison: how to get the quantized model from the fp32 checkpoint."""

    name: str
    family: str  # one line in the plot, one of FAMILIES
    #: (checkpoint path, Auto class) -> quantized model. A model that computes with dequantized
    #: weights (a peer's fake-quantized model) carries ``stored_as``: what its packed checkpoint
    #: stores (``peers.stored_size``), counted instead of its in-memory tensors.
    load: Callable[[str, type], nn.Module]


def _fp32(path: str, auto: type) -> nn.Module:
    return auto.from_pretrained(path, dtype=torch.float32)


def _with_config(config: Any) -> Callable[[str, type], nn.Module]:
    def load(path: str, auto: type) -> nn.Module:
        return auto.from_pretrained(path, dtype=torch.float32, quantization_config=config, device_map="cpu")

    return load


def _hqq(nbits: int, group: int) -> Callable[[str, type], nn.Module]:
    def load(path: str, auto: type) -> nn.Module:
        from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

        model = auto.from_pretrained(path, dtype=torch.float32)
        cfg = BaseQuantizeConfig(nbits=nbits, group_size=group)
        for name, module in list(model.named_modules()):
            if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] != "lm_head":
                model.set_submodule(name, HQQLinear(module, cfg, compute_dtype=torch.float32, device="cpu"))
        return model

    return load


def methods(families: list[str] | None = None, names: list[str] | None = None) -> list[Method]:
    """Every row, in table order; ``families`` keeps only those families, ``names`` only those rows
    (an unknown name is an error, not an empty run)."""
    from transformers import BitsAndBytesConfig, QuantoConfig

    rows = [Method("fp32 (unquantized)", "fp32", _fp32)]
    rows += [Method(f"RBE {p}", "RBE", _with_config(RBEConfig.from_preset(p))) for p in RBE_SETTINGS]
    rows += [Method(f"RBE {p}", "RBE v2", _with_config(RBEConfig.from_preset(p))) for p in RBE_V2_SETTINGS]
    rows += [Method(f"RBE {p} calibrated", "RBE v2 calibrated", _with_config(RBEConfig.from_preset(p, **CALIBRATED)))
             for p in CALIBRATED_SETTINGS]
    rows += [Method("seed64 + scale + rbe-2.5 residual", "seed64",
                    _with_config(RBEConfig(codec="seed64", tile=32, residual="rbe", residual_stage=RESIDUAL_2_5)))]
    rows += [Method(f"HQQ {b}-bit g64", "HQQ", _hqq(b, 64)) for b in (2, 3, 4)]
    rows += [Method(f"quanto {w}", "quanto", _with_config(QuantoConfig(weights=w))) for w in ("int2", "int4", "int8")]
    rows += [Method("bitsandbytes NF4", "bitsandbytes",
                    _with_config(BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"))),
             Method("bitsandbytes int8", "bitsandbytes", _with_config(BitsAndBytesConfig(load_in_8bit=True)))]
    rows += [Method(f"GPTQ W{b} g{GROUP}", "GPTQ", gptq(b)) for b in (2, 3, 4)]
    rows += [Method(f"AutoRound W{b} g{GROUP}", "AutoRound", autoround(b)) for b in (2, 3, 4)]
    rows += [Method(f"llama.cpp {t}", "llama.cpp", llama_cpp(t)) for t in LLAMA_CPP_TYPES]
    unknown = sorted(set(names or ()) - {m.name for m in rows})
    if unknown:
        raise ValueError(f"no compare row is named {unknown}; the rows: {[m.name for m in rows]}")
    return [m for m in rows if (families is None or m.family in families) and (names is None or m.name in names)]
