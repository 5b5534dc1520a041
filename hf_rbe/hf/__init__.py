"""The transformers glue: ``RBEConfig``, layer replacement, calibration, quantize-on-load, the
quantizer's lifecycle, saving and model cards. Importing this package registers the ``"rbe"``
quantization method (``hf_rbe/__init__`` does so as soon as transformers is imported).

    presets     the named settings
    settings    RBEConfig's settings by concern and the checks of the non-format ones
    config      RBEConfig: the flat API, the format choice, per-layer formats, copies
    replace     the one skip policy, the layer factory, tied heads, encoding helpers
    finish      the one place a conversion ends
    calibration output-aware encoding from calibration text, block by block (a package)
    quantize    quantize_model: a model in memory, calibrated or not
    checkpoint  quantize_checkpoint: a checkpoint on disk into another, in bounded memory, resumable
    convert     the quantize-on-load conversion op
    quantizer   RBEHfQuantizer: the loading lifecycle, nothing else
    integrity   the checkpoint record and the checks on load
    saving      what save_pretrained / push_to_hub do for an RBE model
    atomic      a checkpoint directory replaced whole: staging, swap, writers in turn
    card        the model card's text (template: model_card.md)
    calibrate, allocate   old paths of calibration and allocation (warn once)
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
