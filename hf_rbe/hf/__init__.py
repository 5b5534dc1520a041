"""The transformers glue: ``RBEConfig``, layer replacement, quantize-on-load, the quantizer's
lifecycle and model cards. Importing this package registers the ``"rbe"`` quantization method
(``hf_rbe/__init__`` does so as soon as transformers is imported).

    config      RBEConfig: validated settings and presets, per-layer formats
    replace     the one skip policy, swapping layers, quantize_model
    convert     the quantize-on-load conversion op
    quantizer   RBEHfQuantizer: the loading lifecycle, nothing else
    card        model cards on save_pretrained / push_to_hub
"""

from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)

from .config import PRESETS, QUANT_METHOD, RBEConfig
from .quantizer import RBEHfQuantizer
from .replace import quantize_model, replace_with_rbe_linear


def register() -> None:
    """Register ``RBEConfig`` and ``RBEHfQuantizer`` under ``"rbe"``; running it again is harmless
    (transformers' own register functions refuse a name twice)."""
    if AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is not RBEConfig:
        AUTO_QUANTIZATION_CONFIG_MAPPING.pop(QUANT_METHOD, None)
        register_quantization_config(QUANT_METHOD)(RBEConfig)
    if AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is not RBEHfQuantizer:
        AUTO_QUANTIZER_MAPPING.pop(QUANT_METHOD, None)
        register_quantizer(QUANT_METHOD)(RBEHfQuantizer)


register()

__all__ = ["PRESETS", "RBEConfig", "RBEHfQuantizer", "quantize_model", "register", "replace_with_rbe_linear"]
