"""``RBELinear``: an ``nn.Linear`` whose weight is stored as packed RBE codes.

It subclasses ``nn.Linear`` (PEFT wraps only Linear subclasses) but never holds a float
weight: ``weight`` is the int32 code words, so loading an RBE checkpoint without
``import hf_rbe`` fails on a shape mismatch instead of filling a Linear with garbage.

Shared tables: the first layer (in module order) that uses a given universal table *owns*
it and stores ``table``/``lut`` as parameters; every other layer keeps a non-persistent
copy that :func:`link_shared_tables` fills after loading. A checkpoint therefore stores each
table once, and each layer can still be moved to any device on its own.
"""

from __future__ import annotations

import functools
import importlib.util
import logging

import torch
import torch.nn.functional as F
from torch import nn

from .codec.rbe import LayerTables, StageTables, decode_layer, encode_layer, layer_tables, rotate_weight, table_key
from .codec.rotation import random_signs, rotate, unrotate
from .format import FORMAT_VERSION, FormatError, LayerSpec, padding_is_clean

logger = logging.getLogger(__name__)

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@functools.lru_cache(maxsize=1)
def _triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _frozen(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


class RBELinear(nn.Linear):
    """Linear layer computing ``y = x W^T + b`` with ``W`` decoded from RBE codes.

    Args:
        in_features, out_features, bias: as ``nn.Linear``.
        spec: the per-layer format (vector dim, field widths, residual, rotation).
        table_key: name of the universal table this layer uses (``None``: its own table).
        owns_table: whether this layer stores the (shared) table in its state dict.
        compute_dtype: dtype of activations and decoded weights (the model's dtype).
        device: where to allocate (``"meta"`` while transformers builds the model).
        from_conv1d: the source was a GPT-2 ``Conv1D`` (its float weight is [in, out]).
        default_rotation_seed: seed used when this layer is encoded (a loaded one is kept).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        spec: LayerSpec,
        table_key: str | None = None,
        owns_table: bool = True,
        compute_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        from_conv1d: bool = False,
        default_rotation_seed: int = 0,
    ) -> None:
        nn.Module.__init__(self)
        spec.check_shape(out_features, in_features)
        if compute_dtype not in _FLOAT_DTYPES:
            raise TypeError(f"compute_dtype must be one of {_FLOAT_DTYPES}, got {compute_dtype}")
        self.in_features, self.out_features = in_features, out_features
        self.spec, self.table_key, self.compute_dtype = spec, table_key, compute_dtype
        self.owns_table = owns_table or table_key is None
        self.backend = "auto"  # "auto": Triton on CUDA, reference elsewhere; or force "reference" / "triton"
        self.from_conv1d, self.default_rotation_seed = from_conv1d, default_rotation_seed
        stage, res = spec.stage, spec.residual
        kw = {"device": device}
        self.weight = _frozen(torch.zeros(out_features, stage.n_words(in_features), dtype=torch.int32, **kw))
        self.scale = _frozen(torch.zeros(out_features, stage.n_groups(in_features), dtype=torch.float16, **kw))
        if spec.rotation:
            self.rotation_seed = _frozen(torch.zeros(1, dtype=torch.int64, **kw))
            self.register_buffer("signs", torch.ones(in_features, **kw), persistent=False)
        if res.kind == "rbe":
            self.residual_weight = _frozen(
                torch.zeros(out_features, res.stage.n_words(in_features), dtype=torch.int32, **kw)
            )
            self.residual_scale = _frozen(
                torch.zeros(out_features, res.stage.n_groups(in_features), dtype=torch.float16, **kw)
            )
        elif res.kind == "fp8":
            self.residual_weight = _frozen(torch.zeros(out_features, in_features, dtype=torch.float8_e4m3fn, **kw))
            self.residual_scale = _frozen(
                torch.zeros(out_features, in_features // res.group_size, dtype=torch.float16, **kw)
            )
        elif res.kind != "none":
            words = -(-in_features * res.int_bits // 32)
            self.residual_weight = _frozen(torch.zeros(out_features, words, dtype=torch.int32, **kw))
            self.residual_scale = _frozen(
                torch.zeros(out_features, in_features // res.group_size, dtype=torch.float16, **kw)
            )
        self._make_tables(**kw)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=compute_dtype, **kw)) if bias else None

    def _make_tables(self, device: torch.device | str | None) -> None:
        stages = [("", self.spec.stage)]
        if self.spec.residual.kind == "rbe":
            stages.append(("residual_", self.spec.residual.stage))
        for prefix, stage in stages:
            table = torch.zeros(stage.layout.table_size, stage.dim, device=device)
            lut = torch.zeros(stage.layout.n_curves, stage.layout.n_levels, device=device)
            for name, t in ((prefix + "table", table), (prefix + "lut", lut)):
                if self.owns_table:
                    setattr(self, name, _frozen(t))
                else:
                    self.register_buffer(name, t, persistent=False)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        spec: LayerSpec,
        tables: LayerTables | None = None,
        rotation_seed: int = 0,
        owns_table: bool = True,
    ) -> RBELinear:
        """Quantize an ``nn.Linear`` (tables: the universal ones; ``None`` fits per-layer tables)."""
        w = linear.weight.detach()
        mod = cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            spec,
            table_key=table_key(spec) if tables is not None else None,
            owns_table=owns_table,
            compute_dtype=w.dtype if w.dtype in _FLOAT_DTYPES else torch.float32,
            device=w.device,
        )
        mod.default_rotation_seed = rotation_seed
        tensors = quantize_weight(w, spec, tables, rotation_seed)
        mod.load_packed(tensors)
        if linear.bias is not None:
            mod.bias.data.copy_(linear.bias.detach())
        return mod

    def load_packed(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy stored tensors (codes, scales, tables, ...) in, then rebuild derived buffers."""
        own = dict(self.named_parameters(recurse=False)) | dict(self.named_buffers(recurse=False))
        for name, t in tensors.items():
            if name not in own:
                raise FormatError(f"unexpected tensor '{name}' for this layer's spec")
            if own[name].shape != t.shape:
                raise FormatError(f"'{name}' has shape {tuple(t.shape)}, the spec needs {tuple(own[name].shape)}")
            own[name].data = t.to(dtype=own[name].dtype, device=own[name].device)
        self.rebuild_buffers()

    def encode(self, weight: torch.Tensor, tables: LayerTables | None = None,
               rotation_seed: int | None = None) -> dict[str, torch.Tensor]:
        """Stored tensors for a float weight [out, in], ready for :meth:`load_packed`.

        Defaults re-encode in place of the current codes: this layer's own tables (shared or
        refitted per layer) and its stored rotation seed. A layer that does not own its shared
        table gets no table tensors back.
        """
        if tables is None and self.table_key is not None:
            tables = self._tables()
        if rotation_seed is None:
            rotation_seed = int(self.rotation_seed.item()) if self.spec.rotation else 0
        packed = quantize_weight(weight, self.spec, tables, rotation_seed)
        if not self.owns_table:
            for n in ("table", "lut", "residual_table", "residual_lut"):
                packed.pop(n, None)
        return packed

    def rebuild_buffers(self) -> None:
        """Recompute non-persistent buffers (Hadamard signs) from the stored seed."""
        if self.spec.rotation:
            seed = int(self.rotation_seed.item())
            self.signs = random_signs(seed, self.in_features, device=self.rotation_seed.device)

    # ------------------------------------------------------------------ decoding

    def _tables(self) -> LayerTables:
        res = StageTables(self.residual_table, self.residual_lut) if self.spec.residual.kind == "rbe" else None
        return LayerTables(StageTables(self.table, self.lut), res)

    def _stored(self) -> dict[str, torch.Tensor]:
        names = ("weight", "scale", "residual_weight", "residual_scale")
        return {n: getattr(self, n) for n in names if hasattr(self, n)}

    def rotated_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The decoded weight in the rotated basis, ``W S H`` [out, in]."""
        w = decode_layer(self._stored(), self.spec, self._tables(), self.in_features)
        return w.to(dtype or self.compute_dtype)

    def dequantize(self, dtype: torch.dtype | None = None, scales: dict[str, torch.Tensor] | None = None,
                   tables: LayerTables | None = None) -> torch.Tensor:
        """The decoded weight in the original basis [out, in] (what ``nn.Linear.weight`` was).

        ``scales`` / ``tables`` replace the stored ones (QAT decodes its trainable copies this
        way, differentiably)."""
        w = decode_layer({**self._stored(), **(scales or {})}, self.spec, tables or self._tables(), self.in_features)
        if self.spec.rotation:
            w = unrotate(w, self.signs.float(), self.spec.hadamard_block(self.in_features))
        return w.to(dtype or self.compute_dtype)

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` with the decoded weight."""
        return dense_linear(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"RBELinear takes float16/bfloat16/float32 input, got {x.dtype}")
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, layer expects {self.in_features}")
        if self.backend not in ("auto", "reference", "triton"):
            raise ValueError(f"backend must be 'auto', 'reference' or 'triton', got {self.backend!r}")
        if self.backend == "triton" or (self.backend == "auto" and x.is_cuda and _triton_available()):
            return self._kernel_forward(x)
        if self.spec.rotation:
            x = rotate(x, self.signs, self.spec.hadamard_block(self.in_features))
        out = F.linear(x, self.rotated_weight(x.dtype))
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def _kernel_terms(self) -> list[dict]:
        """The stored weight as the terms the Triton layer kernel sums (stage 1, then the residual)."""
        def rbe_term(prefix: str, stage) -> dict:  # type: ignore[no-untyped-def]
            lay = stage.layout
            return {"mode": "rbe", "words": getattr(self, prefix + "weight"), "scale": getattr(self, prefix + "scale"),
                    "table": getattr(self, prefix + "table"), "lut": getattr(self, prefix + "lut"), "dim": stage.dim,
                    "fields": (lay.idx, lay.sign, lay.amp, lay.deriv, lay.cat, lay.sub, lay.amp_fine)}

        terms = [rbe_term("", self.spec.stage)]
        res = self.spec.residual
        if res.kind == "rbe":
            terms.append(rbe_term("residual_", res.stage))
        elif res.kind == "fp8":
            terms.append({"mode": "fp8", "words": self.residual_weight, "scale": self.residual_scale,
                          "group": res.group_size})
        elif res.kind != "none":
            terms.append({"mode": "int", "words": self.residual_weight, "scale": self.residual_scale,
                          "bits": res.int_bits, "group": res.group_size})
        return terms

    def _kernel_forward(self, x: torch.Tensor) -> torch.Tensor:
        from .kernels.triton_rbe import rbe_linear

        lead = x.shape[:-1]
        signs = self.signs if self.spec.rotation else None
        y = rbe_linear(x.reshape(-1, self.in_features), self._kernel_terms(), signs,
                       self.spec.hadamard_block(self.in_features), self.bias)
        return y.reshape(*lead, self.out_features)

    # ------------------------------------------------------------------ checks and sizes

    def validate(self) -> None:
        """Check a loaded layer: finite scales and tables, unit table rows, clean padding."""
        name = self.__class__.__name__
        stages = [("", self.spec.stage)]
        if self.spec.residual.kind == "rbe":
            stages.append(("residual_", self.spec.residual.stage))
        for prefix, stage in stages:
            for t in ("scale", "table", "lut"):
                v = getattr(self, prefix + t)
                if not torch.isfinite(v.float()).all():
                    raise FormatError(f"{name}: '{prefix}{t}' holds NaN/Inf (tampered checkpoint?)")
            norms = getattr(self, prefix + "table").float().norm(dim=1)
            if not torch.allclose(norms, torch.ones_like(norms), atol=1e-3):
                raise FormatError(f"{name}: '{prefix}table' rows are not unit vectors (tampered checkpoint?)")
            words = getattr(self, prefix + "weight")
            if not padding_is_clean(words, stage.layout.width, self.in_features // stage.dim):
                raise FormatError(f"{name}: '{prefix}weight' has bits set past its last code (tampered checkpoint?)")
        if self.spec.residual.kind in ("int2", "int4", "int8", "fp8"):
            if not torch.isfinite(self.residual_scale.float()).all():
                raise FormatError(f"{name}: 'residual_scale' holds NaN/Inf (tampered checkpoint?)")
            if self.spec.residual.kind == "fp8" and not torch.isfinite(self.residual_weight.float()).all():
                raise FormatError(f"{name}: 'residual_weight' holds NaN (tampered checkpoint?)")

    def storage_bits(self, include_tables: bool | None = None) -> int:
        """Bits this layer stores for its weight (codes, scales, seed, residual; tables if owned)."""
        include_tables = self.owns_table if include_tables is None else include_tables
        tables = {"table", "lut", "residual_table", "residual_lut"}
        bits = 0
        for name, p in self.named_parameters(recurse=False):
            if name == "bias" or (name in tables and not include_tables):
                continue
            bits += p.numel() * p.element_size() * 8
        return bits

    @property
    def bits_per_weight(self) -> float:
        return self.storage_bits(include_tables=False) / (self.in_features * self.out_features)

    def extra_repr(self) -> str:
        st = self.spec.stage
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"dim={st.dim}, code_bits={st.layout.width}, residual={self.spec.residual.kind}, "
            f"bpw={self.bits_per_weight:.3f}, format=v{FORMAT_VERSION}"
        )


def dense_linear(layer: nn.Linear) -> nn.Linear:
    """A plain ``nn.Linear`` holding ``layer.dequantize()`` and its bias (any packed layer)."""
    lin = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                    device=layer.weight.device, dtype=layer.compute_dtype)
    lin.weight.data.copy_(layer.dequantize())
    if layer.bias is not None:
        lin.bias.data.copy_(layer.bias.data)
    return lin


def quantize_weight(
    weight: torch.Tensor, spec: LayerSpec, tables: LayerTables | None, rotation_seed: int = 0
) -> dict[str, torch.Tensor]:
    """Stored tensors for one weight, including ``table``/``lut`` (per-layer or universal)."""
    if tables is None:
        w_rot = rotate_weight(weight, spec, rotation_seed)
        stage_tables = layer_tables(w_rot, spec.stage, spec.table_seed)
        res_tables = None
        if spec.residual.kind == "rbe":
            from .codec.rbe import universal_tables

            res_tables = universal_tables(spec.residual.stage, spec.table_seed + 1)
        tables = LayerTables(stage_tables, res_tables)
    out = encode_layer(weight, spec, tables, rotation_seed)
    dev = weight.device
    out["table"], out["lut"] = tables.stage.table.to(dev), tables.stage.lut.to(dev)
    if tables.residual is not None:
        out["residual_table"], out["residual_lut"] = tables.residual.table.to(dev), tables.residual.lut.to(dev)
    return out


def link_shared_tables(model: nn.Module) -> int:
    """Give every non-owner RBELinear the table of its owner; returns the number of layers linked."""
    owners: dict[str, RBELinear] = {}
    layers = [m for m in model.modules() if isinstance(m, RBELinear)]
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
        names = ["table", "lut"] + (["residual_table", "residual_lut"] if m.spec.residual.kind == "rbe" else [])
        for n in names:
            setattr(m, n, getattr(owner, n).detach().to(m.weight.device))
        linked += 1
    return linked
