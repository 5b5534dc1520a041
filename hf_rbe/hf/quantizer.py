"""``RBEHfQuantizer``: the transformers lifecycle around RBE (no math here).

before loading: swap Linear layers for empty packed layers (``replace``); while loading:
quantize each float weight on its device (``convert.RBEQuantize``), or load the stored codes as
they are; after loading: share tables, rebuild derived buffers, check every layer, switch to
QAT if asked, attach the model card. With a calibration ``dataset`` the model loads in full
precision and is calibrated and encoded after loading (``calibrate``), as transformers' GPTQ
integration does.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn
from transformers.quantizers.base import HfQuantizer
from transformers.quantizers.quantizers_utils import get_module_from_name

from ..core.errors import ConfigError
from ..core.packed import PackedLinear, packed_layers
from ..core.rbe_embedding import RBEEmbedding
from ..core.rbe_linear import RBELinear, swap_layers
from .calibration import quantize_calibrated
from .calibration.capture import find_blocks
from .calibration.weights import BlockWeights, checkpoint_name, storage_device, unload
from .config import RBEConfig
from .convert import RBEQuantize
from .finish import finish_conversion
from .integrity import Checkpoint, record, verify
from .replace import (
    build_layers,
    check_replaced,
    eligible,
    encode_into,
    modules_to_skip,
    share_head_codes,
    tied_embedding,
)


class RBEHfQuantizer(HfQuantizer):
    """Quantize to RBE while loading, and load RBE checkpoints."""

    requires_calibration = False
    quantization_config: RBEConfig
    checkpoint: Checkpoint | None = None
    tied: tuple[str, str] | None = None  # (head, input embedding) that share the head's codes
    deferred: RBELinear | None = None  # the tied head's layer, encoded once its float weight is in
    unloaded: dict[str, str] | None = None  # calibrating: block weights left unloaded -> their checkpoint names

    def __init__(self, quantization_config: RBEConfig, **kwargs: Any) -> None:
        # transformers hands over the caller's config object: quantizing must not change it
        super().__init__(quantization_config.copy(), **kwargs)

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise ConfigError("hf-rbe cannot offload RBE layers to disk; use cpu or an accelerator in device_map")

    @property
    def calibrating(self) -> bool:
        return self.quantization_config.dataset is not None and not self.pre_quantized

    def param_needs_quantization(self, model: nn.Module, param_name: str, **kwargs: Any) -> bool:
        module, tensor_name = get_module_from_name(model, param_name)
        return isinstance(module, PackedLinear) and tensor_name == "weight" and not self.pre_quantized

    def _process_model_before_weight_loading(self, model: nn.Module, keep_in_fp32_modules: list[str] | None = None,
                                             checkpoint_files: list[str] | None = None, **kwargs: Any) -> None:
        # Read every file's header first: refuses pickles before anything is unpickled, and keeps the
        # stored dtypes and shapes that loading would otherwise cast away (``integrity``).
        self.checkpoint = Checkpoint.read(checkpoint_files) if checkpoint_files else None
        config = model.config.quantization_config = self.quantization_config  # our copy, not the caller's
        if not self.pre_quantized:
            config.check_quantizable()
        self.modules_to_not_convert = modules_to_skip(model, config, keep_in_fp32_modules or [])
        self.tied = tied_embedding(model, config)
        if self.calibrating:  # calibration reads the blocks' float weights itself, one block at a time
            self.unloaded = self._unloaded(model) if self.checkpoint is not None else {}
            return
        layers = build_layers(model, config, self.modules_to_not_convert)
        if self.tied and not self.pre_quantized and self.tied[0] in layers:
            # A tied head is absent from the checkpoint (transformers ties it to the embedding after
            # loading), so when quantizing it is encoded after loading, from the embedding's weight.
            self.deferred = layers.pop(self.tied[0])
        swap_layers(model, layers)
        check_replaced(config, [*layers, *([self.tied[0]] if self.deferred is not None else [])])
        if self.tied and self.pre_quantized:
            share_head_codes(model, self.tied)

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        if self.calibrating:
            weights = BlockWeights(storage_device(model), self.checkpoint, self.unloaded)
            result = quantize_calibrated(model, self.quantization_config, self.modules_to_not_convert, weights=weights)
            self.quantization_config = self.quantization_config.with_calibration(result.overrides, result.record)
            model.config.quantization_config = self.quantization_config
        elif self.deferred is not None:
            self._encode_tied_head(model)
        if self.pre_quantized and self.checkpoint is not None:
            verify(model, self.checkpoint)
        finish_conversion(model, self.quantization_config, self.tied)
        return model

    def _unloaded(self, model: nn.Module) -> dict[str, str]:
        """Leave the Linear layers calibration converts inside the model's blocks in the checkpoint:
        they become ``Unloaded`` placeholders, transformers does not read their tensors, and
        calibration reads each block's when it calibrates the block (``calibration.weights``), so the
        full-precision model is never in memory at once. Returns their tensors' checkpoint names."""
        prefix, _ = find_blocks(model)
        base = getattr(model, "base_model_prefix", "") or ""
        names, layers = {}, []
        for name, module in eligible(model, self.modules_to_not_convert):
            if type(module) is not nn.Linear or not name.startswith(prefix + "."):
                continue
            tensors = [f"{name}.weight"] + ([f"{name}.bias"] if module.bias is not None else [])
            keys = [checkpoint_name(self.checkpoint, t, base) for t in tensors]  # type: ignore[arg-type]
            if all(k is not None for k in keys):
                names.update(zip(tensors, keys))
                layers.append(name)
        unload(model, layers)
        if names:  # their checkpoint tensors are expected not to load: no "unexpected keys" report
            ignore = set(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())
            model._keys_to_ignore_on_load_unexpected = ignore | {"^(" + "|".join(map(re.escape, names.values())) + ")$"}
        return names

    def _encode_tied_head(self, model: nn.Module) -> None:
        name, layer = self.tied[0], self.deferred  # type: ignore[index]
        head = model.get_submodule(name)
        layer.to_empty(device=head.weight.device)  # built on the meta device, before loading
        if layer.spec.rotation:
            layer.rotation_seed.data.fill_(layer.default_rotation_seed)
        encode_into(layer, head, name)
        swap_layers(model, {name: layer})
        self.deferred = None

    def get_quantize_ops(self) -> RBEQuantize:
        return RBEQuantize(self)

    def get_state_dict_and_metadata(self, model: nn.Module) -> tuple[None, dict[str, str]]:
        return None, record(model)  # layouts and checksums, in every safetensors file's metadata

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
        embeddings = [(n, m) for n, m in model.named_modules() if isinstance(m, RBEEmbedding)]
        floats: dict[int, nn.Module] = {}  # id(packed layer) -> what replaced it
        for name, layer in packed_layers(model):
            lin = _float_module(layer)
            floats[id(layer)] = lin = lin if dtype is None else lin.to(dtype)
            model.set_submodule(name, lin)
        for name, emb in embeddings:  # tied again: the embedding's weight is the float head's
            plain = nn.Embedding(emb.num_embeddings, emb.embedding_dim, emb.padding_idx, device="meta")
            plain.weight = floats[id(emb.head)].weight
            model.set_submodule(name, plain)
        return model


def _float_module(layer: PackedLinear) -> nn.Module:
    """What the layer replaced: an ``nn.Linear``, or GPT-2's ``Conv1D`` (weight [in, out]), so a
    dequantized model saves as a checkpoint of its own architecture."""
    lin = layer.to_linear()
    if not layer.from_conv1d:
        return lin
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(layer.out_features, layer.in_features).to(device=lin.weight.device, dtype=lin.weight.dtype)
    with torch.no_grad():
        conv.weight.copy_(lin.weight.T)
        conv.bias.copy_(lin.bias if lin.bias is not None else torch.zeros_like(conv.bias))
    return conv
