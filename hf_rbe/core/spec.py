"""What every stored format shares: exact descriptions of stored tensors and the checks on values.

A format (RBE v1, seed64, ...) describes each tensor a layer stores as a :class:`TensorSpec`
(shape and dtype); layers allocate from those descriptions and check loaded tensors against
them, so no shape or dtype is written down a second time anywhere else.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from .errors import CheckpointError, EncodingError, FormatError  # noqa: F401  (FormatError's old home)

#: dtypes a packed layer computes in (activations and decoded weights).
COMPUTE_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)
#: The largest finite fp16 value: fp16 scales must stay below it.
FP16_MAX = 65504.0
#: The largest relative error rounding a stage's largest scale to fp16 may add. Normal fp16 rounds
#: within 2^-11; only a layer whose scales all sit deep in the subnormal range (weights ~1e-6 and
#: below) rounds worse, down to zero. Single tiny groups in an ordinary layer are not judged: their
#: rounding error is tiny next to the layer's weights.
FP16_SCALE_RTOL = 2.0**-6


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype of one stored tensor."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    def empty(self, device: torch.device | str | None = None) -> torch.Tensor:
        return torch.zeros(self.shape, dtype=self.dtype, device=device)

    def check(self, name: str, t: torch.Tensor, where: str = "") -> None:
        """Raise :class:`CheckpointError` unless ``t`` has exactly this shape and dtype."""
        prefix = f"{where}: " if where else ""
        if t.dtype != self.dtype:
            raise CheckpointError(f"{prefix}'{name}' is {t.dtype}, the format stores {self.dtype} "
                                  "(tampered checkpoint?)")
        if tuple(t.shape) != self.shape:
            raise CheckpointError(f"{prefix}'{name}' has shape {tuple(t.shape)}, the format needs {self.shape}")


def n_words(n_values: int, bits: int) -> int:
    """int32 words holding ``n_values`` values of ``bits`` bits as one bit stream."""
    return math.ceil(n_values * bits / 32)


def check_fp16_scales(scale: torch.Tensor) -> None:
    """Refuse fp32 scales that fp16 cannot hold: overflow (weights too large) or underflow (a stage
    whose largest scale would round to zero or lose more than ``FP16_SCALE_RTOL``)."""
    if not torch.isfinite(scale).all() or scale.abs().max() > FP16_MAX:
        raise EncodingError("group scales overflow fp16 (weights too large for the RBE format); keep the layer in "
                            "full precision with modules_to_not_convert")
    top = float(scale.abs().max()) if scale.numel() else 0.0
    if top > 0 and abs(float(torch.tensor(top).half()) - top) > FP16_SCALE_RTOL * top:
        raise EncodingError(f"group scales (the largest {top:.2g}) underflow fp16: weights this small would be "
                            "stored as zeros or coarsely; rescale the layer or keep it in full precision with "
                            "modules_to_not_convert")


def check_finite(weight: torch.Tensor, name: str = "weight") -> None:
    """Refuse NaN/Inf weights (no format can encode them)."""
    if not torch.isfinite(weight).all():
        bad = int((~torch.isfinite(weight)).sum())
        raise EncodingError(f"{name} has {bad} NaN/Inf values; they cannot be encoded")


def edit_stamp(t: torch.Tensor) -> int | torch.Size:
    """What an in-place edit of ``t`` changes, for caches of things derived from it: its version
    counter, or its shape for an inference tensor (it keeps no counter; asking raises, and a raise
    and catch per call cost a small layer's decode several microseconds)."""
    return t.shape if t.is_inference() else t._version


def apply_keeping_dtypes(module: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool,
                         names: Iterable[str]) -> nn.Module:
    """``nn.Module._apply`` (``.to(...)``, ``.bfloat16()`` of a model) that moves the named float
    parameters and buffers of ``module`` but keeps their dtypes: those are what the format stores."""
    kept = [(n, (module._parameters[n] if n in module._parameters else module._buffers[n]).data) for n in names]
    out = nn.Module._apply(module, fn, recurse)
    for name, before in kept:
        now = getattr(module, name)
        if now.dtype != before.dtype:
            if name in module._parameters:
                now.data = before.to(now.device)
            else:
                module._buffers[name] = before.to(now.device)
    return out
