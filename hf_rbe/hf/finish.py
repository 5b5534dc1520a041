"""The one place a conversion ends, whichever path made the packed layers.

Quantize-on-load, loading an RBE checkpoint, ``quantize_model`` and calibration each put packed
layers into a model; :func:`finish_conversion` then does what every RBE model needs, in this
order: a tied input embedding reads the coded head's codes (``replace.share_head_codes``), the
embeddings are stored in half precision (``embedding_dtype``), every packed layer's derived
buffers are rebuilt (rotation signs; a follower's tables from its owner, ``core.rbe_linear``), its
``prefill_dtype`` set and its stored tensors frozen, the values are checked (``validate``), QAT
twins replace the layers when the config asks for QAT, and the saving behaviour is bound
(``saving.attach``), as is a ``resize_token_embeddings`` that refuses a coded embedding or head
before it changes anything (transformers would resize the input embedding, then fail on the coded
head).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from ..core.errors import ConfigError
from ..core.packed import PackedLinear, packed_layers
from ..core.qat import prepare_qat
from ..core.rbe_embedding import RBEEmbedding
from ..core.stored import STORAGE_DTYPES, store_embeddings
from .config import RBEConfig
from .replace import model_dtype, share_head_codes
from .saving import attach
from .settings import PREFILL_DTYPES


def finish_conversion(model: nn.Module, config: RBEConfig, tied: tuple[str, str] | None) -> torch.dtype:
    """Finish ``model`` (module docstring); ``tied``: the (head, input embedding) pair sharing the
    head's codes (``replace.tied_embedding``). Returns the dtype the model computes in."""
    if tied:
        share_head_codes(model, tied)
    compute = model_dtype(model)
    if config.embedding_dtype is not None:
        store_embeddings(model, STORAGE_DTYPES[config.embedding_dtype], compute)
    prefill = None if config.prefill_dtype is None else PREFILL_DTYPES[config.prefill_dtype]
    for _, layer in packed_layers(model):
        for module in layer.modules():  # a seed64 layer's RBE residual too
            if hasattr(module, "rebuild_buffers"):
                module.rebuild_buffers()
            if isinstance(module, PackedLinear):
                module.prefill_dtype = prefill
        for p in layer.parameters():
            p.requires_grad_(False)  # loaded stored tensors would otherwise be trainable
        layer.validate()
    if config.qat:
        prepare_qat(model, train_quantizer=config.qat_train_quantizer)  # latents = the decoded codes
    if isinstance(model, PreTrainedModel):
        attach(model, compute)
        # a partial, not a bound method: it pickles and deep-copies with the model
        model.resize_token_embeddings = functools.partial(_resize_token_embeddings, model)  # type: ignore[method-assign]
    return compute


def _resize_token_embeddings(model: PreTrainedModel, *args: Any, **kwargs: Any) -> Any:
    coded = [what for what, m in (("input embedding", model.get_input_embeddings()),
                                  ("output head", model.get_output_embeddings()))
             if isinstance(m, (PackedLinear, RBEEmbedding))]
    if coded:
        verb = "are" if len(coded) > 1 else "is"
        raise ConfigError(f"resize_token_embeddings: the {' and '.join(coded)} {verb} RBE-coded and cannot grow or "
                          "shrink; resize the full-precision model before quantizing, or call model.dequantize() first")
    return type(model).resize_token_embeddings(model, *args, **kwargs)
