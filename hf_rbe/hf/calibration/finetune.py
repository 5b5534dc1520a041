"""Fine-tuning a calibrated model's continuous parameters with its codes fixed.

What trains: every RBE layer's scales (``core.scale_tuning``), the layers' biases and the norm
weights; what does not: codes, shared tables, and a head whose codes a tied embedding reads.
Two uses: per block, against the full-precision block's outputs on the quantized path's
inputs (:func:`finetune_block`, as AQLM and QuIP# fine-tune their continuous parameters), and
end to end, against the full-precision model's final hidden states (:func:`finetune_model`; a
language model: the KL divergence of the next-token distributions, AQLM's global fine-tune).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ...core.packed import PackedLinear
from ...core.rbe_embedding import RBEEmbedding
from ...core.rbe_linear import RBELinear
from ...core.scale_tuning import tuned_scales
from ..config import RBEConfig
from .capture import Call, features, logits, output_head, run_block

#: Fine-tuning steps (per block, end to end) when the config leaves them at ``None``: for a model
#: with an output head (docs/usage.md: measured on SmolLM2 and MiniLM); none for an encoder.
AUTO_STEPS = 32


def finetune_steps(model: nn.Module, config: RBEConfig) -> tuple[int, int]:
    """(per-block, end-to-end) fine-tuning steps of ``config`` for ``model``."""
    auto = AUTO_STEPS if output_head(model) is not None else 0
    ft, e2e = config.calibration_finetune_steps, config.calibration_e2e_steps
    return (auto if ft is None else ft), (auto if e2e is None else e2e)


def norms(module: nn.Module) -> list[nn.Module]:
    """The normalisation layers inside ``module`` (the fine-tunes train their weights)."""
    return [m for m in module.modules() if "norm" in type(m).__name__.lower()]


def shared_heads(module: nn.Module) -> frozenset[int]:
    """``id`` of every coded head whose codes a tied input embedding reads: they stay frozen."""
    return frozenset(id(m.head) for m in module.modules() if isinstance(m, RBEEmbedding))


@contextlib.contextmanager
def _only(module: nn.Module, params: list[nn.Parameter]) -> Iterator[None]:
    """``requires_grad`` on ``params`` alone, put back as it was however the block ends."""
    was = {id(p): p.requires_grad for p in module.parameters()}
    try:
        for p in module.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        yield
    finally:
        for p in module.parameters():
            p.requires_grad_(was.get(id(p), False))


@torch.enable_grad()
def train_continuous(module: nn.Module, loss: Callable[[int], torch.Tensor], steps: int, lr: float,
                     progress: str | None = None) -> float:
    """Adam on ``module``'s continuous parameters (module docstring) for ``steps`` steps of
    ``loss(step)``; the trained scales go into the stored ones at the end. ``progress``: a
    progress bar's title (``None``: no bar). Returns the last loss."""
    frozen = shared_heads(module)
    layers = [m for m in module.modules() if isinstance(m, RBELinear) and id(m) not in frozen]
    params = [m.bias for m in layers if m.bias is not None]
    params += [p for m in norms(module) for p in m.parameters(recurse=False)]
    err = 0.0
    with tuned_scales(module, frozen) as scales, _only(module, params):
        # Adam steps on fp32 master copies: in a half-precision model its second moments underflow
        # and its updates become inf (fp16) or vanish (bf16). The tuned scales are fp32 already.
        masters = [p.detach().float().requires_grad_(True) for p in params]
        opt = torch.optim.Adam([*scales, *masters], lr=lr)
        for step in tqdm(range(steps), desc=progress, unit="step", disable=progress is None):
            value = loss(step)
            value.backward()
            for p, m in zip(params, masters):
                m.grad = None if p.grad is None else p.grad.float()
                p.grad = None
            opt.step()
            opt.zero_grad(set_to_none=True)
            with torch.no_grad():
                for p, m in zip(params, masters):
                    p.copy_(m)
            err = float(value.detach())
    return err


def finetune_block(block: nn.Module, calls: list[Call], targets: list[torch.Tensor], steps: int, lr: float) -> float:
    """Train the block so that, on its quantized-path inputs ``calls``, it reproduces the
    full-precision activations ``targets`` at its output. Returns the final relative error."""
    def loss(step: int) -> torch.Tensor:
        j = step % len(calls)
        out, tgt = run_block(block, calls[j]).float(), targets[j].float()
        return (out - tgt).pow(2).mean() / tgt.pow(2).mean().clamp_min(1e-30)

    return train_continuous(block, loss, steps, lr)


def finetune_model(model: nn.Module, batches: list[torch.Tensor], teacher: list[torch.Tensor], steps: int,
                   lr: float, teacher_head: nn.Module | None = None) -> float:
    """End-to-end fine-tune of the quantized ``model`` against the full-precision model's
    ``capture.features`` (``teacher``, one per batch): for a language model the KL divergence of
    the next-token distributions (the student's through the model's head, the teacher's through
    ``teacher_head``, the full-precision head when the model's is coded; default: the model's),
    otherwise the relative squared error. Returns the final loss."""
    teacher_head = teacher_head if teacher_head is not None else output_head(model)
    frozen = shared_heads(model)
    decoded: dict[int, nn.Linear] = {}  # a frozen coded head, decoded once instead of on every pass

    def loss(step: int) -> torch.Tensor:
        j = step % len(batches)
        out, tgt = features(model, batches[j]), teacher[j].float()
        head = output_head(model)
        if head is None:
            return (out.float() - tgt).pow(2).mean() / tgt.pow(2).mean().clamp_min(1e-30)
        if isinstance(head, PackedLinear) and id(head) in frozen:
            head = decoded.setdefault(id(head), head.to_linear().requires_grad_(False))
        student = torch.log_softmax(logits(head, out), -1)
        with torch.no_grad():
            target = torch.log_softmax(logits(teacher_head, tgt), -1)
        return F.kl_div(student, target, log_target=True, reduction="batchmean")

    return train_continuous(model, loss, steps, lr, progress="RBE fine-tuning end to end")
