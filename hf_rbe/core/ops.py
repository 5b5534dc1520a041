"""The layer ops, registered once with ``torch.library``: ``hf_rbe::linear`` and ``hf_rbe::dequantize``.

Every packed layer computes ``y = x W^T + b`` by calling this one op with its stored tensors
(a list, in the order its format defines) and its layout as a list of ints (first the format
id, then what the format's ``to_layout`` writes). Registering it as a custom op means:

- the dispatcher picks the implementation by device: this module registers the PyTorch
  reference (``core.reference``; any device, the oracle every kernel is tested against), and
  ``hf_rbe.kernels`` registers faster ones for CUDA (Triton) and the CPU over it
  (``reference_only`` keeps the calls inside it on the reference);
- ``torch.compile`` sees one opaque node with a fake (shape-only) implementation, so a model
  compiles with ``fullgraph=True`` and CUDA graphs can capture it;
- autograd: the gradient reaches ``x`` (adapters before the layer train) and the bias; the
  stored tensors are constants. The backward multiplies by ``hf_rbe::dequantize`` (the decoded
  weight, also an opaque op, so a compiled backward traces no decoder internals).

What the arguments mean (tensor order, layout ints) is ``core.op_layout``'s.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from typing import Optional

import torch

from .errors import CheckpointError
from .moved import renamed
from .op_layout import out_features
from .reference import REFERENCE, FormatOps

__getattr__ = renamed("hf_rbe.core.ops", {  # the reference of each format is core.reference's table now
    "register_format": ("hf_rbe.core.reference.REFERENCE", REFERENCE.__setitem__)})


def format_ops(layout: list[int]) -> FormatOps:
    """The reference decoder of the layout's format (``core.reference``)."""
    try:
        return REFERENCE[layout[0]]
    except (KeyError, IndexError):
        raise CheckpointError(f"unknown packed-layer format id {layout[:1]}") from None


@torch.library.custom_op("hf_rbe::linear", mutates_args=())
def linear(x: torch.Tensor, tensors: list[torch.Tensor], layout: list[int],
           bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``x W^T + b`` for x [..., in_features] in fp32/fp16/bf16; output in x's dtype."""
    return reference_linear(x, tensors, layout, bias)


def reference_linear(x: torch.Tensor, tensors: list[torch.Tensor], layout: list[int],
                     bias: Optional[torch.Tensor]) -> torch.Tensor:
    """The PyTorch reference of ``hf_rbe::linear`` (what every kernel is checked against)."""
    y = format_ops(layout).linear(x, tensors, layout)
    return y if bias is None else y + bias.to(y.dtype)


#: device type -> the kernel registered for ``hf_rbe::linear`` there (``register_kernel``).
_KERNELS: dict[str, Callable[..., torch.Tensor]] = {}

_REFERENCE_ONLY = contextvars.ContextVar("hf_rbe_reference_only", default=False)


@contextlib.contextmanager
def reference_only() -> Iterator[None]:
    """Inside, every ``hf_rbe::linear`` computes with the PyTorch reference, whatever kernel is
    registered for the device. Calibration runs in it: its discrete choices (LDLQ, code steps) flip
    under last-bit differences of the activations they see, so with a kernel in the loop every
    kernel change, and every machine without one, would calibrate to different codes."""
    token = _REFERENCE_ONLY.set(True)
    try:
        yield
    finally:
        _REFERENCE_ONLY.reset(token)


def kernels_allowed() -> bool:
    """False inside :func:`reference_only`: registered kernels must hand the call to the reference."""
    return not _REFERENCE_ONLY.get()


#: A layer's kernel for one input row, kept by its caller between calls: ``row(x, bias)`` takes
#: x [..., K] with one row (any compute dtype) and returns ``x W^T + b`` in x's dtype.
RowKernel = Callable[[torch.Tensor, Optional[torch.Tensor]], torch.Tensor]

#: device type -> ``prepare(tensors, layout)``: that layer's :data:`RowKernel`, or None where the
#: device's kernel has none for it (``register_kernel``'s ``row``).
_ROW_KERNELS: dict[str, Callable[[list[torch.Tensor], list[int]], Optional[RowKernel]]] = {}


def register_kernel(device_type: str, kernel: Callable[..., torch.Tensor],
                    row: Optional[Callable[[list[torch.Tensor], list[int]], Optional[RowKernel]]] = None) -> None:
    """Make ``kernel(x, tensors, layout, bias, prefill_dtype=None)`` the implementation of
    ``hf_rbe::linear`` on ``device_type`` (``prefill_dtype``: the dtype it may multiply many rows
    in, a layer's ``PackedLinear.prefill_dtype``; the op itself passes none); ``row(tensors,
    layout)``, if given, prepares a layer's :data:`RowKernel` (what ``kernel`` computes for one
    row, with the per-call preparation done once)."""
    linear.register_kernel(device_type)(kernel)
    _KERNELS[device_type] = kernel
    if row is not None:
        _ROW_KERNELS[device_type] = row


def may_skip_op(x: torch.Tensor, bias: Optional[torch.Tensor]) -> bool:
    """Whether a call with input ``x`` may go straight to a kernel instead of through the op: a
    plain tensor, no gradient to record, no graph being traced, kernels allowed."""
    return (type(x) is torch.Tensor and not torch.compiler.is_compiling()
            and not (torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)))
            and kernels_allowed())  # after is_compiling: dynamo cannot read a ContextVar


def row_kernel(device_type: str, tensors: list[torch.Tensor], layout: list[int]) -> Optional[RowKernel]:
    """The layer's :data:`RowKernel` on ``device_type``, or None where there is none. Valid while
    its tensors hold what they hold now (the caller checks; ``PackedLinear`` keeps one per layer)."""
    prepare = _ROW_KERNELS.get(device_type)
    return None if prepare is None else prepare(tensors, layout)


def call_linear(x: torch.Tensor, tensors: list[torch.Tensor], layout: list[int],
                bias: Optional[torch.Tensor], prefill_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``hf_rbe::linear``, or straight the kernel the dispatcher would pick when nothing needs
    the dispatcher (``may_skip_op``): its Python hops cost a good part of a small layer's CPU
    time (``kernels/NOTES.md``). ``prefill_dtype`` reaches only that kernel (``register_kernel``):
    through the op, as under autograd, the product stays in x's dtype."""
    kernel = _KERNELS.get(x.device.type) if may_skip_op(x, bias) else None
    if kernel is None:
        return linear(x, tensors, layout, bias)
    return kernel(x, tensors, layout, bias, prefill_dtype)


@linear.register_fake
def _linear_fake(x: torch.Tensor, tensors: list[torch.Tensor], layout: list[int],
                 bias: Optional[torch.Tensor]) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], out_features(layout)))


@torch.library.custom_op("hf_rbe::dequantize", mutates_args=())
def dequantize(tensors: list[torch.Tensor], layout: list[int]) -> torch.Tensor:
    """The decoded weight, fp32 [out_features, in_features], in the original basis."""
    return format_ops(layout).dequantize(tensors, layout).float()


@dequantize.register_fake
def _dequantize_fake(tensors: list[torch.Tensor], layout: list[int]) -> torch.Tensor:
    return tensors[0].new_empty((layout[1], layout[2]), dtype=torch.float32)


def _setup_context(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
    x, tensors, layout, bias = inputs
    ctx.tensors, ctx.layout = tensors, layout
    ctx.x_dtype, ctx.has_bias = x.dtype, bias is not None


def _backward(ctx, grad):  # type: ignore[no-untyped-def]
    grad_x = (grad.float() @ dequantize(ctx.tensors, ctx.layout)).to(ctx.x_dtype)
    grad_b = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias else None
    return grad_x, [None] * len(ctx.tensors), None, grad_b  # stored tensors and layout get no gradient


linear.register_autograd(_backward, setup_context=_setup_context)
