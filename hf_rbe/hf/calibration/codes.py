"""Code steps: moving a calibrated block's discrete codes where the gradient of its loss points.

Calibration chooses every code once (LDLQ) and then trains continuous parameters only. A code
step moves codes as well (PV-tuning's idea, on the block loss the per-block fine-tune uses):

1. the gradient ``G`` of the block loss over every calibration window with respect to each RBE
   layer's weight in its rotated basis (summed by ``core.scale_tuning``'s backward pass, which
   keeps no decoder intermediates);
2. per layer, a target: the weight moved along ``-G H^-1`` (a Newton direction under the
   layer's input Hessian ``H``), scaled so that its RMS move is ``kappa`` times the RMS scale of
   the layer's finest stage (one codeword step there, roughly);
3. the target encoded again stage by stage with LDLQ against ``H``, the other stages' codes and
   every scale fixed (``core.ldlq.reencode_stages``: the current weight gives back the current
   codes, so small steps change few codes);
4. the block loss over every window measured for each ``kappa`` of :data:`STEP_SIZES`; the best
   codes are kept only when their loss is lower than before the step. A step never raises the
   loss it measures.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ...core.ldlq import reencode_stages, upper_inverse_cholesky
from ...core.ops import reference_only
from ...core.rbe_linear import RBELinear
from ...core.scale_tuning import tuned_scales
from .capture import Call, find_blocks, hidden, run_block, with_hidden
from .finetune import EndToEndLoss, checkpointed, relative_error

logger = logging.getLogger(__name__)

#: ``kappa``: the target's RMS move in RMS scales of a layer's finest stage, tried in turn.
STEP_SIZES = (0.02, 0.05, 0.1, 0.25)
_TINY = 1e-30


@torch.no_grad()
def block_loss(block: nn.Module, calls: list[Call], targets: list[torch.Tensor]) -> float:
    """The block's calibration loss over every window: the mean of :func:`relative_error`."""
    return sum(float(relative_error(run_block(block, c), t)) for c, t in zip(calls, targets)) / len(calls)


def rotated_gradients(module: nn.Module, layers: dict[str, RBELinear], accumulate: Callable[[], None],
                      frozen: frozenset[int] = frozenset()) -> dict[str, torch.Tensor]:
    """``dL/dW_rot`` of each of ``layers`` (fp32 [out, in]) summed over the backward passes that
    ``accumulate()`` runs on ``module``, whose parameters collect no gradients meanwhile."""
    was = {id(p): p.requires_grad for p in module.parameters()}
    try:
        for p in module.parameters():
            p.requires_grad_(False)
        with tuned_scales(module, frozen, gradients=True) as scales:
            for s in scales:
                s.requires_grad_(False)
            accumulate()
            return {n: layer.rotated_grad.clone() for n, layer in layers.items()}  # type: ignore[union-attr]
    finally:
        for p in module.parameters():
            p.requires_grad_(was[id(p)])


def stored_codes(layer: RBELinear) -> dict[str, torch.Tensor]:
    """A copy of the layer's stored code tensors, by name."""
    stages = layer.codec.stage_quantizers(layer.spec, layer.tables())
    return {q.prefix + "weight": getattr(layer, q.prefix + "weight").detach().clone() for q in stages}


def load_codes(layer: RBELinear, codes: dict[str, torch.Tensor]) -> None:
    """Put code tensors (by name, as :func:`stored_codes` gives them) into the layer in place."""
    for name, t in codes.items():
        getattr(layer, name).data.copy_(t)


def hessian_factor(layer: RBELinear, hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """``upper_inverse_cholesky`` of the layer's rotated Hessian, damped ten times more at each
    try where it is not positive-definite (a Hessian kept in fp16 can lose that)."""
    for tries in range(2):
        try:
            return upper_inverse_cholesky(layer.rotated_hessian(hessian, damp * 10**tries))
        except torch.linalg.LinAlgError:
            pass
    return upper_inverse_cholesky(layer.rotated_hessian(hessian, damp * 100))


@torch.no_grad()
def reencoded(layer: RBELinear, u_factor: torch.Tensor, target: torch.Tensor,
              scales: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The layer's stored code tensors chosen again for a rotated ``target`` [out, in]: each stage in
    turn by LDLQ against ``u_factor``, the other stages' codes and every scale fixed
    (``core.ldlq.reencode_stages``); ``scales``: values to use instead of stored ones, by name."""
    stages = layer.codec.stage_quantizers(layer.spec, layer.tables())
    given = scales or {}
    fixed = [given.get(q.prefix + "scale", getattr(layer, q.prefix + "scale")).detach() for q in stages]
    zeros = {q.prefix + "scale": torch.zeros_like(s) for q, s in zip(stages, fixed)}
    units = [layer.decode_rotated({**zeros, q.prefix + "scale": torch.ones_like(s)}) for q, s in zip(stages, fixed)]
    codes, _ = reencode_stages(target, u_factor, stages, units, fixed)
    return {q.prefix + "weight": q.pack(c) for q, c in zip(stages, codes)}


def changed_fraction(before: dict[str, dict[str, torch.Tensor]], after: dict[str, dict[str, torch.Tensor]]) -> float:
    """The fraction of stored codes that differ between two sets of :func:`stored_codes` (by layer name)."""
    total = sum(t.numel() for codes in before.values() for t in codes.values())
    moved = sum(int((t != after[n][k]).sum()) for n, codes in before.items() for k, t in codes.items())
    return moved / max(total, 1)


@torch.no_grad()
def moved_codes(layer: RBELinear, hessian: torch.Tensor, grad: torch.Tensor, damp: float,
                kappa: float) -> dict[str, torch.Tensor]:
    """The layer's stored codes chosen again (steps 2 and 3 of the module docstring) for its
    rotated weight moved ``kappa`` RMS finest-stage scales along ``-G H^-1``. Computed one layer at
    a time, so that a step holds one layer's factors and codewords besides the gradients."""
    u = hessian_factor(layer, hessian.to(grad.device), damp)
    direction = (grad @ u.T) @ u  # G H^-1, with H^-1 = U^T U
    last = layer.codec.stage_quantizers(layer.spec, layer.tables())[-1]
    finest = getattr(layer, last.prefix + "scale").detach().float().pow(2).mean().sqrt()
    target = layer.decode_rotated() - direction * (kappa * finest / direction.pow(2).mean().sqrt().clamp_min(_TINY))
    return reencoded(layer, u, target)


@dataclass(frozen=True)
class CodeStep:
    """What one code step measured: the block loss before and after, the step size kept (``None``:
    no step lowered the loss, nothing changed) and the fraction of codes it changed."""

    before: float
    after: float
    kappa: float | None
    changed: float


@reference_only()  # kept or not by losses a few bits apart: no kernel may decide (ops.reference_only)
def code_step(module: nn.Module, layers: dict[str, RBELinear], hessians: dict[str, torch.Tensor],
              measure: Callable[[], float], accumulate: Callable[[], None], damp: float,
              frozen: frozenset[int] = frozenset()) -> CodeStep:
    """One code step (module docstring) on ``layers`` (by name) of ``module``, each with the input
    Hessian it was calibrated with (``hessians``, by name): ``measure()`` returns the loss,
    ``accumulate()`` runs its backward passes; ``frozen``: ``id`` of layers that must not change."""
    before = measure()
    grads = rotated_gradients(module, layers, accumulate, frozen)
    start = {n: stored_codes(layer) for n, layer in layers.items()}
    best: tuple[float, float | None, dict[str, dict[str, torch.Tensor]]] = (before, None, start)
    with torch.no_grad():
        for kappa in STEP_SIZES:
            tried = {}
            for n, layer in layers.items():
                load_codes(layer, start[n])  # every step size moves from the same codes
                tried[n] = moved_codes(layer, hessians[n], grads[n], damp, kappa)
                load_codes(layer, tried[n])
            loss = measure()
            logger.debug("code step, kappa %g: loss %.4g -> %.4g", kappa, before, loss)
            if loss < best[0]:
                best = (loss, kappa, tried)
        for n, layer in layers.items():
            load_codes(layer, best[2][n])
    return CodeStep(before, best[0], best[1], changed_fraction(start, best[2]))


def block_code_step(block: nn.Module, layers: dict[str, RBELinear], hessians: dict[str, torch.Tensor],
                    calls: list[Call], targets: list[torch.Tensor], damp: float) -> CodeStep:
    """A code step on the block loss: the quantized path's ``calls`` against the full-precision
    block's outputs ``targets``."""
    def accumulate() -> None:
        with torch.enable_grad():
            for call, target in zip(calls, targets):
                (relative_error(run_block(block, call), target) / len(calls)).backward()

    with _input_requires_grad(block):
        return code_step(block, layers, hessians, lambda: block_loss(block, calls, targets), accumulate, damp)


def model_code_step(model: nn.Module, layers: dict[str, RBELinear], hessians: dict[str, torch.Tensor],
                    windows: list[torch.Tensor], teacher: list[torch.Tensor], damp: float,
                    teacher_head: nn.Module | None = None) -> CodeStep:
    """A code step on the end-to-end loss (``finetune.EndToEndLoss``) over ``windows`` against the
    full-precision model's ``teacher`` features; blocks recompute their activations in the
    backward pass, as in the end-to-end fine-tune."""
    loss = EndToEndLoss(model, teacher_head)

    def measure() -> float:
        return sum(loss(w, t, backward=False) for w, t in zip(windows, teacher)) / len(windows)

    def accumulate() -> None:
        for w, t in zip(windows, teacher):
            loss(w, t)  # the sum over windows: the step is scaled to the finest stage anyway

    blocks = find_blocks(model)[1]
    with _input_requires_grad(blocks[0]), checkpointed(blocks):
        return code_step(model, layers, hessians, measure, accumulate, damp, loss.frozen)


@contextlib.contextmanager
def _input_requires_grad(block: nn.Module) -> Iterator[None]:
    """The block's hidden-state input as a leaf that requires grad: with every parameter frozen,
    the layers' backward passes (which sum the gradients) run only from there."""
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> Call:
        return with_hidden((args, kwargs), hidden((args, kwargs)).detach().requires_grad_())

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
