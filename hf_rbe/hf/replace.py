"""Which layers become packed layers, and how: the one skip policy, the layer factory, the swap.

Quantize-on-load, loading saved checkpoints, ``quantize_model`` and calibration all go through
:func:`modules_to_skip` and :class:`LayerFactory`, so every path converts the same layers the
same way.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Iterable, Mapping

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D
from transformers.quantizers.base import get_keys_to_not_convert
from transformers.quantizers.quantizers_utils import should_convert_module

from ..core.errors import ConfigError, EncodingError, FormatError
from ..core.format import LayerSpec
from ..core.format_v2 import LayerSpecV2
from ..core.ldlq import DAMP
from ..core.packed import PackedLinear
from ..core.rbe_codecs import codec_for
from ..core.rbe_embedding import RBEEmbedding
from ..core.rbe_linear import RBELinear
from ..core.seed64_format import Seed64Spec
from ..core.seed64_linear import Seed64Linear
from ..core.stored import StoredEmbedding
from .config import RBEConfig

logger = logging.getLogger(__name__)

#: Task heads (sequence/token classification, reward scores, extractive QA) usually arrive
#: untrained from ``from_pretrained`` and are what fine-tuning trains: kept in full precision.
TASK_HEADS = ("classifier", "score", "qa_outputs")


def modules_to_skip(model: nn.Module, config: RBEConfig, extra: Iterable[str] = ()) -> list[str]:
    """Module names or patterns kept in full precision: transformers' default skips (LM head,
    tied embeddings, the last module), the model's fp32 modules, task heads, the config's
    ``modules_to_not_convert`` and ``extra``. The only skip policy in hf-rbe."""
    skips = list(TASK_HEADS) + list(config.modules_to_not_convert or []) + list(extra)
    if isinstance(model, PreTrainedModel):
        defaults = get_keys_to_not_convert(model)
        if config.quantize_embeddings:  # the output head is coded too (a tied embedding then reads its codes)
            defaults = [k for k in defaults if k != output_head(model)]
        skips += defaults + list(getattr(model, "_keep_in_fp32_modules", None) or [])
    return sorted(set(skips))


def model_part(model: nn.Module, method: str) -> nn.Module | None:
    """``model.get_input_embeddings()`` and the like, or ``None`` where the model has none."""
    try:
        return getattr(model, method)()
    except (AttributeError, NotImplementedError):
        return None


def module_name(model: nn.Module, module: nn.Module | None) -> str | None:
    """The name of ``module`` inside ``model`` (``None`` if it is not there)."""
    return None if module is None else next((n for n, m in model.named_modules() if m is module), None)


def output_head(model: nn.Module) -> str | None:
    """Name of the model's output head (transformers' ``get_output_embeddings``) when it is a Linear."""
    head = model_part(model, "get_output_embeddings")
    return module_name(model, head) if isinstance(head, nn.Linear) else None


def tied_embedding(model: nn.Module, config: RBEConfig) -> tuple[str, str] | None:
    """(head, input embedding) names when ``config.quantize_embeddings`` codes a head that the input
    embedding is tied to: the same parameter, or tied by transformers' mapping (a model being loaded
    is tied only once its weights are in)."""
    head_name = output_head(model) if config.quantize_embeddings else None
    emb = model_part(model, "get_input_embeddings")
    if head_name is None or type(emb) not in (nn.Embedding, StoredEmbedding):
        return None
    emb_name = module_name(model, emb)
    if emb_name is None:
        return None
    tied = emb.weight is getattr(model.get_submodule(head_name), "weight", None)
    return (head_name, emb_name) if tied or _tie_targets(model, (head_name, emb_name)) else None


def _tie_targets(model: nn.Module, names: tuple[str, str]) -> list[str]:
    """The entries of transformers' tying map (``target -> source``) that tie these two modules' weights."""
    pair = {f"{names[0]}.weight", f"{names[1]}.weight"}
    return [t for t, s in (getattr(model, "all_tied_weights_keys", None) or {}).items() if {t, s} == pair]


def share_head_codes(model: nn.Module, names: tuple[str, str]) -> bool:
    """Make the tied input embedding ``names[1]`` an :class:`RBEEmbedding` reading the codes of the
    RBE head ``names[0]`` (a head the format could not hold stays float, and so does the embedding),
    and take the pair out of transformers' tying (it would tie the head to a parameter that no
    longer exists). Returns whether it did."""
    head_name, emb_name = names
    head, emb = model.get_submodule(head_name), model.get_submodule(emb_name)
    if isinstance(emb, RBEEmbedding) and emb.head is head:
        return True
    if not isinstance(head, RBELinear):
        return False
    model.set_submodule(emb_name, RBEEmbedding(head, getattr(model.get_submodule(emb_name), "padding_idx", None)))
    for target in _tie_targets(model, names):
        del model.all_tied_weights_keys[target]
    return True


def _shape(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear or a GPT-2 Conv1D (whose weight is [in, out])."""
    if isinstance(module, Conv1D):
        in_f, out_f = module.weight.shape
        return in_f, out_f
    return module.in_features, module.out_features


def eligible(model: nn.Module, modules_to_not_convert: Iterable[str]) -> list[tuple[str, nn.Module]]:
    """(name, module) of every Linear / Conv1D the skip list leaves for conversion."""
    skip = list(modules_to_not_convert)
    return [(name, m) for name, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))
            and not isinstance(m, PackedLinear) and should_convert_module(name, skip)]


class LayerFactory:
    """Builds the empty packed layer that replaces a Linear / Conv1D (``modules``: every layer the
    factory may build, by name, in module order). Of the layers that use one universal table set,
    the first in module order owns it (stores it in the checkpoint) whatever order they are built
    in (calibration builds block by block), so every path writes and reads the same checkpoint;
    the others follow it (``RBELinear.follow``)."""

    def __init__(self, config: RBEConfig, modules: Mapping[str, nn.Module]) -> None:
        self.config = config
        self.owner_of: dict[str, str] = {}  # table key -> name of the layer that stores it
        for name, module in modules.items():
            fmt, _ = self._format(name, module)
            key = None if fmt is None else self._table_key(fmt)
            if key is not None:
                self.owner_of.setdefault(key, name)
        self.owners: dict[str, RBELinear] = {}  # table key -> the owner, once built

    def _format(self, name: str, module: nn.Module) -> tuple[LayerSpec | LayerSpecV2 | Seed64Spec | None, str]:
        """The layer's format, or ``None`` and why when the format cannot hold its shape."""
        fmt = self.config.layer_format(name)
        in_f, out_f = _shape(module)
        try:
            fmt.check_shape(out_f, in_f)
        except EncodingError as err:
            return None, str(err)
        return fmt, ""

    def _table_key(self, fmt: LayerSpec | LayerSpecV2 | Seed64Spec) -> str | None:
        rbe = fmt.residual if isinstance(fmt, Seed64Spec) else fmt
        return None if self.config.table == "per_layer" or rbe is None else codec_for(rbe).table_key(rbe)

    def build(self, name: str, module: nn.Module) -> PackedLinear | None:
        """The packed layer for ``module`` (``None``, with a warning, if the format cannot hold its shape)."""
        fmt, why = self._format(name, module)
        if fmt is None:
            logger.warning("hf-rbe: keeping %s unquantized: %s", name, why)
            return None
        key = self._table_key(fmt)
        owns = key is None or self.owner_of.get(key) == name
        kw = {"compute_dtype": module.weight.dtype if module.weight.is_floating_point() else torch.float32,
              "device": module.weight.device, "from_conv1d": isinstance(module, Conv1D),
              "rotation_seed": self.config.layer_rotation_seed(name)}
        in_f, out_f = _shape(module)
        owner = None if owns or key is None else self.owners.get(key)
        if isinstance(fmt, Seed64Spec):
            layer = Seed64Linear(in_f, out_f, module.bias is not None, fmt, residual_table_key=key,
                                 residual_owns_table=owns, **kw)
            rbe = layer.residual
            if rbe is not None and owner is not None:
                rbe.follow(owner)
        else:
            layer = rbe = RBELinear(in_f, out_f, module.bias is not None, fmt, table_key=key, owns_table=owns,
                                    table_owner=owner, **kw)
        if owns and key is not None:
            self.owners[key] = rbe  # type: ignore[assignment]
        return layer


def build_layers(model: nn.Module, config: RBEConfig,
                 modules_to_not_convert: Iterable[str] = ()) -> dict[str, PackedLinear]:
    """The empty packed layer for every eligible Linear/Conv1D (on its device, meta included), by
    name, built in module order (which layer stores each shared table follows that order, on
    every path). Layers whose shape the format cannot hold are left out, with a warning."""
    modules = dict(eligible(model, modules_to_not_convert))
    factory = LayerFactory(config, modules)
    built = {name: factory.build(name, module) for name, module in modules.items()}
    return {name: layer for name, layer in built.items() if layer is not None}


def replace_with_rbe_linear(model: nn.Module, config: RBEConfig,
                            modules_to_not_convert: Iterable[str] = ()) -> list[str]:
    """Replace every eligible Linear/Conv1D (on any device, meta included) by an empty packed layer.

    Layers whose shape the format cannot hold stay as they are, with a warning. Returns the
    names of the replaced modules.
    """
    layers = build_layers(model, config, modules_to_not_convert)
    for name, new in layers.items():
        model.set_submodule(name, new)
    check_replaced(config, list(layers))
    return list(layers)


def check_replaced(config: RBEConfig, replaced: list[str]) -> None:
    """Warn when nothing was converted, or an override matches none of the converted layers."""
    if not replaced:
        logger.warning("hf-rbe: no Linear layer was converted; check modules_to_not_convert and shapes")
    for pattern in config.overrides:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in replaced):
            logger.warning("hf-rbe: override %r matches none of the converted layers (e.g. %s); it has no effect",
                           pattern, replaced[0] if replaced else "none")


def float_weight(module: nn.Module) -> torch.Tensor:
    """The [out, in] weight of a Linear, or of a GPT-2 Conv1D (which stores [in, out])."""
    w = module.weight.detach()
    return w.T if isinstance(module, Conv1D) else w


def initial_tables(layer: PackedLinear) -> dict[str, torch.Tensor] | None:
    """The tables a fresh layer encodes against: the universal ones, or ``None`` (per-layer)."""
    rbe = layer.residual if isinstance(layer, Seed64Linear) else layer
    return None if rbe is None else rbe.universal_tables()


def encode_weight(layer: PackedLinear, weight: torch.Tensor, name: str, hessian: torch.Tensor | None = None,
                  damp: float = DAMP) -> dict[str, torch.Tensor]:
    """``layer.encode`` with the tables of a fresh layer (and calibration statistics when given);
    errors name the layer."""
    try:
        if hessian is None:
            return layer.encode(weight, initial_tables(layer))
        if not isinstance(layer, RBELinear):
            raise ConfigError("calibration encodes RBE layers; seed64 has no output-aware encoder")
        if not torch.isfinite(hessian).all():
            raise EncodingError("its calibration inputs hold NaN/Inf values (the model's activations before this "
                                "layer are not finite): check the model's weights, or compute in fp32")
        return layer.encode(weight, initial_tables(layer), hessian=hessian, damp=damp)
    except FormatError as err:  # the same kind of error, naming the layer
        raise type(err)(f"{name}: {err}") from err
    except torch.linalg.LinAlgError as err:
        raise EncodingError(f"{name}: its calibration Hessian is not positive-definite even damped by "
                            f"damp_percent={damp}: raise damp_percent ({err})") from err


def encode_into(layer: PackedLinear, module: nn.Module, name: str, hessian: torch.Tensor | None = None,
                damp: float = DAMP) -> None:
    """Encode the float ``module``'s weight into ``layer`` (:func:`encode_weight`) and copy its bias."""
    layer.load_packed(encode_weight(layer, float_weight(module), name, hessian, damp))
    if module.bias is not None:
        layer.bias.data.copy_(module.bias.detach())


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the model computes in: its config's (a saved config holds it as a name), else its
    packed layers' (a packed layer's first parameters are fp16 scales, and a coded head shared with
    the input embedding can come first), else its first floating parameter's."""
    dtype = getattr(getattr(model, "config", None), "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    if isinstance(dtype, torch.dtype):
        return dtype
    packed = next((m.compute_dtype for m in model.modules() if isinstance(m, PackedLinear)), None)
    return packed or next(p.dtype for p in model.parameters() if p.is_floating_point())
