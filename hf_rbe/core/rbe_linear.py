"""``RBELinear``: a packed layer in an RBE format (v1 bitfield codes or v2 planes).

Both formats rotate the input side (``W S H``, signs from a stored seed) and decode with tables
that the whole model shares: the first layer (in module order) that uses a given universal
table *owns* it and stores it as parameters; every other layer (a *follower*) holds a reference
to its owner and a non-persistent copy of the tables on its own device, refreshed from the owner
whenever its buffers are rebuilt (after encoding, loading, ``load_state_dict``). A checkpoint
therefore stores each table once, and each layer can still be moved to any device on its own.
Layers enter a model through :func:`swap_layers`, which links followers to owners. What differs
between the formats is in ``core.rbe_codecs``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .errors import CheckpointError
from .ldlq import DAMP, damped, encode_stages, rotate_hessian
from .op_layout import SIGNS, op_tensor_names
from .packed import PackedLinear
from .rbe_codecs import Spec, codec_for
from .rotation import random_signs, rotate, rotate_weight
from .scale_tuning import TunedLinear
from .spec import TensorSpec, check_finite


class RBELinear(PackedLinear):
    """Linear layer computing ``y = x W^T + b`` with ``W`` decoded from RBE codes.

    Args:
        in_features, out_features, bias, compute_dtype, device, from_conv1d: see ``PackedLinear``.
        spec: the per-layer format: a v1 ``LayerSpec`` or a v2 ``LayerSpecV2``.
        table_key: name of the universal tables this layer uses (``None``: its own tables).
        owns_table: whether this layer stores the (shared) tables in its state dict.
        table_owner: for a follower, the layer that stores its tables (else :func:`link_shared_tables`
            finds it).
        rotation_seed: the Hadamard seed this layer encodes with (a loaded one replaces it).

    ``calibration_hessian`` (``None`` unless calibration kept it, ``keep_calibration_statistics``):
    the normalised fp16 Hessian of the layer's calibration inputs, which re-encoding (QAT, a LoRA
    merge) uses to stay output-aware. ``tuned_scales`` (``None`` outside
    ``core.scale_tuning.tuned_scales``): trainable fp32 scales the forward pass computes with;
    ``rotated_grad`` (``None`` unless that context was asked for gradients): the sum of the loss
    gradients with respect to the rotated weight (:meth:`decode_rotated`), fp32 [out, in].
    """

    calibration_hessian: torch.Tensor | None
    tuned_scales: dict[str, nn.Parameter] | None
    rotated_grad: torch.Tensor | None

    def __init__(self, in_features: int, out_features: int, bias: bool, spec: Spec,
                 table_key: str | None = None, owns_table: bool = True, compute_dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None, from_conv1d: bool = False, rotation_seed: int = 0,
                 table_owner: RBELinear | None = None) -> None:
        spec.check_shape(out_features, in_features)
        self.spec, self.codec, self.table_key = spec, codec_for(spec), table_key
        self.owns_table = owns_table or table_key is None
        super().__init__(in_features, out_features, bias, compute_dtype, device, from_conv1d)
        self.__dict__["_table_owner"] = None  # a plain attribute: the owner is not a submodule
        self.calibration_hessian = None
        self.tuned_scales = None
        self.rotated_grad = None
        # Shared tables start as the universal ones (never zeros): an owner until it is encoded or
        # loaded, a follower (a working copy) until it follows its owner.
        initial = None if torch.device(device or "cpu").type == "meta" else self.universal_tables()
        if not self.owns_table:
            for name, ts in spec.table_tensors().items():
                value = ts.empty(device) if initial is None else initial[name].to(device)
                self.register_buffer(name, value, persistent=False)
        elif initial is not None:
            for name, t in initial.items():
                getattr(self, name).data.copy_(t)
        if spec.rotation:
            self.register_buffer(SIGNS, torch.ones(in_features, device=device), persistent=False)
            if self.rotation_seed.device.type != "meta":
                self.rotation_seed.fill_(rotation_seed)
        self.default_rotation_seed = rotation_seed
        if table_owner is not None:
            self.follow(table_owner)

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
        on those inputs (``core.ldlq``; ``damp``: the fraction of its mean diagonal added),
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
            h = self.rotated_hessian(hessian.to(w_rot.device), damp, seed)
            out = encode_stages(w_rot, h, self.codec.stage_quantizers(self.spec, tables))
        if self.spec.rotation:
            out["rotation_seed"] = torch.tensor([seed], dtype=torch.int64, device=weight.device)
        if self.owns_table:
            out.update({n: t.to(weight.device) for n, t in tables.items()})
        return out

    def rotated_hessian(self, hessian: torch.Tensor, damp: float = DAMP,
                        rotation_seed: int | None = None) -> torch.Tensor:
        """float64 ``R^T H R`` of an input Hessian [in, in], damped (``core.ldlq.damped``): the
        Hessian in the basis of :meth:`decode_rotated` (``rotation_seed``: by default the layer's)."""
        seed = self.current_rotation_seed() if rotation_seed is None else rotation_seed
        block = self.spec.hadamard_block(self.in_features)
        h = rotate_hessian(hessian.double(), seed if self.spec.rotation else None, block)
        return damped(h, damp, in_place=h is not hessian)  # in place when h is our own copy

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
        """Recompute the Hadamard signs from the stored seed, and a follower's tables from its owner."""
        if self.spec.rotation and self.rotation_seed.device.type != "meta":
            seed = self.rotation_seed
            self.signs = random_signs(int(seed.item()), self.in_features, device=seed.device)
        self._copy_tables()

    # ------------------------------------------------------------------ shared tables

    @property
    def table_owner(self) -> RBELinear | None:
        """The layer that stores this follower's tables (``None`` for an owner, or before linking)."""
        return self._table_owner

    def follow(self, owner: RBELinear) -> None:
        """Decode with ``owner``'s tables from now on (copied now when it has them)."""
        if self.owns_table or owner.table_key != self.table_key or not owner.owns_table:
            raise CheckpointError(f"a layer with table '{self.table_key}' cannot follow one that stores "
                                  f"'{owner.table_key}'")
        self.__dict__["_table_owner"] = owner
        self._copy_tables()

    def _copy_tables(self) -> None:
        owner = self._table_owner
        if owner is None or owner.weight.device.type == "meta":
            return
        for n in self.table_names():
            setattr(self, n, getattr(owner, n).detach().to(self.weight.device))

    # ------------------------------------------------------------------ the decoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tuned_scales is None:
            return super().forward(x)
        names = tuple(self.tuned_scales)
        return TunedLinear.apply(x, self.bias, self, names, *(self.tuned_scales[n] for n in names))

    def decode_rotated(self, overrides: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """fp32 ``W S H`` [out, in] (the rotated basis the codes describe); ``overrides`` replace
        stored tensors by name, as in :meth:`dequantize`."""
        tensors, _ = self.op_args(overrides)
        return self.codec.decode(dict(zip(self.op_tensor_names(), tensors)), self.spec, self.in_features)

    def rotate_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x S H``: an input in the basis of :meth:`decode_rotated` (``x`` itself without rotation)."""
        if not self.spec.rotation:
            return x
        return rotate(x, self.signs, self.spec.hadamard_block(self.in_features))

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


def swap_layers(model: nn.Module, layers: Mapping[str, nn.Module]) -> None:
    """Put each module at its name in ``model`` and link every follower in the model to the layer
    that now stores its tables: the one way packed layers (and their QAT twins) enter a model."""
    for name, layer in layers.items():
        model.set_submodule(name, layer)
    link_shared_tables(model)


def link_shared_tables(model: nn.Module) -> int:
    """Make every follower RBELinear in ``model`` follow the layer there that stores its tables
    (:meth:`RBELinear.follow`); returns the number of followers."""
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
        m.follow(owner)
        linked += 1
    return linked
