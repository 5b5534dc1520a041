"""Quantization-aware training (paper 002's straight-through estimator) through ``Trainer``.

``prepare_qat(model)`` swaps every ``RBELinear`` for an ``RBEQATLinear``: a trainable float
``weight`` (the latent weight, started from the decoded codes or from the original float
weights) next to frozen codes. The forward pass uses the decoded codes, and the gradient
reaches the latent weight unchanged (straight-through):

    w_eff = latent + stopgrad(decode(codes) - latent)      # value: decode(codes); d/d latent: 1

The codes are refreshed from the latent weight by ``reencode`` (every ``reencode_every``
optimizer steps with ``ReencodeCallback``), so training sees the quantizer it will be
frozen with. ``freeze(model)`` re-encodes once more and puts plain ``RBELinear`` layers back,
ready for ``save_pretrained``.

With ``train_quantizer=True`` the quantizer's float parts train too: each layer's per-group
scales (float32 copies), and the basis tables and gain curves (one trainable copy per table,
shared by every layer that decodes with it). The forward pass then decodes on every step,

    w_eff = decode(codes; scales, tables) + latent - stopgrad(latent)

so the codes (integers) stay fixed between re-encodings while the gradient reaches the
latent weight (straight-through) and the scales and tables (exactly). Re-encoding uses the
trained tables and refits the scales to the new codes; ``freeze`` does not re-encode: it
stores the codes with the trained scales and tables, the function training optimised. ``RBEConfig(qat=True)`` makes the quantizer call
``prepare_qat`` after loading and tells ``Trainer`` the model is trainable without PEFT.
"""

from __future__ import annotations

import logging
import time

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import Trainer, TrainerCallback

from .codec.rbe import LayerTables, StageTables
from .modules import RBELinear, link_shared_tables

_TABLES = ("table", "lut", "residual_table", "residual_lut")


class TrainableTables(nn.Module):
    """Float32 trainable copies of the basis tables and gain curves one or more layers decode with."""

    def __init__(self, codes: RBELinear) -> None:
        super().__init__()
        for name in _TABLES:
            if hasattr(codes, name):
                setattr(self, name, nn.Parameter(getattr(codes, name).detach().float().clone()))

    def tables(self) -> LayerTables:
        """The tables as the decoder sees them: basis rows renormalised to unit length (the
        format's invariant, checked on load), so training moves directions, not lengths."""
        res = None
        if hasattr(self, "residual_table"):
            res = StageTables(F.normalize(self.residual_table, dim=-1), self.residual_lut)
        return LayerTables(StageTables(F.normalize(self.table, dim=-1), self.lut), res)

logger = logging.getLogger(__name__)


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
            self.scale = nn.Parameter(codes.scale.detach().float().clone())
            if hasattr(codes, "residual_scale"):
                self.residual_scale = nn.Parameter(codes.residual_scale.detach().float().clone())
            if owns_tables:
                self.tables = tables
            else:  # registered once, on the owner; a list keeps it out of this layer's state dict
                self._shared_tables = [tables]

    def _trainable_tables(self) -> TrainableTables:
        return self.tables if "tables" in self._modules else self._shared_tables[0]

    def _decoded_trainable(self) -> torch.Tensor:
        """The decoded weight as a differentiable function of the scales and tables."""
        scales = {"scale": self.scale}
        if hasattr(self, "residual_scale"):
            scales["residual_scale"] = self.residual_scale
        return self.codes.dequantize(self.weight.dtype, scales, self._trainable_tables().tables())

    def _decoded(self) -> torch.Tensor:
        """``codes.dequantize()``, decoded again only when the codes change (re-encoding,
        ``load_state_dict`` or a device move), not on every forward pass."""
        stored = [*self.codes.parameters(), *self.codes.buffers()]  # buffers: linked shared tables, signs
        key = tuple((t.data_ptr(), t._version) for t in stored) + (self.weight.dtype,)
        if getattr(self, "_cache_key", None) != key:
            self._cache = self.codes.dequantize(self.weight.dtype)
            self._cache_key = key
        return self._cache

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.train_quantizer:
            w = self._decoded_trainable() + (self.weight - self.weight.detach())
        else:
            w = straight_through(self.weight, self._decoded())
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    @torch.no_grad()
    def reencode(self) -> None:
        """Encode the current latent weight into the codes (same spec, rotation seed, and table:
        the trained one with ``train_quantizer``, whose scales are then refitted to the codes)."""
        if not self.train_quantizer:
            self.codes.load_packed(self.codes.encode(self.weight.detach().float()))
            return
        trained = self._trainable_tables()
        live = trained.tables()
        tables = LayerTables(StageTables(live.stage.table.detach(), live.stage.lut.detach()),
                             None if live.residual is None else
                             StageTables(live.residual.table.detach(), live.residual.lut.detach()))
        self.codes.load_packed(self.codes.encode(self.weight.detach().float(), tables=tables))
        self.scale.copy_(self.codes.scale.float())
        if hasattr(self, "residual_scale"):
            self.residual_scale.copy_(self.codes.residual_scale.float())

    @torch.no_grad()
    def _write_trained(self) -> None:
        """Trained scales (to fp16) and, on the table's owner, trained tables into the codes."""
        self.codes.scale.copy_(self.scale)
        if hasattr(self, "residual_scale"):
            self.codes.residual_scale.copy_(self.residual_scale)
        if self.codes.owns_table:
            live = self._trainable_tables().tables()
            stages = [("", live.stage)] + ([("residual_", live.residual)] if live.residual is not None else [])
            for prefix, st in stages:
                getattr(self.codes, prefix + "table").copy_(st.table)
                getattr(self.codes, prefix + "lut").copy_(st.lut)
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


def straight_through(latent: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
    """``quantized`` in the forward pass, identity gradient to ``latent`` in the backward pass."""
    return latent + (quantized - latent).detach()


def prepare_qat(model: nn.Module, latent_from: nn.Module | None = None, train_quantizer: bool = False) -> nn.Module:
    """Swap every ``RBELinear`` of ``model`` for an ``RBEQATLinear`` (in place; QAT layers stay).

    ``latent_from``: an unquantized copy of the model whose float weights start the latent
    weights (better than the decoded codes: nothing is lost before training starts).
    ``train_quantizer``: also train scales, gain curves and basis tables (module docstring).
    """
    source = dict(latent_from.named_modules()) if latent_from is not None else {}
    shared: dict[str, TrainableTables] = {}  # table_key -> the one trainable copy of that table
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (RBELinear, RBEQATLinear)) and not n.endswith(".codes")]
    if train_quantizer:  # owners first, so that every shared table is copied from its stored values
        layers.sort(key=lambda nm: not (isinstance(nm[1], RBELinear) and nm[1].owns_table))
    for name, module in layers:
        src = source.get(name)
        latent = src.weight if src is not None and hasattr(src, "weight") else None
        codes = module.codes if isinstance(module, RBEQATLinear) else module
        if latent is not None and getattr(codes, "from_conv1d", False):
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
        model.set_submodule(name, RBEQATLinear(module, latent, tables, owns))
    return model


def quantizer_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable scales and tables of ``train_quantizer`` QAT layers (for their own
    optimizer group: they start near their optimum and want another learning rate)."""
    params: dict[int, nn.Parameter] = {}
    for module in model.modules():
        if isinstance(module, RBEQATLinear) and module.train_quantizer:
            for p in [module.scale, getattr(module, "residual_scale", None), *module._trainable_tables().parameters()]:
                if p is not None:
                    params[id(p)] = p
    return list(params.values())


@torch.no_grad()
def reencode(model: nn.Module, progress: bool = False) -> int:
    layers = [m for m in model.modules() if isinstance(m, RBEQATLinear)]
    for layer in tqdm(layers, desc="re-encoding", unit="layer", disable=not progress):
        layer.reencode()
    return len(layers)


def freeze(model: nn.Module) -> nn.Module:
    """Re-encode every QAT layer and put packed ``RBELinear`` layers back (for saving).

    The saved config says ``qat=False``: a frozen checkpoint reloads as packed codes, not as a
    new QAT run."""
    for name, module in list(model.named_modules()):
        if isinstance(module, RBEQATLinear):
            model.set_submodule(name, module.to_rbe())
    link_shared_tables(model)
    cfg = getattr(getattr(model, "config", None), "quantization_config", None)
    if cfg is not None and getattr(cfg, "qat", False):
        cfg.qat = cfg.qat_train_quantizer = False
    return model


class ReencodeCallback(TrainerCallback):
    """Refresh the codes from the latent weights every ``every`` optimizer steps."""

    def __init__(self, every: int = 10) -> None:
        self.every = every

    def on_step_end(self, args, state, control, model=None, **kwargs):  # type: ignore[no-untyped-def]
        if model is not None and state.global_step % self.every == 0:
            logger.info("re-encoded %d layers at step %d", reencode(model), state.global_step)
        return control


class TimeBudgetCallback(TrainerCallback):
    """Stop training once ``minutes`` of wall time have passed (budgets are stated in minutes)."""

    def __init__(self, minutes: float) -> None:
        self.seconds = minutes * 60
        self.start: float | None = None

    def on_train_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        self.start = time.perf_counter()
        return control

    def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if self.start is not None and time.perf_counter() - self.start > self.seconds:
            control.should_training_stop = True
        return control


class DistillTrainer(Trainer):
    """``Trainer`` whose loss adds KL(teacher || student) on the logits (temperature ``T``)."""

    def __init__(self, *args, teacher: nn.Module, alpha: float = 0.5, temperature: float = 1.0, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.alpha, self.temperature = alpha, temperature

    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):  # type: ignore[no-untyped-def, override]
        out = model(**inputs)
        with torch.no_grad():
            t_logits = self.teacher(**{k: v for k, v in inputs.items() if k != "labels"}).logits
        t = self.temperature
        kd = F.kl_div(F.log_softmax(out.logits / t, -1), F.log_softmax(t_logits / t, -1), log_target=True,
                      reduction="batchmean") * t * t / out.logits.shape[1]
        loss = (1 - self.alpha) * out.loss + self.alpha * kd
        return (loss, out) if return_outputs else loss


__all__ = ["DistillTrainer", "RBEQATLinear", "ReencodeCallback", "TimeBudgetCallback", "TrainableTables", "freeze",
           "prepare_qat", "quantizer_parameters", "reencode", "straight_through"]
