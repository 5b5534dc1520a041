"""``quantize_model``: RBE-quantize a model that is already in memory, with or without calibration."""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from ..core.errors import ConfigError
from ..core.packed import PackedLinear
from .calibration import quantize_calibrated
from .calibration.finetune import norms
from .config import RBEConfig
from .finish import finish_conversion
from .quantizer import RBEHfQuantizer
from .replace import (
    eligible,
    encode_into,
    model_part,
    module_name,
    modules_to_skip,
    replace_with_rbe_linear,
    tied_embedding,
)

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def _all_or_nothing(model: nn.Module, skip: list[str]) -> Iterator[None]:
    """Hand ``model`` back exactly as it was if quantizing raises: the float layers that were
    swapped out, the norm weights calibration trains, the embeddings' classes and weights, the
    train/eval mode. Costs the norms' size; the float layers are kept alive until the end."""
    layers = dict(eligible(model, skip))
    norm_ids = {id(m) for m in norms(model)}
    norm_state = {f"{n}.{k}": p.detach().clone() for n, m in model.named_modules() if id(m) in norm_ids
                  for k, p in m.named_parameters(recurse=False)}
    emb = model_part(model, "get_input_embeddings")
    head_state = [(m, m.__class__, m.weight) for m in (emb, model_part(model, "get_output_embeddings"))
                  if m is not None]
    emb_name = module_name(model, emb)
    tying = dict(getattr(model, "all_tied_weights_keys", None) or {})
    training = model.training
    try:
        yield
    except BaseException:
        for name, module in layers.items():
            model.set_submodule(name, module)
        with torch.no_grad():
            for name, value in norm_state.items():
                model.get_parameter(name).copy_(value)
        for m, cls, weight in head_state:
            m.__class__, m.weight = cls, weight
        if emb_name:  # an embedding that came to read a coded head's rows, and their tie
            model.set_submodule(emb_name, emb)
            if tying:
                model.all_tied_weights_keys.update(tying)
        model.train(training)
        logger.error("hf-rbe: quantization failed; the model is left as it was")
        raise


def _refuse_unquantizable(model: nn.Module) -> None:
    """A quantized model's float layers are gone: quantizing it again would only swap its config
    (the saved checkpoint would then not load). Another method's config refuses too; an RBE config
    without RBE layers does not (models built from one config object share it, so quantizing one
    sets it on the others). A model on the meta device has no weights."""
    coded = next((n for n, m in model.named_modules() if isinstance(m, PackedLinear)), None)
    qc = getattr(getattr(model, "config", None), "quantization_config", None)
    method = qc.get("quant_method", "?") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    if coded is not None or (method is not None and method != "rbe"):
        what = f"{coded} is an RBE layer" if coded is not None else f"its config says quant_method={method!r}"
        raise ConfigError(f"quantize_model: the model is already quantized ({what}); quantize its full-precision "
                          "original, or call model.dequantize() first")
    meta = next((n for n, p in model.named_parameters() if p.device.type == "meta"), None)
    if meta is not None:
        raise ConfigError(f"quantize_model: {meta} is on the meta device (no weights to quantize): load the model "
                          "with its weights, or quantize its checkpoint with hf_rbe.quantize_checkpoint")


def _own_config(model: PreTrainedModel) -> None:
    """Give ``model`` a config of its own before its quantization is recorded there: models built from
    one config object share it, and a float sibling would otherwise save as an RBE checkpoint. Every
    submodule that held the shared config (or one of its sub-configs) gets the copy."""
    memo: dict[int, Any] = {}
    model.config = copy.deepcopy(model.config, memo)
    for m in model.modules():
        held = m.__dict__.get("config")
        if held is not None and id(held) in memo:
            m.config = memo[id(held)]


def quantize_model(model: nn.Module, config: RBEConfig | None = None, modules_to_not_convert: Iterable[str] = (),
                   tokenizer: object | None = None) -> nn.Module:
    """Quantize an already-loaded model in place (outside ``from_pretrained``), with progress bars.

    Either every layer is converted or, if anything fails, the model is left exactly as it was.
    The layers converted are those ``from_pretrained(..., quantization_config=config)`` would
    convert (``replace.modules_to_skip``), plus ``modules_to_not_convert`` kept as they are.
    With ``config.dataset`` the codes minimise each layer's output error on that calibration
    text (``calibration``; ``tokenizer`` or ``config.tokenizer`` tokenizes it). ``config`` itself
    is never changed: the model gets a copy (with what calibration chose and recorded), and the
    model's own ``config`` is copied too before the quantization is recorded in it. Refused: a model
    already quantized, or on the meta device.
    """
    _refuse_unquantizable(model)
    config = (config or RBEConfig()).copy()
    config.check_quantizable()
    skip = modules_to_skip(model, config, modules_to_not_convert)
    tied = tied_embedding(model, config)
    with _all_or_nothing(model, skip):
        if config.dataset is not None:
            result = quantize_calibrated(model, config, skip, tokenizer)
            config = config.with_calibration(result.overrides, result.record)
        else:
            originals = dict(eligible(model, skip))
            names = replace_with_rbe_linear(model, config, skip)
            for name in tqdm(names, desc="RBE-encoding layers", unit="layer"):
                encode_into(model.get_submodule(name), originals[name], name)
        finish_conversion(model, config, tied)
    if isinstance(model, PreTrainedModel):  # as from_pretrained leaves it: saves, reloads, dequantizes
        _own_config(model)
        model.hf_quantizer = RBEHfQuantizer(config, pre_quantized=True)
        model.config.quantization_config = model.hf_quantizer.quantization_config
    return model
