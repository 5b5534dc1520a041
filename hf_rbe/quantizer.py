"""``RBEHfQuantizer``: the transformers lifecycle around RBE (no math here).

before loading: swap Linear layers for empty ``RBELinear``; while loading: quantize each float
weight on its device (``integration.RBEQuantize``), or load the stored codes as they are;
after loading: share tables, rebuild the Hadamard signs, check every layer.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from transformers.quantizers.base import HfQuantizer
from transformers.quantizers.quantizers_utils import get_module_from_name

from .config import RBEConfig
from .modules import RBELinear, link_shared_tables
from .seed64_module import Seed64Linear

logger = logging.getLogger(__name__)

#: Task heads (sequence/token classification, reward scores, extractive QA) usually arrive
#: untrained from ``from_pretrained`` and are what fine-tuning trains: kept in full precision.
TASK_HEADS = ("classifier", "score", "qa_outputs")


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
        return isinstance(module, (RBELinear, Seed64Linear)) and tensor_name == "weight" and not self.pre_quantized

    def _process_model_before_weight_loading(self, model: nn.Module, keep_in_fp32_modules: list[str] | None = None, **kwargs: Any) -> None:
        from .integration import replace_with_rbe_linear

        self.modules_to_not_convert = self.get_modules_to_not_convert(
            model, self.quantization_config.modules_to_not_convert, model._keep_in_fp32_modules, add_default_skips=True
        ) + list(TASK_HEADS)
        replace_with_rbe_linear(model, self.quantization_config, self.modules_to_not_convert)

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        link_shared_tables(model)
        for module in model.modules():
            if isinstance(module, RBELinear):
                module.rebuild_buffers()
            if isinstance(module, (RBELinear, Seed64Linear)):
                module.validate()
                for name, p in module.named_parameters(recurse=False):
                    p.requires_grad_(False)  # loaded companions would otherwise be trainable
        if self.quantization_config.qat:
            from .training import prepare_qat

            prepare_qat(model, train_quantizer=self.quantization_config.qat_train_quantizer)  # latents = decoded codes
        from .card import attach

        attach(model)
        return model

    def get_quantize_ops(self):  # type: ignore[no-untyped-def]
        from .integration import RBEQuantize

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

    def _dequantize(self, model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
        for name, module in list(model.named_modules()):
            if isinstance(module, (RBELinear, Seed64Linear)) and name.rsplit(".", 1)[-1] not in ("residual", "codes"):
                lin = module.to_linear()
                if dtype is not None:
                    lin = lin.to(dtype)
                model.set_submodule(name, lin)
        return model
