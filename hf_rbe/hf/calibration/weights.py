"""Where a block's full-precision weights come from while it is calibrated, and where it goes after.

Calibration needs one block's float weights at a time, on the calibration device. A model in memory
holds them. A model loaded for calibration does not: before transformers loads it, every Linear
layer calibration will convert inside the blocks is replaced by an :class:`Unloaded` placeholder
(``unload``), which has the layer's shape but no parameters, so transformers never reads those
tensors (they are unexpected keys to it). :class:`BlockWeights` then reads each block's layers from
the checkpoint's safetensors files when the block is calibrated, so that the full-precision model
is never in memory at once. Once a block's layers are packed, its float weights are no longer
referenced and are freed; the block (packed layers, norms) moves back where the model lives.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import torch
from safetensors import safe_open
from torch import nn

from ...core.errors import CheckpointError
from ..integrity import Checkpoint
from .heap import trim


def storage_device(model: nn.Module) -> torch.device:
    """Where the model's loaded parameters live (calibrated blocks go back there)."""
    return next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))


def checkpoint_name(checkpoint: Checkpoint, name: str, prefix: str) -> str | None:
    """The checkpoint's name of model tensor ``name``: as it is, or with or without the base model's
    ``prefix`` (as transformers matches them); ``None`` if the checkpoint holds no such tensor."""
    for candidate in (name, f"{prefix}.{name}", name.removeprefix(f"{prefix}.")) if prefix else (name,):
        if candidate in checkpoint.files:
            return candidate
    return None


class Unloaded(nn.Linear):
    """A Linear layer whose weights are still in the checkpoint: its shape, dtype and whether it has a
    bias, and no parameters (so its tensors are not in the model's state dict)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features, self.has_bias, self.dtype = in_features, out_features, bias, dtype

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        return torch.empty(self.out_features, self.in_features, dtype=self.dtype, device="meta")

    @property
    def bias(self) -> torch.Tensor | None:  # type: ignore[override]
        return torch.empty(self.out_features, dtype=self.dtype, device="meta") if self.has_bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("this layer's weights were not loaded yet (hf-rbe reads them while it calibrates)")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.has_bias}, unloaded"


def unload(model: nn.Module, names: Iterable[str]) -> None:
    """Replace the ``nn.Linear`` layers ``names`` of ``model`` by :class:`Unloaded` placeholders."""
    for name in names:
        m = model.get_submodule(name)
        model.set_submodule(name, Unloaded(m.in_features, m.out_features, m.bias is not None, m.weight.dtype))


class BlockWeights:
    """Brings blocks to the calibration device and back (``storage``: where the model lives).

    ``checkpoint`` and ``names`` (model tensor name -> checkpoint tensor name) serve the
    :class:`Unloaded` layers: they are read when their block is brought in."""

    def __init__(self, storage: torch.device, checkpoint: Checkpoint | None = None,
                 names: dict[str, str] | None = None) -> None:
        self.storage, self.checkpoint, self.names = storage, checkpoint, names or {}

    def materialize(self, module: nn.Module, prefix: str, device: torch.device) -> None:
        """``module`` (named ``prefix`` in the model) on ``device`` with its unloaded layers read from
        the checkpoint, in the dtype the model gave them; each file is opened once and closed after
        (its pages leave the process with it)."""
        wanted: dict[str, list[tuple[str, str, str]]] = defaultdict(list)  # file -> (layer, tensor, key)
        layers = [(local, m) for local, m in module.named_modules() if isinstance(m, Unloaded)]
        for local, m in layers:
            for tensor in ("weight", "bias") if m.has_bias else ("weight",):
                key = self.names.get(f"{prefix}.{local}.{tensor}")
                if key is None or self.checkpoint is None:
                    raise CheckpointError(f"{prefix}.{local}.{tensor} was not loaded and no checkpoint tensor is "
                                          "known for it")
                wanted[self.checkpoint.files[key]].append((local, tensor, key))
        read: dict[tuple[str, str], torch.Tensor] = {}
        for file, entries in wanted.items():
            with safe_open(file, framework="pt", device="cpu") as f:
                for local, tensor, key in entries:
                    read[local, tensor] = f.get_tensor(key)
        for local, m in layers:
            linear = nn.Linear(m.in_features, m.out_features, bias=m.has_bias, dtype=m.dtype, device="meta")
            for tensor in ("weight", "bias") if m.has_bias else ("weight",):
                value = read[local, tensor].to(dtype=m.dtype)
                want = tuple(getattr(linear, tensor).shape)
                if tuple(value.shape) != want:
                    raise CheckpointError(f"{prefix}.{local}.{tensor} has shape {tuple(value.shape)} in the "
                                          f"checkpoint, the model needs {want}")
                setattr(linear, tensor, nn.Parameter(value, requires_grad=False))
            module.set_submodule(local, linear)
        module.to(device)

    def release(self, module: nn.Module) -> None:
        """``module`` back where the model lives."""
        module.to(self.storage)
        trim()

    def drop(self, module: nn.Module, prefix: str) -> None:
        """``module`` back where the model lives, with the layers read from the checkpoint unloaded
        again (freed: :meth:`materialize` reads them again when they are needed again)."""
        for local, m in list(module.named_modules()):
            if type(m) is nn.Linear and f"{prefix}.{local}.weight" in self.names:
                module.set_submodule(local, Unloaded(m.in_features, m.out_features, m.bias is not None,
                                                     m.weight.dtype))
        module.to(self.storage)
        trim()
