"""Bits per weight of any quantized model, counted alike for RBE and the libraries it is compared with.

Every tensor a quantized layer stores is counted; floating-point scales and zeros of the other
libraries at 16 bits (their fp16 deployment, although a CPU run may keep them in fp32).
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.packed import PackedLinear


def _tensor_bits(t: torch.Tensor) -> int:
    return t.numel() * min(16, t.element_size() * 8) if t.is_floating_point() else t.numel() * t.element_size() * 8


def quantized_size(model: nn.Module) -> tuple[int, float]:
    """(weights in the quantized layers, bits they store). Packed layers (RBE, seed64) report
    their own storage; HQQ, optimum-quanto and bitsandbytes layers are counted from what they
    store, minus the bias."""
    weights, bits = 0, 0.0
    inside: set[str] = set()
    for name, module in model.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue
        kind = type(module).__module__
        if isinstance(module, PackedLinear):
            weights += module.in_features * module.out_features
            bits += module.storage_bits()
        elif kind.startswith("hqq."):
            weights += int(torch.Size(module.meta["shape"]).numel())
            bits += module.W_q.numel() * module.W_q.element_size() * 8
            bits += sum(_tensor_bits(module.meta[k]) for k in ("scale", "zero") if torch.is_tensor(module.meta.get(k)))
        elif kind.startswith(("optimum.quanto", "bitsandbytes")) and hasattr(module, "in_features"):
            weights += module.in_features * module.out_features
            bits += sum(_tensor_bits(t) for k, t in module.state_dict().items() if k != "bias" and torch.is_tensor(t))
        else:
            continue
        inside.add(name)
    return weights, bits
