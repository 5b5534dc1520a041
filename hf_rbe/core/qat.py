"""``RBEQATLinear``: the trainable twin of an ``RBELinear`` (paper 002's straight-through estimator).

``prepare_qat(model)`` swaps every ``RBELinear`` for an ``RBEQATLinear``: a trainable float
``weight`` (the latent weight, started from the decoded codes or from the original float
weights) next to frozen codes. The forward pass uses the decoded codes, and the gradient
reaches the latent weight unchanged (straight-through)::

    w_eff = latent + stopgrad(decode(codes) - latent)      # value: decode(codes); d/d latent: 1

The codes are refreshed from the latent weight by :func:`reencode` (``hf_rbe.training``'s
``ReencodeCallback`` does it every few optimizer steps), so training sees the quantizer it
will be frozen with. :func:`freeze` re-encodes once more and puts plain ``RBELinear`` layers
back, ready for ``save_pretrained``.

With ``train_quantizer=True`` the quantizer's float parts train too: each layer's per-group
scales (float32 copies), and the basis tables and gain curves (one trainable copy per table,
shared by every layer that decodes with it). The forward pass then decodes on every step::

    w_eff = decode(codes; scales, tables) + latent - stopgrad(latent)

so the codes (integers) stay fixed between re-encodings while the gradient reaches the
latent weight (straight-through) and the scales and tables (exactly). Re-encoding uses the
trained tables and refits the scales to the new codes; ``freeze`` does not re-encode: it
stores the codes with the trained scales and tables, the function training optimised.
Plain torch: the transformers side (``RBEConfig(qat=True)``, Trainer callbacks) lives above.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .rbe_embedding import RBEEmbedding
from .rbe_linear import RBELinear, swap_layers
from .seed64_linear import Seed64Linear
from .spec import edit_stamp


class TrainableTables(nn.Module):
    """Float32 trainable copies of the basis tables and gain curves one or more layers decode with."""

    def __init__(self, codes: RBELinear) -> None:
        super().__init__()
        self._constrain = codes.codec.constrain
        for name in codes.table_names():
            setattr(self, name, nn.Parameter(getattr(codes, name).detach().float().clone()))

    def tables(self) -> dict[str, torch.Tensor]:
        """The tables as the decoder sees them, by name: the trained values mapped back into what
        the format allows (v1: unit basis rows, so training moves directions, not lengths)."""
        return self._constrain(dict(self.named_parameters()))


class RBEQATLinear(nn.Linear):
    """A Linear trained through RBE codes: latent float ``weight`` + frozen ``codes`` (an RBELinear)."""

    def __init__(self, codes: RBELinear, latent: torch.Tensor | None = None,
                 tables: TrainableTables | None = None, owns_tables: bool = True) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = codes.in_features, codes.out_features
        self.codes = codes
        init = codes.dequantize(torch.float32) if latent is None else latent.detach().float()
        self.weight = nn.Parameter(init.to(codes.compute_dtype).clone())
        self.bias = codes.bias
        if self.bias is not None:
            self.bias.requires_grad_(True)
        codes.bias = None  # the bias lives here while training
        self.train_quantizer = tables is not None
        if tables is not None:
            for name in self._scale_names():
                setattr(self, name, nn.Parameter(getattr(codes, name).detach().float().clone()))
            if owns_tables:
                self.tables = tables
            else:  # registered once, on the owner; a list keeps it out of this layer's state dict
                self._shared_tables = [tables]

    def _scale_names(self) -> list[str]:
        return [n for n in self.codes.spec.tensors(0, 0) if n.endswith("scale")]

    def trainable_tables(self) -> TrainableTables:
        return self.tables if "tables" in self._modules else self._shared_tables[0]

    def trainable_scales(self) -> list[nn.Parameter]:
        return [getattr(self, n) for n in self._scale_names()] if self.train_quantizer else []

    def decoded_trainable(self) -> torch.Tensor:
        """The decoded weight as a differentiable function of the scales and tables."""
        overrides = {n: getattr(self, n) for n in self._scale_names()}
        overrides.update(self.trainable_tables().tables())
        return self.codes.dequantize(self.weight.dtype, overrides)

    def _decoded(self) -> torch.Tensor:
        """``codes.dequantize()``, decoded again only when the codes change (re-encoding,
        ``load_state_dict`` or a device move), not on every forward pass."""
        stored = [*self.codes.parameters(), *self.codes.buffers()]  # buffers: linked shared tables, signs
        key = tuple((t.data_ptr(), edit_stamp(t)) for t in stored) + (self.weight.dtype,)
        if getattr(self, "_cache_key", None) != key:
            self._cache = self.codes.dequantize(self.weight.dtype)
            self._cache_key = key
        return self._cache

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.train_quantizer:
            w = self.decoded_trainable() + (self.weight - self.weight.detach())
        else:
            w = straight_through(self.weight, self._decoded())
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    @torch.no_grad()
    def reencode(self) -> None:
        """Encode the current latent weight into the codes (same spec, rotation seed, and table:
        the trained one with ``train_quantizer``, whose scales are then refitted to the codes)."""
        stats = calibration_statistics(self.codes)
        if not self.train_quantizer:
            self.codes.load_packed(self.codes.encode(self.weight.detach().float(), **stats))
            return
        tables = {n: t.detach() for n, t in self.trainable_tables().tables().items()}
        self.codes.load_packed(self.codes.encode(self.weight.detach().float(), tables=tables, **stats))
        for name in self._scale_names():
            getattr(self, name).copy_(getattr(self.codes, name).float())

    @torch.no_grad()
    def _write_trained(self) -> None:
        """Trained scales (to fp16) and, on the table's owner, trained tables into the codes."""
        for name in self._scale_names():
            getattr(self.codes, name).copy_(getattr(self, name))
        trained = any(p.requires_grad for p in self.trainable_tables().parameters())
        if self.codes.owns_table and trained:  # tables held fixed (calibration fine-tuning) stay as stored
            for name, t in self.trainable_tables().tables().items():
                getattr(self.codes, name).copy_(t)
        self.codes.rebuild_buffers()

    def to_rbe(self) -> RBELinear:
        """The packed layer: re-encoded from the latent weight, or, with ``train_quantizer``,
        the codes as they are with the trained scales and tables (what training optimised;
        a re-encode would refit the scales and drop that)."""
        if self.train_quantizer:
            self._write_trained()
        else:
            self.reencode()
        self.codes.bias = self.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)
        return self.codes


def calibration_statistics(layer: nn.Module) -> dict[str, torch.Tensor]:
    """``{"hessian": H}`` for a layer that calibration left its statistics on
    (``keep_calibration_statistics=True``), else ``{}``: re-encoding stays output-aware."""
    h = getattr(layer, "calibration_hessian", None)
    return {} if h is None else {"hessian": h.float()}


def straight_through(latent: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
    """``quantized`` in the forward pass, identity gradient to ``latent`` in the backward pass."""
    return latent + (quantized - latent).detach()


def _qat_targets(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """RBE layers and QAT layers of ``model``, each once (not the codes inside a QAT layer). A head
    whose codes a tied input embedding reads stays frozen: its codes serve both."""
    found: list[tuple[str, nn.Module]] = []
    shared = {id(m.head) for m in model.modules() if isinstance(m, RBEEmbedding)}
    for name, m in model.named_modules():
        if id(m) in shared:
            continue
        inside = any(name.startswith(p + ".") for p, _ in found)
        if isinstance(m, Seed64Linear):
            raise ValueError(f"{name} is a seed64 layer: QAT trains RBE codes only (codec='rbe')")
        if isinstance(m, (RBELinear, RBEQATLinear)) and not inside:
            found.append((name, m))
    return found


def prepare_qat(model: nn.Module, latent_from: nn.Module | None = None, train_quantizer: bool = False) -> nn.Module:
    """Swap every ``RBELinear`` of ``model`` for an ``RBEQATLinear`` (in place; QAT layers stay).

    ``latent_from``: an unquantized copy of the model whose float weights start the latent
    weights (better than the decoded codes: nothing is lost before training starts).
    ``train_quantizer``: also train scales, gain curves and basis tables (module docstring).
    """
    source = dict(latent_from.named_modules()) if latent_from is not None else {}
    shared: dict[str, TrainableTables] = {}  # table_key -> the one trainable copy of that table
    layers = _qat_targets(model)
    swaps: dict[str, RBEQATLinear] = {}
    if train_quantizer:  # owners first, so that every shared table is copied from its stored values
        layers.sort(key=lambda nm: not (isinstance(nm[1], RBELinear) and nm[1].owns_table))
    for name, module in layers:
        src = source.get(name)
        latent = src.weight if src is not None and hasattr(src, "weight") else None
        codes = module.codes if isinstance(module, RBEQATLinear) else module
        if latent is not None and codes.from_conv1d:
            latent = latent.T
        if isinstance(module, RBEQATLinear):  # already in QAT mode: only restart the latent weight
            if latent is not None:
                with torch.no_grad():
                    module.weight.copy_(latent)
            continue
        tables, owns = None, True
        if train_quantizer:
            if codes.table_key is None:
                tables = TrainableTables(codes)
            else:
                owns = codes.table_key not in shared
                tables = shared.setdefault(codes.table_key, TrainableTables(codes))
        swaps[name] = RBEQATLinear(module, latent, tables, owns)
    swap_layers(model, swaps)
    return model


def quantizer_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable scales and tables of ``train_quantizer`` QAT layers (for their own
    optimizer group: they start near their optimum and want another learning rate)."""
    params: dict[int, nn.Parameter] = {}
    for module in model.modules():
        if isinstance(module, RBEQATLinear) and module.train_quantizer:
            for p in [*module.trainable_scales(), *module.trainable_tables().parameters()]:
                params[id(p)] = p
    return list(params.values())


@torch.no_grad()
def reencode(model: nn.Module, progress: bool = False) -> int:
    """Re-encode every QAT layer from its latent weight; returns how many."""
    layers = [m for m in model.modules() if isinstance(m, RBEQATLinear)]
    for layer in tqdm(layers, desc="re-encoding", unit="layer", disable=not progress):
        layer.reencode()
    return len(layers)


def freeze(model: nn.Module) -> nn.Module:
    """Put packed ``RBELinear`` layers back (for saving): re-encoded, or with the trained scales
    and tables. The saved config says ``qat=False``: a frozen checkpoint reloads as packed
    codes, not as a new QAT run."""
    swap_layers(model, {name: module.to_rbe() for name, module in list(model.named_modules())
                        if isinstance(module, RBEQATLinear)})
    cfg = getattr(getattr(model, "config", None), "quantization_config", None)
    if cfg is not None and getattr(cfg, "qat", False):
        cfg.qat = cfg.qat_train_quantizer = False
    return model
