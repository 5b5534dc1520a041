"""Training the scales of RBE layers with their codes and tables fixed (the calibration fine-tunes).

Inside :func:`tuned_scales`, every RBE layer of a module computes with trainable fp32 copies of
its per-row (or per-group) scales, one per stage, and writes them back (rounded to the stored
fp16) when the block ends without an error. The layer stays where it is: nothing is swapped.

Why a function of its own instead of autograd through the decoder: a layer's weight is linear in
each stage's scales, ``W_rot = sum_t s_t * C_t`` (``C_t``: the stage's codewords at unit scale,
in the rotated basis), so with ``y = x W^T = (x S H) W_rot^T`` the gradients are

    dL/dx   = g W                          (W decoded again in the backward pass)
    dL/ds_t = rowsum_per_group((g^T x_rot) * C_t)

and the backward pass only needs ``x`` and the scales. Autograd through the decoder would keep
every intermediate of every layer's decode alive until the backward pass: several copies of the
whole model's weights in fp32.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .errors import EncodingError

if TYPE_CHECKING:
    from .rbe_linear import RBELinear


def scale_names(layer: RBELinear) -> list[str]:
    """The layer's stored scale tensors, one per stage (and an int/fp8 residual's)."""
    return [n for n in layer.spec.tensors(0, 0) if n.endswith("scale")]


class TunedLinear(torch.autograd.Function):
    """``x W(scales)^T + b`` with the gradients of the module docstring."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor | None, layer: RBELinear,  # type: ignore[override]
                names: tuple[str, ...], *scales: torch.Tensor) -> torch.Tensor:
        w = layer.dequantize(torch.float32, dict(zip(names, scales)))
        ctx.save_for_backward(x, *scales)
        ctx.layer, ctx.names, ctx.has_bias = layer, names, bias is not None
        return F.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        x, *scales = ctx.saved_tensors
        layer: RBELinear = ctx.layer
        overrides = dict(zip(ctx.names, scales))
        grad_x = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (g.float() @ layer.dequantize(torch.float32, overrides)).to(x.dtype)
        g2 = g.reshape(-1, g.shape[-1]).float()
        if ctx.has_bias and ctx.needs_input_grad[1]:
            grad_b = g2.sum(0)
        grads: list[torch.Tensor | None] = [None] * len(scales)
        if any(ctx.needs_input_grad[4:]) or layer.rotated_grad is not None:
            grad_rot = g2.T @ layer.rotate_input(x.reshape(-1, x.shape[-1]).float())  # dL/dW_rot [out, in]
            if layer.rotated_grad is not None:
                layer.rotated_grad += grad_rot
            zeros = {n: torch.zeros_like(s) for n, s in overrides.items()}
            for i, (name, s) in enumerate(overrides.items()):
                if ctx.needs_input_grad[4 + i]:
                    unit = layer.decode_rotated({**zeros, name: torch.ones_like(s)})  # C_t [out, in]
                    grads[i] = (grad_rot * unit).reshape(s.shape[0], s.shape[1], -1).sum(-1)
        return grad_x, grad_b, None, None, *grads


@contextlib.contextmanager
def tuned_scales(module: nn.Module, frozen: frozenset[int] = frozenset(),
                 gradients: bool = False) -> Iterator[list[nn.Parameter]]:
    """Trainable fp32 scales for every RBE layer of ``module`` (by ``id``, ``frozen`` ones excepted),
    yielded as a list of parameters; the layers compute with them until the block ends, which
    rounds the trained values into the stored fp16 scales (an error inside leaves them as they
    were; non-finite trained scales raise ``EncodingError`` and are not written). ``gradients``:
    each layer's backward passes also sum ``dL/dW_rot`` into its ``rotated_grad`` (zeros at the
    start, ``None`` again at the end), whether or not the scales train."""
    from .rbe_linear import RBELinear

    layers = [m for m in module.modules() if isinstance(m, RBELinear) and id(m) not in frozen]
    params: list[nn.Parameter] = []
    for layer in layers:
        layer.tuned_scales = {n: nn.Parameter(getattr(layer, n).detach().float().clone()) for n in scale_names(layer)}
        params += layer.tuned_scales.values()
        if gradients:
            layer.rotated_grad = torch.zeros(layer.out_features, layer.in_features,
                                            device=layer.tuned_scales[scale_names(layer)[0]].device)
    try:
        yield params
        with torch.no_grad():
            bad = [n for layer in layers for n, p in layer.tuned_scales.items() if not torch.isfinite(p).all()]
            if bad:
                raise EncodingError(f"the fine-tune diverged: {len(bad)} scale tensors are no longer finite; "
                                    "lower its learning rate (calibration_finetune_lr / calibration_e2e_lr)")
            for layer in layers:
                for n, p in layer.tuned_scales.items():
                    getattr(layer, n).copy_(p)
    finally:
        for layer in layers:
            layer.tuned_scales = layer.rotated_grad = None
