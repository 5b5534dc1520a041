"""The Fisher pass: how much the model's output depends on each layer's output, token by token.

One forward and backward pass of the full-precision model on the calibration windows. A
language model backpropagates next-token labels sampled from its own distribution, an encoder
random Gaussian projections of its last hidden states; both make ``E[g g^T]`` the curvature of
the output error at the full-precision model. Each token's mean squared output gradient
(normalised to mean 1 per layer) then weighs it in the layer's Hessian, so the output error
``|dW x_t|^2`` counts as much as it moves the model's output: tokens the model leans on (an
encoder's ``[CLS]`` attention sink, whose value vectors every token reads) are encoded most
exactly. The same pass measures each layer's sensitivity for bit allocation (``allocate``).

The pass runs block by block, so that one block's float weights are in memory at a time: forward
through every block over all batches (each block's inputs written to a temporary directory),
the loss at the head, then backward from the last block to the first, each block brought in again
and re-run on its stored inputs.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from ..replace import float_weight
from .capture import (
    calls_to,
    features,
    find_blocks,
    first_block_inputs,
    hidden,
    logits,
    output_head,
    replayed,
    with_hidden,
)
from .weights import BlockWeights, storage_device


@dataclass
class Fisher:
    """What one forward and backward pass of the full-precision model says about each layer."""

    weights: dict[str, list[torch.Tensor]]  # per batch: [batch, seq] mean squared output gradient per token
    sensitivity: dict[str, float]  # ``s_l`` of ``allocate``'s docstring


class _Watch:
    """Forward hooks on some layers that, in the backward pass, record each layer's per-token squared
    output gradients and add up its sensitivity term."""

    def __init__(self, layers: dict[str, nn.Module], weights: dict[str, list[torch.Tensor]],
                 sums: dict[str, float]) -> None:
        self.handles = [m.register_forward_hook(self._hook(n, m, weights, sums)) for n, m in layers.items()]

    @staticmethod
    def _hook(name: str, module: nn.Module, weights: dict[str, list[torch.Tensor]], sums: dict[str, float]) -> Any:
        w = float_weight(module).float()
        rows = w.pow(2).sum(1) / w.shape[1]

        def forward(mod: nn.Module, args: tuple, out: torch.Tensor) -> None:
            x = args[0].detach().float()
            inputs = x.pow(2).sum(-1) / x.shape[-1]

            def backward(g: torch.Tensor) -> None:
                g2 = g.detach().float().pow(2)
                weights[name].append(g2.mean(-1).cpu())
                sums[name] += float((g2 @ rows * inputs).sum())

            out.register_hook(backward)
        return forward

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


@torch.enable_grad()
def fisher(model: nn.Module, layers: Iterable[str], batches: list[torch.Tensor], seed: int = 0,
           weights: BlockWeights | None = None, device: torch.device | None = None) -> Fisher:
    """The Fisher pass over ``batches`` (module docstring) for the layers named ``layers``; blocks come
    and go through ``weights`` (default: the model's own), computed on ``device`` (default: where the
    model is). The model's parameters and their ``requires_grad`` are left as they were."""
    layers = list(layers)
    prefix, blocks = find_blocks(model)
    weights = weights or BlockWeights(storage_device(model))
    device = device or weights.storage
    per_token: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
    sums = dict.fromkeys(layers, 0.0)
    grads = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)  # gradients are needed at the layers' outputs, not for the weights
    try:
        calls = first_block_inputs(model, blocks[0], batches)
        with tempfile.TemporaryDirectory(prefix="rbe-fisher-") as tmp:
            returns_tuple, last = _forward(blocks, prefix, calls, weights, device, Path(tmp))
            g = _head_gradients(model, blocks, layers, batches, last, returns_tuple, per_token, sums, seed)
            for i in tqdm(reversed(range(len(blocks))), desc="RBE-measuring output sensitivity", unit="block",
                          total=len(blocks)):
                g = _backward(model, i, blocks[i], f"{prefix}.{i}", calls, g, layers, weights, device, Path(tmp),
                              per_token, sums)
    finally:
        for p in model.parameters():
            p.requires_grad_(grads[id(p)])
    for name, per_batch in per_token.items():
        if len(per_batch) != len(batches):  # a layer the loss does not reach (a pooler) stays unweighted
            per_token[name] = []
            continue
        mean = torch.cat([w.flatten() for w in per_batch]).mean().clamp_min(1e-30)
        per_token[name] = [(w / mean).to(batches[0].device) for w in per_batch]
    return Fisher({n: w for n, w in per_token.items() if w}, sums)


@torch.no_grad()
def _forward(blocks: nn.ModuleList, prefix: str, calls: list, weights: BlockWeights, device: torch.device,
             tmp: Path) -> tuple[bool, list[torch.Tensor]]:
    """Every block over all batches, each block's inputs saved; returns whether blocks return tuples
    and the last block's outputs."""
    hs = [hidden(c) for c in calls]
    returns_tuple = False
    for i, block in enumerate(blocks):
        save_file({str(j): h.cpu().contiguous() for j, h in enumerate(hs)}, str(tmp / f"{i}.safetensors"))
        weights.materialize(block, f"{prefix}.{i}", device)
        out = []
        for c, h in zip(calls_to(calls, device), hs):
            args, kwargs = with_hidden(c, h.to(device))
            o = block(*args, **kwargs)
            returns_tuple = isinstance(o, tuple)
            out.append((o[0] if returns_tuple else o).to(weights.storage))
        weights.drop(block, f"{prefix}.{i}")
        hs = out
    return returns_tuple, hs


def _head_gradients(model: nn.Module, blocks: nn.ModuleList, layers: list[str], batches: list[torch.Tensor],
                    last: list[torch.Tensor], returns_tuple: bool, per_token: dict, sums: dict,
                    seed: int) -> list[torch.Tensor]:
    """The loss's gradient at the last block's output, per batch (a coded head's own weights counted)."""
    head = output_head(model)
    head_name = next((n for n in layers if head is not None and model.get_submodule(n) is head), None)
    watch = _Watch({head_name: head}, per_token, sums) if head_name else None
    g = torch.Generator(device=batches[0].device).manual_seed(seed)
    out = []
    try:
        with replayed(blocks, returns_tuple) as replays:
            for ids, h in zip(batches, last):
                h = h.detach().requires_grad_()
                replays[-1].value = h
                feats = features(model, ids)
                if head is not None:  # through the head's own forward when its hooks measure it
                    scores = head(feats).float().flatten(0, -2) if head_name else logits(head, feats.float())
                    with torch.no_grad():
                        labels = torch.multinomial(scores.softmax(-1), 1, generator=g)[:, 0]
                    loss = F.cross_entropy(scores, labels, reduction="sum")
                else:
                    f = feats.float()
                    loss = (f * torch.randn(f.shape, generator=g, device=f.device)).sum()
                loss.backward()
                out.append(h.grad.detach())
    finally:
        if watch:
            watch.close()
    return out


def _backward(model: nn.Module, i: int, block: nn.Module, prefix: str, calls: list, g: list[torch.Tensor],
              layers: list[str], weights: BlockWeights, device: torch.device, tmp: Path, per_token: dict,
              sums: dict) -> list[torch.Tensor]:
    """Block ``i`` re-run on its stored inputs with the gradients at its output; returns those at its input."""
    weights.materialize(block, prefix, device)
    inputs = load_file(str(tmp / f"{i}.safetensors"))
    watch = _Watch({n: model.get_submodule(n) for n in layers if n.startswith(prefix + ".")}, per_token, sums)
    out = []
    try:
        for j, (c, grad) in enumerate(zip(calls_to(calls, device), g)):
            h = inputs[str(j)].to(device).requires_grad_()
            args, kwargs = with_hidden(c, h)
            o = block(*args, **kwargs)
            (o[0] if isinstance(o, tuple) else o).backward(grad.to(device))
            out.append(h.grad.detach().to(weights.storage))
    finally:
        watch.close()
        weights.drop(block, prefix)
    return out
