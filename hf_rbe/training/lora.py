"""LoRA on RBE models: merging adapters back into packed codes.

PEFT wraps packed layers like any ``nn.Linear`` (frozen codes, trainable adapters). Its own
``merge_and_unload`` would add the delta to the int32 code words, so merging goes through
here instead: decode, add the adapters' delta, re-encode with the layer's own spec, tables
and rotation seed, and, where calibration kept them (``keep_calibration_statistics=True``), the
layer's calibration statistics, so the merged codes are output-aware again.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.packed import PackedLinear
from ..core.qat import calibration_statistics


def merge_and_unload(peft_model: nn.Module) -> nn.Module:
    """Merge the active LoRA adapters of ``peft_model`` into its packed layers; returns the base model."""
    from peft.tuners.lora import LoraLayer

    wrappers = [m for m in peft_model.modules()
                if isinstance(m, LoraLayer) and isinstance(m.get_base_layer(), PackedLinear)]
    for wrapper in tqdm(wrappers, desc="merging LoRA into RBE codes", unit="layer"):
        base: PackedLinear = wrapper.get_base_layer()
        with torch.no_grad():
            w = base.dequantize(torch.float32)
            for name in wrapper.active_adapters:
                if name in wrapper.lora_A:
                    w += wrapper.get_delta_weight(name).to(w)
            base.load_packed(base.encode(w, **calibration_statistics(base)))  # same spec, tables, rotation seed
    return peft_model.unload()
