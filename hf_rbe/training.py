"""Quantization-aware training (paper 002's straight-through estimator) through ``Trainer``.

``prepare_qat(model)`` swaps every ``RBELinear`` for an ``RBEQATLinear``: a trainable float
``weight`` (the latent weight, started from the decoded codes or from the original float
weights) next to frozen codes. The forward pass uses the decoded codes, and the gradient
reaches the latent weight unchanged (straight-through):

    w_eff = latent + stopgrad(decode(codes) - latent)      # value: decode(codes); d/d latent: 1

The codes are refreshed from the latent weight by ``reencode`` (every ``reencode_every``
optimizer steps with ``ReencodeCallback``), so training sees the quantizer it will be
frozen with. ``freeze(model)`` re-encodes once more and puts plain ``RBELinear`` layers back,
ready for ``save_pretrained``. ``RBEConfig(qat=True)`` makes the quantizer call
``prepare_qat`` after loading and tells ``Trainer`` the model is trainable without PEFT.
"""

from __future__ import annotations

import logging
import time

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import Trainer, TrainerCallback

from .modules import RBELinear, link_shared_tables

logger = logging.getLogger(__name__)


class RBEQATLinear(nn.Linear):
    """A Linear trained through RBE codes: latent float ``weight`` + frozen ``codes`` (an RBELinear)."""

    def __init__(self, codes: RBELinear, latent: torch.Tensor | None = None) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = codes.in_features, codes.out_features
        self.codes = codes
        init = codes.dequantize(torch.float32) if latent is None else latent.detach().float()
        self.weight = nn.Parameter(init.to(codes.compute_dtype).clone())
        self.bias = codes.bias
        if self.bias is not None:
            self.bias.requires_grad_(True)
        codes.bias = None  # the bias lives here while training

    def _decoded(self) -> torch.Tensor:
        """``codes.dequantize()``, decoded again only when the codes change (re-encoding,
        ``load_state_dict`` or a device move), not on every forward pass."""
        stored = [*self.codes.parameters(), *self.codes.buffers()]  # buffers: linked shared tables, signs
        key = tuple((t.data_ptr(), t._version) for t in stored) + (self.weight.dtype,)
        if getattr(self, "_cache_key", None) != key:
            self._cache = self.codes.dequantize(self.weight.dtype)
            self._cache_key = key
        return self._cache

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = straight_through(self.weight, self._decoded())
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    @torch.no_grad()
    def reencode(self) -> None:
        """Encode the current latent weight into the codes (same spec, table and rotation seed)."""
        self.codes.load_packed(self.codes.encode(self.weight.detach().float()))

    def to_rbe(self) -> RBELinear:
        self.reencode()
        self.codes.bias = self.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)
        return self.codes


def straight_through(latent: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
    """``quantized`` in the forward pass, identity gradient to ``latent`` in the backward pass."""
    return latent + (quantized - latent).detach()


def prepare_qat(model: nn.Module, latent_from: nn.Module | None = None) -> nn.Module:
    """Swap every ``RBELinear`` of ``model`` for an ``RBEQATLinear`` (in place; QAT layers stay).

    ``latent_from``: an unquantized copy of the model whose float weights start the latent
    weights (better than the decoded codes: nothing is lost before training starts).
    """
    source = dict(latent_from.named_modules()) if latent_from is not None else {}
    for name, module in list(model.named_modules()):
        if not isinstance(module, (RBELinear, RBEQATLinear)) or name.endswith(".codes"):
            continue
        src = source.get(name)
        latent = src.weight if src is not None and hasattr(src, "weight") else None
        codes = module.codes if isinstance(module, RBEQATLinear) else module
        if latent is not None and getattr(codes, "from_conv1d", False):
            latent = latent.T
        if isinstance(module, RBEQATLinear):  # already in QAT mode: only restart the latent weight
            if latent is not None:
                with torch.no_grad():
                    module.weight.copy_(latent)
        else:
            model.set_submodule(name, RBEQATLinear(module, latent))
    return model


@torch.no_grad()
def reencode(model: nn.Module, progress: bool = False) -> int:
    layers = [m for m in model.modules() if isinstance(m, RBEQATLinear)]
    for layer in tqdm(layers, desc="re-encoding", unit="layer", disable=not progress):
        layer.reencode()
    return len(layers)


def freeze(model: nn.Module) -> nn.Module:
    """Re-encode every QAT layer and put packed ``RBELinear`` layers back (for saving)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, RBEQATLinear):
            model.set_submodule(name, module.to_rbe())
    link_shared_tables(model)
    return model


class ReencodeCallback(TrainerCallback):
    """Refresh the codes from the latent weights every ``every`` optimizer steps."""

    def __init__(self, every: int = 10) -> None:
        self.every = every

    def on_step_end(self, args, state, control, model=None, **kwargs):  # type: ignore[no-untyped-def]
        if model is not None and state.global_step % self.every == 0:
            logger.info("re-encoded %d layers at step %d", reencode(model), state.global_step)
        return control


class TimeBudgetCallback(TrainerCallback):
    """Stop training once ``minutes`` of wall time have passed (budgets are stated in minutes)."""

    def __init__(self, minutes: float) -> None:
        self.seconds = minutes * 60
        self.start: float | None = None

    def on_train_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        self.start = time.perf_counter()
        return control

    def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if self.start is not None and time.perf_counter() - self.start > self.seconds:
            control.should_training_stop = True
        return control


class DistillTrainer(Trainer):
    """``Trainer`` whose loss adds KL(teacher || student) on the logits (temperature ``T``)."""

    def __init__(self, *args, teacher: nn.Module, alpha: float = 0.5, temperature: float = 1.0, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.alpha, self.temperature = alpha, temperature

    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):  # type: ignore[no-untyped-def, override]
        out = model(**inputs)
        with torch.no_grad():
            t_logits = self.teacher(**{k: v for k, v in inputs.items() if k != "labels"}).logits
        t = self.temperature
        kd = F.kl_div(F.log_softmax(out.logits / t, -1), F.log_softmax(t_logits / t, -1), log_target=True,
                      reduction="batchmean") * t * t / out.logits.shape[1]
        loss = (1 - self.alpha) * out.loss + self.alpha * kd
        return (loss, out) if return_outputs else loss


__all__ = ["DistillTrainer", "RBEQATLinear", "ReencodeCallback", "TimeBudgetCallback", "freeze", "prepare_qat", "reencode",
           "straight_through"]
