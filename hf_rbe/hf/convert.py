"""Quantize-on-load: the transformers conversion op that turns one float weight into stored tensors.

transformers (v5) hands each checkpoint weight of a layer the quantizer marked to
:meth:`RBEQuantize.convert`, already on its device; the op encodes it there and returns every
tensor the packed layer stores, under their full names.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers.core_model_loading import ConversionOps
from transformers.quantizers.quantizers_utils import get_module_from_name

from .replace import encode_weight


class RBEQuantize(ConversionOps):
    """One float ``weight`` in, all of the layer's stored tensors out."""

    def __init__(self, hf_quantizer: Any) -> None:
        self.hf_quantizer = hf_quantizer

    def convert(self, input_dict: dict, model: nn.Module | None = None, missing_keys: set | None = None,
                **kwargs: Any) -> dict:  # type: ignore[override]
        target_key, value = next(iter(input_dict.items()))
        value = value[0] if isinstance(value, list) else value
        layer, _ = get_module_from_name(model, target_key)
        base = target_key.rsplit(".", 1)[0]
        weight = value.T if layer.from_conv1d else value
        result = {f"{base}.{k}": v for k, v in encode_weight(layer, weight, base).items()}
        if missing_keys is not None:
            missing_keys.difference_update(result)
        return result
