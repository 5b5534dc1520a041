"""Which layers become packed layers, and how: the one skip policy, the swap, ``quantize_model``.

The quantizer (quantize-on-load and loading saved checkpoints) and :func:`quantize_model` (a
model already in memory) both go through :func:`modules_to_skip` and
:func:`replace_with_rbe_linear`, so the two paths convert exactly the same layers.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D
from transformers.quantizers.base import get_keys_to_not_convert
from transformers.quantizers.quantizers_utils import should_convert_module

from ..core.packed import PackedLinear
from ..core.rbe_codecs import codec_for
from ..core.rbe_linear import RBELinear, link_shared_tables
from ..core.seed64_format import Seed64Spec
from ..core.seed64_linear import Seed64Linear
from ..core.spec import FormatError
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
        skips += get_keys_to_not_convert(model) + list(getattr(model, "_keep_in_fp32_modules", None) or [])
    return sorted(set(skips))


def _shape(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear or a GPT-2 Conv1D (whose weight is [in, out])."""
    if isinstance(module, Conv1D):
        in_f, out_f = module.weight.shape
        return in_f, out_f
    return module.in_features, module.out_features


def replace_with_rbe_linear(model: nn.Module, config: RBEConfig,
                            modules_to_not_convert: Iterable[str] = ()) -> list[str]:
    """Replace every eligible Linear/Conv1D (on any device, meta included) by an empty packed layer.

    Layers whose shape the format cannot hold stay as they are, with a warning. Returns the
    names of the replaced modules. The first layer using each universal table owns it.
    """
    skip = list(modules_to_not_convert)
    owners: set[str] = set()
    replaced = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, (nn.Linear, Conv1D)) or isinstance(module, PackedLinear):
            continue
        if not should_convert_module(name, skip):
            continue
        fmt = config.layer_format(name)
        in_f, out_f = _shape(module)
        try:
            fmt.check_shape(out_f, in_f)
        except FormatError as err:
            logger.warning("hf-rbe: keeping %s unquantized: %s", name, err)
            continue
        rbe = fmt.residual if isinstance(fmt, Seed64Spec) else fmt
        key = None if config.table == "per_layer" or rbe is None else codec_for(rbe).table_key(rbe)
        owns = key is None or key not in owners
        if key is not None:
            owners.add(key)
        kw = {"compute_dtype": module.weight.dtype if module.weight.is_floating_point() else torch.float32,
              "device": module.weight.device, "from_conv1d": isinstance(module, Conv1D),
              "rotation_seed": config.layer_rotation_seed(name)}
        if not isinstance(fmt, Seed64Spec):
            new: PackedLinear = RBELinear(in_f, out_f, module.bias is not None, fmt, table_key=key, owns_table=owns,
                                          **kw)
        else:
            new = Seed64Linear(in_f, out_f, module.bias is not None, fmt, residual_table_key=key,
                               residual_owns_table=owns, **kw)
        model.set_submodule(name, new)
        replaced.append(name)
    if not replaced:
        logger.warning("hf-rbe: no Linear layer was converted; check modules_to_not_convert and shapes")
    return replaced


def initial_tables(layer: PackedLinear) -> dict[str, torch.Tensor] | None:
    """The tables a fresh layer encodes against: the universal ones, or ``None`` (per-layer)."""
    rbe = layer.residual if isinstance(layer, Seed64Linear) else layer
    return None if rbe is None else rbe.universal_tables()


def encode_weight(layer: PackedLinear, weight: torch.Tensor, name: str) -> dict[str, torch.Tensor]:
    """``layer.encode`` with the tables of a fresh layer; errors name the layer."""
    try:
        return layer.encode(weight, initial_tables(layer))
    except FormatError as err:
        raise FormatError(f"{name}: {err}") from err


def quantize_model(model: nn.Module, config: RBEConfig | None = None,
                   modules_to_not_convert: Iterable[str] = ()) -> nn.Module:
    """Quantize an already-loaded model in place (outside ``from_pretrained``), with a progress bar.

    The layers converted are those ``from_pretrained(..., quantization_config=config)`` would
    convert (:func:`modules_to_skip`), plus ``modules_to_not_convert`` kept as they are.
    """
    config = config or RBEConfig()
    originals = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))}
    names = replace_with_rbe_linear(model, config, modules_to_skip(model, config, modules_to_not_convert))
    for name in tqdm(names, desc="RBE-encoding layers", unit="layer"):
        layer: PackedLinear = model.get_submodule(name)
        old = originals[name]
        weight = old.weight.detach().T if isinstance(old, Conv1D) else old.weight.detach()
        layer.load_packed(encode_weight(layer, weight, name))
        if old.bias is not None:
            layer.bias.data.copy_(old.bias.detach())
    link_shared_tables(model)
    return model
