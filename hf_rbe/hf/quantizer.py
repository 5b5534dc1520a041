"""``RBEHfQuantizer``: the transformers lifecycle around RBE (no math here).

before loading: swap Linear layers for empty packed layers (``replace``); while loading:
quantize each float weight on its device (``convert.RBEQuantize``), or load the stored codes as
they are; after loading: share tables, rebuild derived buffers, check every layer, switch to
QAT if asked, attach the model card.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.quantizers.base import HfQuantizer
from transformers.quantizers.quantizers_utils import get_module_from_name

from ..core.packed import PackedLinear, packed_layers
from ..core.qat import prepare_qat
from ..core.rbe_linear import link_shared_tables
from .card import attach
from .config import RBEConfig
from .convert import RBEQuantize
from .replace import modules_to_skip, replace_with_rbe_linear


class RBEHfQuantizer(HfQuantizer):
    """Quantize to RBE while loading, and load RBE checkpoints."""

    requires_calibration = False
    quantization_config: RBEConfig

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise ValueError("hf-rbe cannot offload RBE layers to disk; use cpu or an accelerator in device_map")

    def param_needs_quantization(self, model: nn.Module, param_name: str, **kwargs: Any) -> bool:
        module, tensor_name = get_module_from_name(model, param_name)
        return isinstance(module, PackedLinear) and tensor_name == "weight" and not self.pre_quantized

    def _process_model_before_weight_loading(self, model: nn.Module, keep_in_fp32_modules: list[str] | None = None,
                                             **kwargs: Any) -> None:
        self.modules_to_not_convert = modules_to_skip(model, self.quantization_config, keep_in_fp32_modules or [])
        replace_with_rbe_linear(model, self.quantization_config, self.modules_to_not_convert)

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        link_shared_tables(model)
        for module in model.modules():
            if isinstance(module, PackedLinear):
                module.rebuild_buffers()
                for p in module.parameters(recurse=False):
                    p.requires_grad_(False)  # loaded stored tensors would otherwise be trainable
        for _, layer in packed_layers(model):
            layer.validate()
        if self.quantization_config.qat:
            prepare_qat(model, train_quantizer=self.quantization_config.qat_train_quantizer)  # latents = decoded codes
        attach(model)
        return model

    def get_quantize_ops(self) -> RBEQuantize:
        return RBEQuantize(self)

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True  # through adapters (PEFT); the codes themselves stay frozen

    @property
    def is_qat_trainable(self) -> bool:
        return bool(self.quantization_config.qat)

    @property
    def is_compileable(self) -> bool:
        return True

    def _dequantize(self, model: nn.Module, dtype: torch.dtype | str | None = None) -> nn.Module:
        if isinstance(dtype, str):  # a saved config holds its dtype as a name ("float32")
            dtype = getattr(torch, dtype)
        for name, layer in packed_layers(model):
            lin = layer.to_linear()
            model.set_submodule(name, lin if dtype is None else lin.to(dtype))
        return model
