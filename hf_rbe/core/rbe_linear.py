"""``RBELinear``: a packed layer in an RBE format (v1 bitfield codes or v2 planes).

Both formats rotate the input side (``W S H``, signs from a stored seed) and decode with tables
that the whole model shares: the first layer (in module order) that uses a given universal
table *owns* it and stores it as parameters; every other layer keeps a non-persistent copy
that :func:`link_shared_tables` fills after loading. A checkpoint therefore stores each table
once, and each layer can still be moved to any device on its own. What differs between the
formats is in ``core.rbe_codecs``.
"""

from __future__ import annotations

import torch
from torch import nn

from .calibrate import DAMP, damped, encode_stages, rotate_hessian
from .errors import CheckpointError
from .op_layout import SIGNS, op_tensor_names
from .packed import PackedLinear
from .rbe_codecs import Spec, codec_for
from .rotation import random_signs, rotate_weight
from .spec import TensorSpec, check_finite


class RBELinear(PackedLinear):
    """Linear layer computing ``y = x W^T + b`` with ``W`` decoded from RBE codes.

    Args:
        in_features, out_features, bias, compute_dtype, device, from_conv1d: see ``PackedLinear``.
        spec: the per-layer format: a v1 ``LayerSpec`` or a v2 ``LayerSpecV2``.
        table_key: name of the universal tables this layer uses (``None``: its own tables).
        owns_table: whether this layer stores the (shared) tables in its state dict.
        rotation_seed: the Hadamard seed this layer encodes with (a loaded one replaces it).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, spec: Spec,
                 table_key: str | None = None, owns_table: bool = True, compute_dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None, from_conv1d: bool = False, rotation_seed: int = 0) -> None:
        spec.check_shape(out_features, in_features)
        self.spec, self.codec, self.table_key = spec, codec_for(spec), table_key
        self.owns_table = owns_table or table_key is None
        super().__init__(in_features, out_features, bias, compute_dtype, device, from_conv1d)
        if not self.owns_table:  # a working copy of the owner's tables, filled by link_shared_tables
            for name, ts in spec.table_tensors().items():
                self.register_buffer(name, ts.empty(device), persistent=False)
        if spec.rotation:
            self.register_buffer(SIGNS, torch.ones(in_features, device=device), persistent=False)
            if self.rotation_seed.device.type != "meta":
                self.rotation_seed.fill_(rotation_seed)
        self.default_rotation_seed = rotation_seed

    # ------------------------------------------------------------------ the format

    def stored_tensors(self) -> dict[str, TensorSpec]:
        out = self.spec.tensors(self.out_features, self.in_features)
        if self.owns_table:
            out.update(self.spec.table_tensors())
        return out

    def op_tensor_names(self) -> tuple[str, ...]:
        return op_tensor_names(self.spec)

    def layout(self) -> list[int]:
        return [self.codec.format_id, self.out_features, self.in_features, *self.spec.to_layout()]

    def table_names(self) -> tuple[str, ...]:
        return tuple(self.spec.table_tensors())

    def saves_tables(self) -> bool:
        return self.owns_table

    def tables(self) -> dict[str, torch.Tensor]:
        """The tables this layer decodes with (its own, or the linked shared copy), by name."""
        return {n: getattr(self, n) for n in self.table_names()}

    def universal_tables(self) -> dict[str, torch.Tensor] | None:
        """The tables a fresh layer encodes against: the universal ones, or ``None`` when the
        layer fits its own."""
        return None if self.table_key is None else self.codec.universal_tables(self.spec)

    def current_rotation_seed(self) -> int:
        """The stored seed once there is one (loaded or encoded), else the one it was built with."""
        if not self.spec.rotation or self.rotation_seed.device.type == "meta":
            return self.default_rotation_seed
        return int(self.rotation_seed.item())

    # ------------------------------------------------------------------ encoding

    def rotated(self, weight: torch.Tensor, rotation_seed: int | None = None) -> torch.Tensor:
        """fp32 ``W S H`` for a float weight [out, in], with this layer's rotation."""
        seed = self.current_rotation_seed() if rotation_seed is None else rotation_seed
        return rotate_weight(weight, self.spec, seed)

    def encode(self, weight: torch.Tensor, tables: dict[str, torch.Tensor] | None = None,
               rotation_seed: int | None = None, hessian: torch.Tensor | None = None,
               damp: float = DAMP) -> dict[str, torch.Tensor]:
        """Stored tensors for a float weight [out, in] (the one encode entry point).

        ``tables``: what to encode against, by name; by default the tables this layer decodes
        with now (a layer with its own per-layer tables fits new ones to ``weight``).
        ``rotation_seed``: by default :meth:`current_rotation_seed`. ``hessian``: ``sum x^T x``
        [in, in] of calibration inputs; with it the codes and scales minimise the output error
        on those inputs (``core.calibrate``; ``damp``: the fraction of its mean diagonal added),
        without it the weight error. A layer that does not own its shared tables gets no table
        tensors back.
        """
        check_finite(weight)
        self.spec.check_shape(*weight.shape)
        seed = self.current_rotation_seed() if rotation_seed is None else rotation_seed
        w_rot = self.rotated(weight, seed)
        if tables is None:
            tables = self.tables() if self.table_key is not None else self.codec.fit_tables(w_rot, self.spec)
        if hessian is None:
            out = self.codec.encode(w_rot, self.spec, tables)
        else:
            block = self.spec.hadamard_block(self.in_features)
            h = damped(rotate_hessian(hessian.to(w_rot.device).double(), seed if self.spec.rotation else None, block),
                       damp)
            out = encode_stages(w_rot, h, self.codec.stage_quantizers(self.spec, tables))
        if self.spec.rotation:
            out["rotation_seed"] = torch.tensor([seed], dtype=torch.int64, device=weight.device)
        if self.owns_table:
            out.update({n: t.to(weight.device) for n, t in tables.items()})
        return out

    @classmethod
    def from_linear(cls, linear: nn.Linear, spec: Spec, tables: dict[str, torch.Tensor] | None = None,
                    rotation_seed: int = 0) -> RBELinear:
        """Quantize an ``nn.Linear`` (``tables``: the universal ones, e.g. ``tables_for(spec)``;
        ``None`` fits per-layer tables). The new layer owns its tables."""
        w = linear.weight.detach()
        dtype = w.dtype if w.is_floating_point() else torch.float32
        key = codec_for(spec).table_key(spec) if tables is not None else None
        mod = cls(linear.in_features, linear.out_features, linear.bias is not None, spec, table_key=key,
                  compute_dtype=dtype, device=w.device, rotation_seed=rotation_seed)
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
        """Check a loaded layer's values: finite scales and tables, the tables' invariants, clean padding,
        a rotation seed in the encoder's range."""
        if self.spec.rotation and int(self.rotation_seed.item()) < 0:
            raise CheckpointError(f"{type(self).__name__}: rotation_seed {int(self.rotation_seed.item())} is negative; "
                                  "seeds are 0 .. 2**63 - 1 (tampered checkpoint?)")
        named = {n: getattr(self, n) for n in (*self.spec.tensors(0, 0), *self.table_names())}
        self.codec.check(named, self.spec, self.in_features, type(self).__name__)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"bpw={self.bits_per_weight:.3f}, format=v{self.codec.version}")


def link_shared_tables(model: nn.Module) -> int:
    """Give every non-owner RBELinear the tables of its owner; returns the number of layers linked."""
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
            raise CheckpointError(f"no layer stores the shared table '{m.table_key}' (incomplete checkpoint?)")
        for n in m.table_names():
            setattr(m, n, getattr(owner, n).detach().to(m.weight.device))
        linked += 1
    return linked
