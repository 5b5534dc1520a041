"""``Seed64Linear``: a packed layer whose weight is one 64-bit seed per T x T tile (paper 000).

The stored tensors are defined in ``core.seed64_format``; the residual, when there is one, is
an ordinary ``RBELinear`` child named ``residual`` (it shares the model's universal tables and
is checked on load like every other RBE layer). Its reference decoder is ``core.reference``'s.
"""

from __future__ import annotations

import torch

from . import ops
from . import seed64 as S
from .errors import CheckpointError
from .packed import PackedLinear
from .rbe_linear import RBELinear
from .reference import seed64_dequantize
from .seed64_format import FORMAT_ID, MASK, OFFSET, Seed64Spec
from .spec import TensorSpec, check_finite

_RESERVED = MASK["reserved"] << OFFSET["reserved"]
_RESIDUAL = "residual."


class Seed64Linear(PackedLinear):
    """``y = x W^T + b`` with ``W`` generated from per-tile seeds (plus an optional RBE residual).

    Args:
        in_features, out_features, bias, compute_dtype, device, from_conv1d: see ``PackedLinear``.
        spec: tile size, whether tiles carry an fp16 scale, and the residual's RBE spec.
        residual_table_key, residual_owns_table, rotation_seed: passed to the residual ``RBELinear``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, spec: Seed64Spec,
                 residual_table_key: str | None = None, residual_owns_table: bool = True,
                 compute_dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                 from_conv1d: bool = False, rotation_seed: int = 0) -> None:
        spec.check_shape(out_features, in_features)
        self.spec = spec
        super().__init__(in_features, out_features, bias, compute_dtype, device, from_conv1d)
        self.residual = None if spec.residual is None else RBELinear(
            in_features, out_features, False, spec.residual, table_key=residual_table_key,
            owns_table=residual_owns_table, compute_dtype=compute_dtype, device=device, rotation_seed=rotation_seed)

    # ------------------------------------------------------------------ the format

    def stored_tensors(self) -> dict[str, TensorSpec]:
        return self.spec.tensors(self.out_features, self.in_features)

    def op_tensor_names(self) -> tuple[str, ...]:
        return tuple(self.stored_tensors())

    def layout(self) -> list[int]:
        return [FORMAT_ID, self.out_features, self.in_features, self.spec.tile, int(self.spec.scaled)]

    # ------------------------------------------------------------------ encoding

    def encode(self, weight: torch.Tensor, tables: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Stored tensors for a float weight [out, in]: seeds, scales, and the residual's
        (prefixed ``residual.``; ``tables`` are the residual's, see ``RBELinear.encode``)."""
        check_finite(weight)
        w = weight.detach().double()
        seeds, scale = S.encode(S.tile_matrix(w, self.spec.tile), scaled=self.spec.scaled)
        out = {"weight": seeds.reshape(self.weight.shape)}
        if self.spec.scaled:
            out["tile_scale"] = scale.reshape(self.weight.shape).half()
        if self.residual is not None:
            layout = self.layout()
            rec = seed64_dequantize([out[n] for n in self.op_tensor_names()], layout)
            out.update({_RESIDUAL + k: v for k, v in self.residual.encode((w - rec).float(), tables).items()})
        return out

    def load_packed(self, tensors: dict[str, torch.Tensor]) -> None:
        own = {k: v for k, v in tensors.items() if not k.startswith(_RESIDUAL)}
        res = {k[len(_RESIDUAL):]: v for k, v in tensors.items() if k.startswith(_RESIDUAL)}
        if res and self.residual is None:
            raise CheckpointError("Seed64Linear: residual tensors given but the layer has no residual")
        super().load_packed(own)
        if res:
            self.residual.load_packed(res)  # type: ignore[union-attr]

    # ------------------------------------------------------------------ decoding

    def dequantize(self, dtype: torch.dtype | None = None,
                   overrides: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        w = super().dequantize(torch.float32, overrides)
        if self.residual is not None:
            w = w + self.residual.dequantize(torch.float32)
        return w.to(dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, layer expects {self.in_features}")
        tensors, layout = self.op_args()
        out = ops.linear(x, tensors, layout, None)
        if self.residual is not None:
            out = out + self.residual(x)
        return out if self.bias is None else out + self.bias.to(out.dtype)

    # ------------------------------------------------------------------ checks

    def validate(self) -> None:
        """Reserved seed bits must be zero (the encoder never sets them); scales finite."""
        if bool(((self.weight & _RESERVED) != 0).any()):
            raise CheckpointError("Seed64Linear: reserved seed bits are set (tampered checkpoint?)")
        if self.spec.scaled and not torch.isfinite(self.tile_scale.float()).all():
            raise CheckpointError("Seed64Linear: 'tile_scale' holds NaN/Inf (tampered checkpoint?)")
        if self.residual is not None:
            self.residual.validate()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"tile={self.spec.tile}, scaled={self.spec.scaled}, bpw={self.bits_per_weight:.3f}")
