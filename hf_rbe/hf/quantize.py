"""``quantize_model``: RBE-quantize a model that is already in memory, with or without calibration."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from ..core.packed import PackedLinear
from ..core.rbe_linear import link_shared_tables
from ..core.stored import STORAGE_DTYPES, store_embeddings
from .calibrate import quantize_calibrated
from .config import RBEConfig
from .quantizer import RBEHfQuantizer
from .replace import encode_weight, float_weight, model_dtype, modules_to_skip, replace_with_rbe_linear
from .saving import attach


def quantize_model(model: nn.Module, config: RBEConfig | None = None, modules_to_not_convert: Iterable[str] = (),
                   tokenizer: object | None = None) -> nn.Module:
    """Quantize an already-loaded model in place (outside ``from_pretrained``), with progress bars.

    The layers converted are those ``from_pretrained(..., quantization_config=config)`` would
    convert (``replace.modules_to_skip``), plus ``modules_to_not_convert`` kept as they are.
    With ``config.dataset`` the codes minimise each layer's output error on that calibration
    text (``calibrate``; ``tokenizer`` or ``config.tokenizer`` tokenizes it).
    """
    config = config or RBEConfig()
    skip = modules_to_skip(model, config, modules_to_not_convert)
    if config.dataset is not None:
        quantize_calibrated(model, config, skip, tokenizer)
    else:
        originals = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))}
        names = replace_with_rbe_linear(model, config, skip)
        for name in tqdm(names, desc="RBE-encoding layers", unit="layer"):
            layer: PackedLinear = model.get_submodule(name)
            old = originals[name]
            layer.load_packed(encode_weight(layer, float_weight(old), name))
            if old.bias is not None:
                layer.bias.data.copy_(old.bias.detach())
        link_shared_tables(model)
    compute = model_dtype(model)
    if config.embedding_dtype is not None:
        store_embeddings(model, STORAGE_DTYPES[config.embedding_dtype], compute)
    if isinstance(model, PreTrainedModel):  # as from_pretrained leaves it: saves, reloads, dequantizes
        model.config.quantization_config = config
        model.hf_quantizer = RBEHfQuantizer(config, pre_quantized=True)
        attach(model, compute)
    return model
