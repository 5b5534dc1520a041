"""``PackedLinear``: the one contract every packed layer keeps (``RBELinear``, ``Seed64Linear``).

A packed layer subclasses ``nn.Linear`` (PEFT wraps only Linear subclasses) but never holds a
float weight: its stored tensors (codes under the name ``weight``, so that loading a checkpoint
without ``import hf_rbe`` fails on a shape mismatch instead of filling a Linear with garbage)
are frozen parameters allocated from its format's :class:`~hf_rbe.core.spec.TensorSpec`\\ s.

The life of a layer::

    layer = Cls(in_features, out_features, bias, spec, ...)   # empty, on any device (meta too)
    layer.load_packed(layer.encode(weight))                    # encode: the one entry point
    y = layer(x)                                               # hf_rbe::linear (core.ops)
    w = layer.dequantize()                                     # the decoded float weight

A subclass defines ``stored_tensors``, ``op_tensor_names``, ``layout``, ``encode`` and
``validate``; everything else is here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from . import ops
from .errors import CheckpointError
from .spec import COMPUTE_DTYPES, TensorSpec, apply_keeping_dtypes, edit_stamp


def packed_layers(model: nn.Module) -> list[tuple[str, PackedLinear]]:
    """(name, layer) of every packed layer that is not part of another one (a seed64 layer's
    RBE residual is reached through its parent)."""
    found: list[tuple[str, PackedLinear]] = []
    for name, module in model.named_modules():
        if isinstance(module, PackedLinear) and not any(name.startswith(p + ".") for p, _ in found):
            found.append((name, module))
    return found


def frozen(t: torch.Tensor) -> nn.Parameter:
    """A stored tensor as a parameter that never trains (codes, scales, seeds, tables)."""
    return nn.Parameter(t, requires_grad=False)


class _Row:
    """A layer's row kernel on a device (``ops.row_kernel``) and what its stored tensors were when
    it was made: the same objects at the same addresses and versions (``spec.edit_stamp``: an
    inference tensor keeps no version counter, so its in-place edits are not seen here, as the op's
    own kernel plan does not see them). Without a kernel for the device or format the layer's calls
    there take the op."""

    def __init__(self, device: str, sources: tuple[tuple[dict, str], ...], kernel: ops.RowKernel | None) -> None:
        self.device, self.sources, self.kernel = device, sources, kernel
        self.stamp = None if kernel is None else self._stamp()

    @classmethod
    def prepare(cls, layer: PackedLinear, device: str, tensors: list[torch.Tensor], layout: list[int]) -> _Row:
        params = layer._parameters
        sources = tuple((params if n in params else layer._buffers, n) for n in layer.op_tensor_names())
        return cls(device, sources, ops.row_kernel(device, tensors, layout))

    def _stamp(self) -> list[tuple[int, int, int | torch.Size]] | None:
        try:
            return [(id(t := d[n]), t.data_ptr(), edit_stamp(t)) for d, n in self.sources]
        except KeyError:  # a tensor removed
            return None

    def fresh(self) -> bool:
        return self._stamp() == self.stamp


class PackedLinear(nn.Linear):
    """Base class: ``y = x W^T + b`` with ``W`` decoded from stored tensors by ``hf_rbe::linear``.

    Args:
        in_features, out_features, bias: as ``nn.Linear``.
        compute_dtype: dtype of activations, bias and decoded weights (the model's dtype).
        device: where to allocate (``"meta"`` while transformers builds the model).
        from_conv1d: the source was a GPT-2 ``Conv1D`` (its float weight is [in, out]).

    ``prefill_dtype`` (set by ``RBEConfig(prefill_dtype=...)``, default None): the dtype a kernel
    may multiply a call of many rows in (a prompt's prefill) when it differs from x's: the rows
    and the decoded weight rounded to it, the output in x's dtype. Few-row calls (decoding) and
    calls through the op (autograd, ``torch.compile``) compute in x's dtype.
    """

    prefill_dtype: torch.dtype | None = None

    def __init__(self, in_features: int, out_features: int, bias: bool, compute_dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None, from_conv1d: bool = False) -> None:
        nn.Module.__init__(self)
        if compute_dtype not in COMPUTE_DTYPES:
            raise TypeError(f"compute_dtype must be one of {COMPUTE_DTYPES}, got {compute_dtype}")
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype, self.from_conv1d = compute_dtype, from_conv1d
        stored = self.stored_tensors()
        for name, ts in stored.items():
            setattr(self, name, frozen(ts.empty(device)))
        self._float_storage = tuple((n, ts.dtype) for n, ts in stored.items() if ts.dtype.is_floating_point)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=compute_dtype, device=device)) if bias else None

    # ------------------------------------------------------------------ what a format defines

    def stored_tensors(self) -> dict[str, TensorSpec]:
        """Every tensor this layer saves in a checkpoint (the bias aside)."""
        raise NotImplementedError

    def op_tensor_names(self) -> Sequence[str]:
        """Names of the tensors passed to ``hf_rbe::linear``, in the format's order."""
        raise NotImplementedError

    def layout(self) -> list[int]:
        """``[FORMAT_ID, out_features, in_features, *spec ints]`` for ``hf_rbe::linear``."""
        raise NotImplementedError

    def encode(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """Stored tensors for a float weight [out, in], ready for :meth:`load_packed`."""
        raise NotImplementedError

    def validate(self) -> None:
        """Check values after loading (finite scales, clean padding, ...); raise CheckpointError."""
        raise NotImplementedError

    # ------------------------------------------------------------------ shared behaviour

    def load_packed(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy stored tensors in (exact shapes and dtypes, or CheckpointError), then rebuild the
        buffers derived from them."""
        expected = self.stored_tensors()
        for name, t in tensors.items():
            if name not in expected:
                raise CheckpointError(f"{type(self).__name__}: unexpected tensor '{name}' for this layer's format")
            expected[name].check(name, t, type(self).__name__)
        for name, t in tensors.items():
            getattr(self, name).data = t.to(getattr(self, name).device)
        self.rebuild_buffers()

    def rebuild_buffers(self) -> None:
        """Recompute non-persistent buffers from the stored tensors (none by default)."""

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        """``load_state_dict``: stored tensors must match the format exactly (torch would cast them
        silently), and the derived buffers (rotation signs) follow the loaded seeds."""
        for name, ts in self.stored_tensors().items():
            if prefix + name in state_dict:
                ts.check(name, state_dict[prefix + name], f"{type(self).__name__} '{prefix.rstrip('.')}'")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.rebuild_buffers()

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        """``.to(dtype)``, ``.half()``, ``.bfloat16()`` of a model move the layer's float tensors other
        than the bias (stored ones, linked tables, rotation signs) but never cast them: their dtypes
        are part of the format (fp16 scales, fp32 tables)."""
        self.__dict__.pop("_row", None)  # it holds views of the tensors before the move
        stored = [n for n, t in (*self._parameters.items(), *self._buffers.items())
                  if t is not None and t.is_floating_point() and n != "bias"]
        out = apply_keeping_dtypes(self, fn, recurse, stored)
        cast = fn(torch.empty(0, dtype=self.compute_dtype)).dtype  # what the model now computes in
        if cast in COMPUTE_DTYPES:
            self.compute_dtype = cast
        return out

    def keep_storage_dtypes(self) -> None:
        """Undo a cast of stored float tensors that bypassed ``_apply`` (PEFT's
        ``prepare_model_for_kbit_training`` sets every fp16 parameter's ``.data`` to fp32) when
        it lost nothing; refuse a lossy one with a clear error."""
        for name, dtype in self._float_storage:
            p = self._parameters[name]
            if p.dtype != dtype:
                back = p.data.to(dtype)
                if not torch.equal(back.to(p.dtype), p.data):
                    raise CheckpointError(f"{type(self).__name__}: stored '{name}' was changed to {p.dtype} and no "
                                          f"longer fits the format's {dtype}; reload the model instead of casting it")
                p.data = back

    def op_args(self, overrides: dict[str, torch.Tensor] | None = None) -> tuple[list[torch.Tensor], list[int]]:
        """(tensors, layout) for ``hf_rbe::linear``; ``overrides`` replace stored tensors by name."""
        self.keep_storage_dtypes()
        # straight from the module's dicts, the layout built once: every forward pays for this
        params, buffers, names = self._parameters, self._buffers, self.op_tensor_names()
        tensors = [params[n] if n in params else buffers[n] for n in names]
        if overrides:
            tensors = [overrides.get(n, t) for n, t in zip(names, tensors)]
        layout = self.__dict__.get("_op_layout")
        if layout is None:
            layout = self.__dict__["_op_layout"] = tuple(self.layout())
        return tensors, list(layout)

    def dequantize(self, dtype: torch.dtype | None = None,
                   overrides: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The decoded weight [out, in] in the original basis (what ``nn.Linear.weight`` was).

        ``overrides`` decode with other values of stored tensors (QAT decodes its trainable
        scales and tables this way; the result is differentiable in them)."""
        tensors, layout = self.op_args(overrides)
        return ops.format_ops(layout).dequantize(tensors, layout).to(dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self._parameters.get("bias")  # not through nn.Module's __getattr__: every decoding call pays for it
        # may_skip_op first: while dynamo traces, the row count is never read (no guard on it)
        one_row = (ops.may_skip_op(x, bias) and x.numel() == self.in_features and x.shape[-1] == self.in_features
                   and x.dtype in COMPUTE_DTYPES)
        if one_row:  # decoding: the kept row kernel while the stored tensors are as they were
            row = self.__dict__.get("_row")
            if row is not None and (x.is_cpu if row.device == "cpu" else x.device.type == row.device):
                if row.kernel is None:
                    one_row = False
                elif row.fresh():
                    return row.kernel(x, bias)
        if x.dtype not in COMPUTE_DTYPES:
            raise TypeError(f"{type(self).__name__} takes float16/bfloat16/float32 input, got {x.dtype}")
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, layer expects {self.in_features}")
        tensors, layout = self.op_args()
        if one_row:
            row = _Row.prepare(self, x.device.type, tensors, layout)
            self.__dict__["_row"] = row
            if row.kernel is not None:
                return row.kernel(x, bias)
        return ops.call_linear(x, tensors, layout, bias, self.prefill_dtype)

    def __getstate__(self) -> dict:
        state = super().__getstate__()  # a copy
        state.pop("_row", None)  # a kernel's views of this process's memory
        return state

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding the decoded weight and the bias."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.compute_dtype)
        lin.weight.data.copy_(self.dequantize())
        if self.bias is not None:
            lin.bias.data.copy_(self.bias.data)
        return lin

    def storage_bits(self, include_tables: bool | None = None) -> int:
        """Bits stored for the weight (bias excluded); shared tables only where this layer
        saves them, unless ``include_tables`` says otherwise."""
        bits = sum(p.numel() * p.element_size() * 8 for name, p in self.named_parameters(recurse=False)
                   if name != "bias" and name not in self.table_names())
        if include_tables or (include_tables is None and self.saves_tables()):
            bits += sum(getattr(self, n).numel() * getattr(self, n).element_size() * 8 for n in self.table_names())
        return bits + sum(c.storage_bits(include_tables) for c in self.children() if isinstance(c, PackedLinear))

    def table_names(self) -> tuple[str, ...]:
        """Names of this layer's shared tables (none by default)."""
        return ()

    def saves_tables(self) -> bool:
        return False

    @property
    def bits_per_weight(self) -> float:
        return self.storage_bits(include_tables=False) / (self.in_features * self.out_features)


def packed_size(model: nn.Module) -> dict[str, float]:
    """What a model's packed layers store: how many layers and weights, bits per weight (every
    stored tensor, shared tables once), and the bytes of the whole state dict."""
    layers = packed_layers(model)
    weights = sum(m.in_features * m.out_features for _, m in layers)
    bits = sum(m.storage_bits() for _, m in layers)
    state_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return {"rbe_layers": len(layers), "rbe_weights": weights,
            "bits_per_weight": bits / weights if weights else float("nan"), "rbe_bytes": bits / 8,
            "state_dict_bytes": state_bytes}
