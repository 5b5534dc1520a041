"""The Fisher pass: how much the model's output depends on each layer's output, token by token.

One forward and backward pass of the full-precision model on the calibration windows. A
language model backpropagates next-token labels sampled from its own distribution, an encoder
random Gaussian projections of its last hidden states; both make ``E[g g^T]`` the curvature of
the output error at the full-precision model. Each token's mean squared output gradient
(normalised to mean 1 per layer) then weighs it in the layer's Hessian, so the output error
``|dW x_t|^2`` counts as much as it moves the model's output: tokens the model leans on (an
encoder's ``[CLS]`` attention sink, whose value vectors every token reads) are encoded most
exactly. The same pass measures each layer's sensitivity for bit allocation (``allocate``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..replace import float_weight
from .capture import features, logits, output_head


@dataclass
class Fisher:
    """What one forward and backward pass of the full-precision model says about each layer."""

    weights: dict[str, list[torch.Tensor]]  # per batch: [batch, seq] mean squared output gradient per token
    sensitivity: dict[str, float]  # ``s_l`` of ``allocate``'s docstring
    features: list[torch.Tensor]  # per batch with ``keep_features``: ``capture.features`` (the e2e teacher)


def _watch(name: str, module: nn.Module, weights: dict[str, list[torch.Tensor]], sums: dict[str, float]) -> Any:
    """A forward hook that, in the backward pass, records the layer's per-token squared output
    gradients and adds its sensitivity term."""
    w = float_weight(module).float()
    rows = w.pow(2).sum(1) / w.shape[1]

    def forward(mod: nn.Module, args: tuple, out: torch.Tensor) -> None:
        x = args[0].detach().float()
        inputs = x.pow(2).sum(-1) / x.shape[-1]

        def backward(g: torch.Tensor) -> None:
            g2 = g.detach().float().pow(2)
            weights[name].append(g2.mean(-1))
            sums[name] += float((g2 @ rows * inputs).sum())

        out.register_hook(backward)
    return forward


@torch.enable_grad()
def fisher(model: nn.Module, layers: dict[str, nn.Module], batches: list[torch.Tensor], seed: int = 0,
           keep_features: bool = False) -> Fisher:
    """The Fisher pass over ``batches`` (module docstring) for ``layers`` (name -> float module).
    The model's parameters and their ``requires_grad`` are left as they were."""
    head = output_head(model)
    weights: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
    sums = dict.fromkeys(layers, 0.0)
    seen: list[torch.Tensor] = []
    # Gradients flow from the embedding output only: the weights' own gradients are not needed.
    grads = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    handles = [model.get_input_embeddings().register_forward_hook(lambda m, a, out: out.detach().requires_grad_())]
    handles += [m.register_forward_hook(_watch(n, m, weights, sums)) for n, m in layers.items()]
    g = torch.Generator(device=batches[0].device).manual_seed(seed)
    try:
        for ids in tqdm(batches, desc="RBE-measuring output sensitivity", unit="batch"):
            out = features(model, ids)
            if keep_features:
                seen.append(out.detach())
            h = out.float()
            if head is not None:  # through the head's own forward when its hooks measure it
                scores = head(out).float().flatten(0, -2) if head in layers.values() else logits(head, h)
                with torch.no_grad():
                    labels = torch.multinomial(scores.softmax(-1), 1, generator=g)[:, 0]
                loss = F.cross_entropy(scores, labels, reduction="sum")
            else:
                loss = (h * torch.randn(h.shape, generator=g, device=h.device)).sum()
            loss.backward()
    finally:
        for handle in handles:
            handle.remove()
        for p in model.parameters():
            p.requires_grad_(grads[id(p)])
    for name, per_batch in weights.items():
        if len(per_batch) != len(batches):  # a layer the loss does not reach (a pooler) stays unweighted
            weights[name] = []
            continue
        mean = torch.cat([w.flatten() for w in per_batch]).mean().clamp_min(1e-30)
        weights[name] = [w / mean for w in per_batch]
    return Fisher({n: w for n, w in weights.items() if w}, sums, seen)
