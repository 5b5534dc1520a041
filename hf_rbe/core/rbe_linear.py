"""``RBELinear``: a packed layer in the RBE v1 format (``core.format``), and its op reference.

Shared tables: the first layer (in module order) that uses a given universal table *owns*
it and stores ``table``/``lut`` as parameters; every other layer keeps a non-persistent copy
that :func:`link_shared_tables` fills after loading. A checkpoint therefore stores each table
once, and each layer can still be moved to any device on its own.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .bits import padding_is_clean
from .codec import decode_layer, encode_layer, rotate_weight
from .format import FORMAT_ID, FORMAT_VERSION, LayerSpec
from .packed import PackedLinear
from .rotation import random_signs, rotate, unrotate
from .spec import FormatError, TensorSpec
from .tables import LayerTables, layer_tables, table_key

_SIGNS = "signs"  # the Hadamard signs: derived from rotation_seed, passed to the op, never saved
_UNIT_ROW_TOL = 1e-3


def op_tensor_names(spec: LayerSpec) -> list[str]:
    """The tensors of ``hf_rbe::linear`` for a v1 layer, in order (the layer and the reference
    both read this one list)."""
    names = list(spec.stage.tensors(0, 0))
    if spec.rotation:
        names.append(_SIGNS)
    names += list(spec.table_tensors())
    names += [n for n in spec.residual.tensors(0, 0) if n not in names]
    return names


@functools.lru_cache(maxsize=256)
def _parse(layout: tuple[int, ...]) -> tuple[LayerSpec, int, list[str]]:
    spec = LayerSpec.from_layout(list(layout[3:]))
    return spec, layout[2], op_tensor_names(spec)


def _decode_rotated(tensors: list[torch.Tensor], layout: list[int]) -> tuple[torch.Tensor, dict, LayerSpec, int]:
    spec, in_features, names = _parse(tuple(layout))
    named = dict(zip(names, tensors))
    w = decode_layer(named, spec, LayerTables.from_tensors(named), in_features)
    return w, named, spec, in_features


def _dequantize(tensors: list[torch.Tensor], layout: list[int]) -> torch.Tensor:
    w, named, spec, k = _decode_rotated(tensors, layout)
    return unrotate(w, named[_SIGNS].float(), spec.hadamard_block(k)) if spec.rotation else w


def _linear(x: torch.Tensor, tensors: list[torch.Tensor], layout: list[int]) -> torch.Tensor:
    w, named, spec, k = _decode_rotated(tensors, layout)
    if spec.rotation:
        x = rotate(x, named[_SIGNS], spec.hadamard_block(k))
    return F.linear(x, w.to(x.dtype))


ops.register_format(FORMAT_ID, ops.FormatOps(dequantize=_dequantize, linear=_linear))


class RBELinear(PackedLinear):
    """Linear layer computing ``y = x W^T + b`` with ``W`` decoded from RBE v1 codes.

    Args:
        in_features, out_features, bias, compute_dtype, device, from_conv1d: see ``PackedLinear``.
        spec: the per-layer format (vector dim, field widths, residual, rotation).
        table_key: name of the universal table this layer uses (``None``: its own table).
        owns_table: whether this layer stores the (shared) table in its state dict.
        rotation_seed: the Hadamard seed this layer encodes with (a loaded one replaces it).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, spec: LayerSpec,
                 table_key: str | None = None, owns_table: bool = True, compute_dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None, from_conv1d: bool = False, rotation_seed: int = 0) -> None:
        spec.check_shape(out_features, in_features)
        self.spec, self.table_key = spec, table_key
        self.owns_table = owns_table or table_key is None
        super().__init__(in_features, out_features, bias, compute_dtype, device, from_conv1d)
        if not self.owns_table:  # a working copy of the owner's table, filled by link_shared_tables
            for name, ts in spec.table_tensors().items():
                self.register_buffer(name, ts.empty(device), persistent=False)
        if spec.rotation:
            self.register_buffer(_SIGNS, torch.ones(in_features, device=device), persistent=False)
            if self.rotation_seed.device.type != "meta":
                self.rotation_seed.fill_(rotation_seed)
        self.default_rotation_seed = rotation_seed

    # ------------------------------------------------------------------ the format

    def stored_tensors(self) -> dict[str, TensorSpec]:
        out = self.spec.tensors(self.out_features, self.in_features)
        if self.owns_table:
            out.update(self.spec.table_tensors())
        return out

    def op_tensor_names(self) -> list[str]:
        return op_tensor_names(self.spec)

    def layout(self) -> list[int]:
        return [FORMAT_ID, self.out_features, self.in_features, *self.spec.to_layout()]

    def table_names(self) -> tuple[str, ...]:
        return tuple(self.spec.table_tensors())

    def saves_tables(self) -> bool:
        return self.owns_table

    def tables(self) -> LayerTables:
        """The tables this layer decodes with (its own, or the linked shared copy)."""
        return LayerTables.from_tensors({n: getattr(self, n) for n in self.table_names()})

    def current_rotation_seed(self) -> int:
        """The stored seed once there is one (loaded or encoded), else the one it was built with."""
        if not self.spec.rotation or self.rotation_seed.device.type == "meta":
            return self.default_rotation_seed
        return int(self.rotation_seed.item())

    # ------------------------------------------------------------------ encoding

    def encode(self, weight: torch.Tensor, tables: LayerTables | None = None,
               rotation_seed: int | None = None) -> dict[str, torch.Tensor]:
        """Stored tensors for a float weight [out, in] (the one encode entry point).

        ``tables``: what to encode against; by default the tables this layer decodes with
        now (a layer with its own per-layer table fits a new one to ``weight``).
        ``rotation_seed``: by default :meth:`current_rotation_seed`. A layer that does not own
        its shared table gets no table tensors back.
        """
        seed = self.current_rotation_seed() if rotation_seed is None else rotation_seed
        if tables is None:
            tables = self.tables() if self.table_key is not None else \
                layer_tables(rotate_weight(weight, self.spec, seed), self.spec)
        out = encode_layer(weight, self.spec, tables, seed)
        if self.owns_table:
            out.update({n: t.to(weight.device) for n, t in tables.as_tensors().items()})
        return out

    @classmethod
    def from_linear(cls, linear: nn.Linear, spec: LayerSpec, tables: LayerTables | None = None,
                    rotation_seed: int = 0) -> RBELinear:
        """Quantize an ``nn.Linear`` (``tables``: the universal ones, e.g. ``tables_for(spec)``;
        ``None`` fits per-layer tables). The new layer owns its tables."""
        w = linear.weight.detach()
        dtype = w.dtype if w.is_floating_point() else torch.float32
        mod = cls(linear.in_features, linear.out_features, linear.bias is not None, spec,
                  table_key=table_key(spec) if tables is not None else None, compute_dtype=dtype, device=w.device,
                  rotation_seed=rotation_seed)
        mod.load_packed(mod.encode(w, tables))
        if linear.bias is not None:
            mod.bias.data.copy_(linear.bias.detach())
        return mod

    def rebuild_buffers(self) -> None:
        """Recompute the Hadamard signs from the stored seed."""
        if self.spec.rotation and self.rotation_seed.device.type != "meta":
            seed = self.rotation_seed
            self.signs = random_signs(int(seed.item()), self.in_features, device=seed.device)

    # ------------------------------------------------------------------ checks

    def validate(self) -> None:
        """Check a loaded layer: finite scales and tables, unit table rows, clean padding."""
        name = type(self).__name__
        for prefix, stage in self.spec.stages:
            for t in ("scale", "table", "lut"):
                if not torch.isfinite(getattr(self, prefix + t).float()).all():
                    raise FormatError(f"{name}: '{prefix}{t}' holds NaN/Inf (tampered checkpoint?)")
            norms = getattr(self, prefix + "table").float().norm(dim=1)
            if not torch.allclose(norms, torch.ones_like(norms), atol=_UNIT_ROW_TOL):
                raise FormatError(f"{name}: '{prefix}table' rows are not unit vectors (tampered checkpoint?)")
            n_codes = self.in_features // stage.dim
            if not padding_is_clean(getattr(self, prefix + "weight"), stage.layout.width, n_codes):
                raise FormatError(f"{name}: '{prefix}weight' has bits set past its last code (tampered checkpoint?)")
        if self.spec.residual.kind in ("int2", "int4", "int8", "fp8"):
            if not torch.isfinite(self.residual_scale.float()).all():
                raise FormatError(f"{name}: 'residual_scale' holds NaN/Inf (tampered checkpoint?)")
            if self.spec.residual.kind == "fp8" and not torch.isfinite(self.residual_weight.float()).all():
                raise FormatError(f"{name}: 'residual_weight' holds NaN (tampered checkpoint?)")

    def extra_repr(self) -> str:
        st = self.spec.stage
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"dim={st.dim}, code_bits={st.layout.width}, residual={self.spec.residual.kind}, "
                f"bpw={self.bits_per_weight:.3f}, format=v{FORMAT_VERSION}")


def link_shared_tables(model: nn.Module) -> int:
    """Give every non-owner RBELinear the table of its owner; returns the number of layers linked."""
    layers = [m for m in model.modules() if isinstance(m, RBELinear)]
    owners: dict[str, RBELinear] = {}
    for m in layers:
        if m.owns_table and m.table_key is not None:
            owners.setdefault(m.table_key, m)
    linked = 0
    for m in layers:
        if m.owns_table:
            continue
        owner = owners.get(m.table_key)  # type: ignore[arg-type]
        if owner is None:
            raise FormatError(f"no layer stores the shared table '{m.table_key}' (incomplete checkpoint?)")
        for n in m.table_names():
            setattr(m, n, getattr(owner, n).detach().to(m.weight.device))
        linked += 1
    return linked
