"""The transformers glue: ``RBEConfig``, layer replacement, quantize-on-load, the quantizer's
lifecycle and model cards. Importing this package registers the ``"rbe"`` quantization method
(``hf_rbe/__init__`` does so as soon as transformers is imported).

    config      RBEConfig: validated settings and presets, per-layer formats
    replace     the one skip policy, the layer factory, swapping layers
    calibrate   output-aware encoding from calibration text, block by block
    quantize    quantize_model: a model in memory, calibrated or not
    convert     the quantize-on-load conversion op
    quantizer   RBEHfQuantizer: the loading lifecycle, nothing else
    card        the model card's text (README.md)
    saving      what save_pretrained / push_to_hub do for an RBE model: card, recorded dtype
"""

from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)

from .config import PRESETS, QUANT_METHOD, RBEConfig
from .quantize import quantize_model
from .quantizer import RBEHfQuantizer
from .replace import replace_with_rbe_linear


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
