"""hf-rbe: Riemannian Basis Encoding quantization for Hugging Face Transformers.

``import hf_rbe`` registers the ``"rbe"`` quantization method with transformers, so that
``from_pretrained(..., quantization_config=RBEConfig())`` quantizes on load and
``from_pretrained(saved_dir)`` loads an RBE checkpoint. It also registers Hb-BERT
(``hf_rbe.hb_bert``) with the Auto classes, so saved Hb-BERT checkpoints load the same way.
"""

from __future__ import annotations

from . import hb_bert  # noqa: F401  (registers the hb_bert model type; geoopt is imported only when used)
from .config import PRESETS, RBEConfig
from .format import FORMAT_VERSION, CodeLayout, FormatError, LayerSpec, ResidualSpec, StageSpec
from .integration import quantize_model, replace_with_rbe_linear
from .modules import RBELinear
from .quantizer import RBEHfQuantizer
from .seed64_module import Seed64Linear

__version__ = "0.1.0"
__all__ = [
    "FORMAT_VERSION", "PRESETS", "CodeLayout", "FormatError", "LayerSpec", "RBEConfig", "RBEHfQuantizer",
    "RBELinear", "ResidualSpec", "Seed64Linear", "StageSpec", "quantize_model", "replace_with_rbe_linear",
]


def _register() -> None:
    """Register with transformers once; importing twice (or reloading) is harmless."""
    from transformers.quantizers.auto import (
        AUTO_QUANTIZATION_CONFIG_MAPPING,
        AUTO_QUANTIZER_MAPPING,
        register_quantization_config,
        register_quantizer,
    )

    from .config import QUANT_METHOD

    if AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is not RBEConfig:
        AUTO_QUANTIZATION_CONFIG_MAPPING.pop(QUANT_METHOD, None)
        register_quantization_config(QUANT_METHOD)(RBEConfig)
    if AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is not RBEHfQuantizer:
        AUTO_QUANTIZER_MAPPING.pop(QUANT_METHOD, None)
        register_quantizer(QUANT_METHOD)(RBEHfQuantizer)


_register()
