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
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from ...core.packed import PackedLinear
from ...core.rbe_embedding import RBEEmbedding
from ...core.rbe_linear import RBELinear
from ...core.scale_tuning import tuned_scales
from ..config import RBEConfig
from .capture import Call, features, find_blocks, first_block_inputs, logits, output_head, run_block
from .heap import TrimBoundary, trim

logger = logging.getLogger(__name__)

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
def train_continuous(module: nn.Module, step_loss: Callable[[int], float], steps: int, lr: float,
                     progress: str | None = None, after_step: Callable[[int], None] | None = None) -> float:
    """Adam on ``module``'s continuous parameters (module docstring) for ``steps`` steps;
    ``step_loss(step)`` computes the loss and its gradients (``backward``) and returns its value. The
    trained scales go into the stored ones at the end. ``progress``: a progress bar's title
    (``None``: no bar). ``after_step(step)``: called after each optimizer step, with every RBE layer's
    ``rotated_grad`` holding that step's ``dL/dW_rot`` (``core.scale_tuning``; it is zeroed after the
    call), for training that also moves codes (``latent``). Returns the last loss."""
    frozen = shared_heads(module)
    layers = [m for m in module.modules() if isinstance(m, RBELinear) and id(m) not in frozen]
    params = [m.bias for m in layers if m.bias is not None]
    params += [p for m in norms(module) for p in m.parameters(recurse=False)]
    err = 0.0
    with tuned_scales(module, frozen, gradients=after_step is not None) as scales, _only(module, params):
        # Adam steps on fp32 master copies: in a half-precision model its second moments underflow
        # and its updates become inf (fp16) or vanish (bf16). The tuned scales are fp32 already.
        masters = [p.detach().float().requires_grad_(True) for p in params]
        opt = torch.optim.Adam([*scales, *masters], lr=lr)
        for step in tqdm(range(steps), desc=progress, unit="step", disable=progress is None):
            err = step_loss(step)
            for p, m in zip(params, masters):
                m.grad = None if p.grad is None else p.grad.float()
                p.grad = None
            opt.step()
            opt.zero_grad(set_to_none=True)
            with torch.no_grad():
                for p, m in zip(params, masters):
                    p.copy_(m)
            if after_step is not None:
                after_step(step)
                for layer in layers:
                    layer.rotated_grad.zero_()
            trim()  # the step's activations and decoded weights
    return err


def relative_error(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error relative to the target's mean square: the per-block calibration loss."""
    out, target = out.float(), target.float()
    return (out - target).pow(2).mean() / target.pow(2).mean().clamp_min(1e-30)


def finetune_block(block: nn.Module, calls: list[Call], targets: list[torch.Tensor], steps: int, lr: float) -> float:
    """Train the block so that, on its quantized-path inputs ``calls``, it reproduces the
    full-precision activations ``targets`` at its output. Returns the final relative error."""
    def step_loss(step: int) -> float:
        j = step % len(calls)
        loss = relative_error(run_block(block, calls[j]), targets[j])
        loss.backward()
        return float(loss.detach())

    return train_continuous(block, step_loss, steps, lr)


#: Tokens per chunk of the end-to-end loss: logits over a 49k-262k vocabulary are built for this many
#: tokens at a time, never for the whole window.
LOSS_CHUNK = 32


class _Checkpointed(nn.Module):
    """A block whose activations are recomputed in the backward pass instead of kept (the end-to-end
    fine-tune holds each block's input, not its internals) unless ``recompute`` is off, with the heap
    trimmed at its boundaries (``heap``)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block
        self.recompute = True

    def __getattr__(self, name: str) -> Any:  # attributes the model's loop reads (``attention_type``)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["block"], name)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        hidden_states = TrimBoundary.apply(hidden_states)
        if not self.recompute:
            return self.block(hidden_states, *args, **kwargs)
        return checkpoint(self.block, hidden_states, *args, use_reentrant=False, **kwargs)


@contextlib.contextmanager
def checkpointed(blocks: nn.ModuleList) -> Iterator[list[_Checkpointed]]:
    """Every block of ``blocks`` recomputed in the backward pass while the context lasts; yields
    the wrappers (``keep_activations`` turns recomputation off for some)."""
    originals = list(blocks)
    try:
        for i, b in enumerate(originals):
            blocks[i] = _Checkpointed(b)
        yield list(blocks)
    finally:
        for i, b in enumerate(originals):
            blocks[i] = b


def activation_bytes(block: nn.Module, call: Call) -> int:
    """Bytes autograd keeps for the backward pass of one run of ``block`` on ``call``, with the
    parameters' ``requires_grad`` as they are (storage shared by several saved tensors counted once)."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run_block(block, call)
    return sum(storages.values())


def keep_activations(model: nn.Module, wrappers: list[_Checkpointed], window: torch.Tensor, budget: int) -> int:
    """Turn recomputation off for as many blocks as one window's activations of them fit in
    ``budget`` bytes (from the first block on), measured on the first block with ``window``; returns
    how many. Keeping a block's activations computes the same gradients without that block's
    second forward pass."""
    if budget <= 0 or not wrappers:
        return 0
    call = first_block_inputs(model, wrappers[0], [window])[0]
    per_block = max(1, activation_bytes(wrappers[0].block, call))
    keep = min(len(wrappers), budget // per_block)
    for w in wrappers[:keep]:
        w.recompute = False
    logger.info("end-to-end fine-tune: activations of %d of %d blocks kept (%.0f MiB a block), the rest recomputed",
                keep, len(wrappers), per_block / 2**20)
    return keep


def _fp32(head: nn.Module, cache: dict[int, nn.Module]) -> nn.Module:
    """A frozen head that multiplies in fp32: a coded one as it is, a float one in fp32 (itself when it
    is already; else a copy made once and kept in ``cache``), so that no chunk casts the weight again."""
    if isinstance(head, PackedLinear) or head.weight.dtype == torch.float32:
        return head
    if id(head) not in cache:
        b = None if getattr(head, "bias", None) is None else head.bias.detach().float()
        copy = nn.Linear(head.weight.shape[1], head.weight.shape[0], bias=b is not None, device="meta")
        copy.weight = nn.Parameter(head.weight.detach().float(), requires_grad=False)
        if b is not None:
            copy.bias = nn.Parameter(b, requires_grad=False)
        cache[id(head)] = copy
    return cache[id(head)]


class EndToEndLoss:
    """The end-to-end loss of one window against the full-precision model's ``capture.features``
    (``teacher``): for a language model the KL divergence of the next-token distributions (the
    student's through the model's head, the teacher's through ``teacher_head``, the
    full-precision head when the model's is coded; default: the model's), otherwise the relative
    squared error. The KL is taken ``LOSS_CHUNK`` tokens at a time, so memory holds one chunk's
    logits; a call with ``backward`` also computes the gradients."""

    def __init__(self, model: nn.Module, teacher_head: nn.Module | None = None) -> None:
        self.model = model
        self.teacher_head = teacher_head if teacher_head is not None else output_head(model)
        self.frozen = shared_heads(model)
        self.decoded: dict[int, nn.Module] = {}  # frozen heads decoded or cast to fp32 once, not on every chunk

    def __call__(self, window: torch.Tensor, teacher: torch.Tensor, backward: bool = True) -> float:
        with torch.enable_grad() if backward else torch.no_grad():
            return self._loss(window, teacher, backward)

    def _loss(self, window: torch.Tensor, teacher: torch.Tensor, backward: bool) -> float:
        out, tgt = features(self.model, window), teacher.to(window.device).float()
        head = output_head(self.model)
        if head is None:
            loss = (out.float() - tgt).pow(2).mean() / tgt.pow(2).mean().clamp_min(1e-30)
            if backward:
                loss.backward()
            return float(loss.detach())
        if isinstance(head, PackedLinear) and id(head) in self.frozen:
            if id(head) not in self.decoded:  # decoded on the first call only
                self.decoded[id(head)] = head.to_linear().requires_grad_(False)
            head = self.decoded[id(head)]
        student_head, t_head = _fp32(head, self.decoded), _fp32(self.teacher_head, self.decoded)
        h = out.detach().flatten(0, -2).requires_grad_(backward)
        t = tgt.flatten(0, -2)
        total = 0.0
        for lo in range(0, h.shape[0], LOSS_CHUNK):
            student = torch.log_softmax(logits(student_head, h[lo : lo + LOSS_CHUNK]), -1)
            with torch.no_grad():
                target = torch.log_softmax(logits(t_head, t[lo : lo + LOSS_CHUNK]), -1)
            part = F.kl_div(student, target, log_target=True, reduction="sum") / h.shape[0]  # batchmean over all
            if backward:
                part.backward()
            total += float(part.detach())
        if backward:
            out.backward(h.grad.reshape(out.shape))
        return total


def finetune_model(model: nn.Module, batches: list[torch.Tensor], teacher: list[torch.Tensor], steps: int,
                   lr: float, teacher_head: nn.Module | None = None, activation_memory: int = 0) -> float:
    """End-to-end fine-tune of the quantized ``model`` against the full-precision model's
    ``capture.features`` (``teacher``, one per batch), on :class:`EndToEndLoss`. Block activations
    are kept for the backward pass as far as ``activation_memory`` bytes hold them
    (``keep_activations``) and recomputed block by block for the other blocks, so memory holds
    those, one block's internals and one chunk's logits. Returns the final loss."""
    loss = EndToEndLoss(model, teacher_head)
    with checkpointed(find_blocks(model)[1]) as wrappers:
        def step_loss(step: int) -> float:
            if step == 0:  # inside the fine-tune: what requires grad is what the steps will save
                keep_activations(model, wrappers, batches[0], activation_memory)
            return loss(batches[step % len(batches)], teacher[step % len(batches)])

        return train_continuous(model, step_loss, steps, lr, progress="RBE fine-tuning end to end")
