"""transformers glue: swap Linear/Conv1D for ``RBELinear`` and quantize weights as they load.

The stored layout of each layer is documented in ``hf_rbe.format``. This module is the only
place (with ``quantizer.py``) where the package touches transformers' loading machinery.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.core_model_loading import ConversionOps
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D
from transformers.quantizers.quantizers_utils import get_module_from_name, should_convert_module

from .codec.rbe import tables_for, table_key
from .config import RBEConfig
from .format import FormatError
from .modules import RBELinear, link_shared_tables
from .seed64_module import Seed64Linear

logger = logging.getLogger(__name__)


def replace_with_rbe_linear(
    model: nn.Module, config: RBEConfig, modules_to_not_convert: Iterable[str] | None = None
) -> list[str]:
    """Replace every eligible Linear/Conv1D (on any device, meta included) by an empty RBELinear.

    Layers whose shape the format cannot hold stay as they are, with a warning. Returns the
    names of the replaced modules. The first layer using each universal table owns it.
    """
    skip = list(modules_to_not_convert or [])
    owners: set[str] = set()
    replaced = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, (nn.Linear, Conv1D)) or isinstance(module, (RBELinear, Seed64Linear)):
            continue
        if not should_convert_module(name, skip):
            continue
        seed64 = config.codec == "seed64"
        spec = config.seed64_residual_spec(name) if seed64 else config.layer_spec(name)
        if isinstance(module, Conv1D):
            in_f, out_f = module.weight.shape
        else:
            in_f, out_f = module.in_features, module.out_features
        try:
            if seed64 and (in_f % config.tile or out_f % config.tile):
                raise FormatError(f"{out_f}x{in_f} is not a multiple of the seed64 tile {config.tile}")
            if spec is not None:
                spec.check_shape(out_f, in_f)
        except FormatError as err:
            logger.warning("hf-rbe: keeping %s unquantized: %s", name, err)
            continue
        per_layer = config.table == "per_layer"
        key = None if per_layer or spec is None else table_key(spec)
        owns = per_layer or key not in owners
        if key is not None:
            owners.add(key)
        dtype = module.weight.dtype if module.weight.is_floating_point() else torch.float32
        if seed64:
            new: nn.Module = Seed64Linear(
                in_f, out_f, module.bias is not None, config.tile, config.seed64_scale, spec, residual_table_key=key,
                residual_owns_table=owns, compute_dtype=dtype, device=module.weight.device,
                default_rotation_seed=config.layer_rotation_seed(name),
            )
            new.from_conv1d = isinstance(module, Conv1D)
        else:
            new = RBELinear(
                in_f, out_f, module.bias is not None, spec, table_key=key, owns_table=owns, compute_dtype=dtype,
                device=module.weight.device, from_conv1d=isinstance(module, Conv1D),
                default_rotation_seed=config.layer_rotation_seed(name),
            )
        model.set_submodule(name, new)
        replaced.append(name)
    if not replaced:
        logger.warning("hf-rbe: no Linear layer was converted; check modules_to_not_convert and shapes")
    return replaced


def quantize_model(model: nn.Module, config: RBEConfig | None = None, modules_to_not_convert: list[str] | None = None) -> nn.Module:
    """Quantize an already-loaded model in place (outside ``from_pretrained``), with a progress bar.

    Skips are merged as in ``from_pretrained``: transformers' defaults (LM head, tied
    embeddings), task heads, ``modules_to_not_convert`` and the config's own list.
    """
    from transformers.quantizers.base import get_keys_to_not_convert

    config = config or RBEConfig()
    from .quantizer import TASK_HEADS

    skips = (get_keys_to_not_convert(model) if isinstance(model, PreTrainedModel) else []) + list(TASK_HEADS)
    modules_to_not_convert = list(set(skips + list(modules_to_not_convert or []) + list(config.modules_to_not_convert or [])))
    originals = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))}
    names = replace_with_rbe_linear(model, config, modules_to_not_convert)
    for name in tqdm(names, desc="RBE-encoding layers", unit="layer"):
        layer = model.get_submodule(name)
        old = originals[name]
        weight = old.weight.detach().T if isinstance(old, Conv1D) else old.weight.detach()
        encoded = _encode(layer, weight, name)
        if isinstance(layer, Seed64Linear):
            layer.load_encoded(encoded)
        else:
            layer.load_packed(encoded)
        if old.bias is not None:
            layer.bias.data.copy_(old.bias.detach())
    link_shared_tables(model)
    return model


def _encode(layer: RBELinear | Seed64Linear, weight: torch.Tensor, name: str) -> dict[str, torch.Tensor]:
    if isinstance(layer, Seed64Linear):
        res = layer.residual
        try:
            return layer.encode(weight, None if res is None or res.table_key is None else tables_for(res.spec))
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from err
    tables = None if layer.table_key is None else tables_for(layer.spec)
    try:
        return layer.encode(weight, tables, layer.default_rotation_seed)
    except ValueError as err:
        raise ValueError(f"{name}: {err}") from err


class RBEQuantize(ConversionOps):
    """Quantize-on-load: one float ``weight`` in, all of the layer's stored tensors out."""

    def __init__(self, hf_quantizer) -> None:  # type: ignore[no-untyped-def]
        self.hf_quantizer = hf_quantizer

    def convert(self, input_dict: dict, model: nn.Module | None = None, missing_keys=None, **kwargs) -> dict:  # type: ignore[no-untyped-def, override]
        target_key, value = next(iter(input_dict.items()))
        value = value[0] if isinstance(value, list) else value
        layer, _ = get_module_from_name(model, target_key)
        base = target_key.rsplit(".", 1)[0]
        weight = value.T if getattr(layer, "from_conv1d", False) else value
        out = _encode(layer, weight, base)
        result = {f"{base}.{k}": v for k, v in out.items()}
        if missing_keys is not None:
            for k in result:
                missing_keys.discard(k)
        return result
