"""Straight-through latent weights: end-to-end training that moves a calibrated model's codes.

The other way to move codes after calibration (``codes`` is the first): quantization-aware
training with a straight-through estimator, started from the calibrated codes. Each RBE layer
gets an fp32 latent weight in its rotated basis: what its codes decode to at the current scales,
plus an offset that starts at zero. The end-to-end fine-tune (``finetune``) runs as usual on
scales, biases and norms; after each of its steps every offset also takes an Adam step along
``dL/dW_rot`` at the current codes (the forward pass computes with the codes; the gradient
reaches the latent weight as if the quantizer were the identity). Every ``reencode_every`` steps
the latent weights are encoded again, stage by stage with LDLQ against the layer's calibration
Hessian and the current scales (``core.ldlq.reencode_stages``, as a code step encodes its target:
an unmoved latent weight gives its codes back). The new codes are kept only where the end-to-end
loss over the windows falls, so a re-encoding never raises the loss it measures; a kept one leaves
the latent weights where they were (the offsets take the rounding), a refused one leaves the
offsets to grow until codes follow them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from ...core.ops import reference_only
from ...core.rbe_linear import RBELinear
from .capture import find_blocks
from .codes import changed_fraction, hessian_factor, load_codes, reencoded, stored_codes
from .finetune import EndToEndLoss, checkpointed, train_continuous

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Reencoding:
    """One re-encoding: after which step, the end-to-end loss over the windows before it and with
    the new codes, and the fraction of stored codes the new codes changed. Kept when ``tried`` is
    lower than ``before``."""

    step: int
    before: float
    tried: float
    changed: float

    @property
    def kept(self) -> bool:
        return self.tried < self.before


@dataclass(frozen=True)
class LatentRun:
    """What a latent fine-tune did: its re-encodings in order, and the fraction of stored codes
    that differ from the start at the end."""

    reencodings: tuple[Reencoding, ...]
    changed: float

    @property
    def kept(self) -> int:
        return sum(r.kept for r in self.reencodings)


def _decoded(layer: RBELinear) -> torch.Tensor:
    """The layer's rotated weight at its current scales (the tuned ones inside ``tuned_scales``)."""
    return layer.decode_rotated({n: p.detach() for n, p in (layer.tuned_scales or {}).items()})


@reference_only()  # kept or not by losses a few bits apart: no kernel may decide (ops.reference_only)
def latent_finetune(model: nn.Module, layers: dict[str, RBELinear], hessians: dict[str, torch.Tensor],
                    windows: list[torch.Tensor], teacher: list[torch.Tensor], steps: int, lr: float,
                    latent_lr: float, reencode_every: int, damp: float,
                    teacher_head: nn.Module | None = None) -> LatentRun:
    """``steps`` end-to-end fine-tuning steps (``finetune.finetune_model``: one of ``windows`` a step
    against the full-precision ``teacher`` features, Adam at ``lr``) with straight-through latent
    weights for ``layers`` (by name, each with the input Hessian it was calibrated with,
    ``hessians``) trained at ``latent_lr`` and encoded again every ``reencode_every`` steps (module
    docstring). A coded head that a tied embedding reads is left as it is."""
    if reencode_every < 1:
        raise ValueError(f"reencode_every must be >= 1, got {reencode_every}")
    loss = EndToEndLoss(model, teacher_head)
    layers = {n: m for n, m in layers.items() if id(m) not in loss.frozen}
    factors = {n: hessian_factor(m, hessians[n].to(m.weight.device), damp) for n, m in layers.items()}
    # The latent weight is held as its offset from what the codes decode to at the current scales, so
    # that it follows the scales as they train: an unmoved latent weight always gives its codes back.
    offsets = {n: torch.zeros(m.out_features, m.in_features, device=m.weight.device) for n, m in layers.items()}
    opt = torch.optim.Adam(list(offsets.values()), lr=latent_lr)
    done: list[Reencoding] = []

    def current() -> dict[str, dict[str, torch.Tensor]]:
        return {n: stored_codes(m) for n, m in layers.items()}

    def measure() -> float:
        return sum(loss(w, t, backward=False) for w, t in zip(windows, teacher)) / len(windows)

    def after_step(step: int) -> None:
        for n, m in layers.items():
            offsets[n].grad = m.rotated_grad
        opt.step()
        for t in offsets.values():
            t.grad = None
        if (step + 1) % reencode_every:
            return
        before = measure()
        old = current()
        left = {}
        with torch.no_grad():
            for n, m in layers.items():
                target = _decoded(m) + offsets[n]
                load_codes(m, reencoded(m, factors[n], target, m.tuned_scales))
                left[n] = target - _decoded(m)  # the latent weight stays where it was
        r = Reencoding(step + 1, before, measure(), changed_fraction(old, current()))
        logger.info("latent re-encoding after step %d: %.2f%% of codes, loss %.5g -> %.5g (%s)", r.step,
                    100 * r.changed, r.before, r.tried, "kept" if r.kept else "refused")
        if r.kept:
            for n in layers:
                offsets[n].copy_(left[n])
        else:
            for n, m in layers.items():
                load_codes(m, old[n])
        done.append(r)

    start = current()
    with checkpointed(find_blocks(model)[1]):
        train_continuous(model, lambda step: loss(windows[step % len(windows)], teacher[step % len(windows)]),
                         steps, lr, progress="RBE latent fine-tuning", after_step=after_step)
    return LatentRun(tuple(done), changed_fraction(start, current()))
