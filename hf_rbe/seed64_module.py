"""``Seed64Linear``: a Linear whose weight is one 64-bit seed per T x T tile (paper 000).

Stored tensors::

    weight        int64 [out / T, in / T]   one seed per tile (layout in ``codec.seed64``)
    tile_scale    fp16  [out / T, in / T]   (with ``scaled``) least-squares scale of the unit-RMS tile
    residual.*    an ``RBELinear`` (no bias) holding W - seed64(W), when a residual is set

Like ``RBELinear``, the seeds sit under ``weight`` so that loading without ``import hf_rbe``
fails on a shape mismatch. The residual child is an ordinary ``RBELinear``, so it shares the
model's universal tables and is checked on load like every other RBE layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .codec import seed64 as S
from .format import FormatError, LayerSpec
from .modules import RBELinear, dense_linear

_RESERVED_MASK = (1 << 6) - 1


def _frozen(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


class Seed64Linear(nn.Linear):
    """``y = x W^T + b`` with ``W`` generated from per-tile seeds (plus an optional RBE residual)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tile: int = 32, scaled: bool = True,
                 residual_spec: LayerSpec | None = None, residual_table_key: str | None = None,
                 residual_owns_table: bool = True, compute_dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None, default_rotation_seed: int = 0) -> None:
        nn.Module.__init__(self)
        if in_features % tile or out_features % tile:
            raise FormatError(f"seed64 needs both dimensions divisible by the tile {tile}, "
                              f"got {out_features}x{in_features}")
        self.in_features, self.out_features, self.tile, self.scaled = in_features, out_features, tile, scaled
        self.compute_dtype = compute_dtype
        self.backend = "auto"
        shape = (out_features // tile, in_features // tile)
        self.weight = _frozen(torch.zeros(shape, dtype=torch.int64, device=device))
        self.tile_scale = _frozen(torch.ones(shape, dtype=torch.float16, device=device)) if scaled else None
        self.residual = None
        if residual_spec is not None:
            self.residual = RBELinear(in_features, out_features, False, residual_spec, table_key=residual_table_key,
                                      owns_table=residual_owns_table, compute_dtype=compute_dtype, device=device,
                                      default_rotation_seed=default_rotation_seed)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=compute_dtype, device=device)) if bias else None

    # ------------------------------------------------------------------ encoding

    def encode(self, weight: torch.Tensor, residual_tables=None) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
        """Stored tensors for a float weight [out, in] (seeds, scales, and the residual's)."""
        from .codec.rbe import check_finite

        check_finite(weight)
        w = weight.detach().double()
        seeds, scale = S.encode(S.tile_matrix(w, self.tile), scaled=self.scaled)
        out = {"weight": seeds.reshape(self.weight.shape)}
        if self.scaled:
            out["tile_scale"] = scale.reshape(self.weight.shape).half()
        if self.residual is not None:
            rec = self._generate(out["weight"], out.get("tile_scale"))
            res = self.residual.encode((w - rec).float(), residual_tables, self.residual.default_rotation_seed)
            out.update({f"residual.{k}": v for k, v in res.items()})
        return out

    def load_encoded(self, tensors: dict[str, torch.Tensor]) -> None:
        own = {"weight": self.weight, "tile_scale": self.tile_scale}
        res = {k[len("residual."):]: v for k, v in tensors.items() if k.startswith("residual.")}
        for k, v in tensors.items():
            if k.startswith("residual."):
                continue
            if own.get(k) is None or own[k].shape != v.shape:
                raise FormatError(f"seed64 layer: unexpected tensor {k!r} of shape {tuple(v.shape)}")
            own[k].data = v.to(dtype=own[k].dtype, device=own[k].device)
        if res:
            if self.residual is None:
                raise FormatError("seed64 layer: residual tensors given but the layer has no residual")
            self.residual.load_packed(res)

    # ------------------------------------------------------------------ decoding

    def _generate(self, seeds: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
        use_triton = self.backend == "triton" or (self.backend == "auto" and seeds.is_cuda)
        if use_triton:
            from .kernels.triton_seed64 import seed64_generate

            theta_ij, d_ij = S.disk_grid(self.tile, seeds.device)
            tiles = seed64_generate(seeds.reshape(-1), theta_ij, d_ij, scale)
        else:
            tiles = S.generate(seeds.reshape(-1), self.tile, None if scale is None else scale.reshape(-1))
        return S.untile_matrix(tiles, self.out_features, self.in_features)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        w = self._generate(self.weight, self.tile_scale).float()
        if self.residual is not None:
            w = w + self.residual.dequantize(torch.float32)
        return w.to(dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, layer expects {self.in_features}")
        out = F.linear(x, self._generate(self.weight, self.tile_scale).to(x.dtype))
        if self.residual is not None:
            out = out + self.residual(x)
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def to_linear(self) -> nn.Linear:
        return dense_linear(self)

    # ------------------------------------------------------------------ checks and sizes

    def validate(self) -> None:
        """Reserved seed bits must be zero (our encoder never sets them); scales finite."""
        if bool(((self.weight & _RESERVED_MASK) != 0).any()):
            raise FormatError("seed64 layer: reserved seed bits are set (tampered checkpoint?)")
        if self.tile_scale is not None and not torch.isfinite(self.tile_scale.float()).all():
            raise FormatError("seed64 layer: 'tile_scale' holds NaN/Inf (tampered checkpoint?)")

    def storage_bits(self, include_tables: bool | None = None) -> int:
        bits = self.weight.numel() * 64 + (self.tile_scale.numel() * 16 if self.tile_scale is not None else 0)
        if self.residual is not None:
            bits += self.residual.storage_bits(include_tables)
        return bits

    @property
    def bits_per_weight(self) -> float:
        return self.storage_bits(include_tables=False) / (self.in_features * self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"tile={self.tile}, scaled={self.scaled}, bpw={self.bits_per_weight:.3f}")
