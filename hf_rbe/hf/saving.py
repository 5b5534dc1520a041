"""What an RBE model does when it is saved: write its model card, record the dtype it computes in.

``attach(model)`` (the quantizer and ``quantize_model`` call it) binds ``save_pretrained`` and the
upload step of ``push_to_hub`` on the instance (other models are untouched; ``copy.deepcopy``
rebinds them to the copy):

- README.md: the RBE card (``card``) after the weights; a README.md the user wrote is kept;
- atomic (``atomic``): the save is written to a staging directory beside the target and swapped
  in only once complete, so a failure or a kill at any point leaves the old checkpoint or the new
  one, and writers of one directory take turns;
- config.json's ``dtype``: transformers records the dtype of the model's first parameter, which
  is the half-precision embedding when ``embedding_dtype`` is set; the model computes in its own
  dtype, so that one is recorded (else a reload would compute in half precision).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.packed import PackedLinear
from .atomic import replace_directory, resolve_target
from .card import replaceable, write_card


def _base_model(model: nn.Module) -> str:
    return getattr(model.config, "_name_or_path", "") or "unknown"


def _still_rbe(model: nn.Module) -> bool:
    """False once ``model.dequantize()`` has made it a plain model (it saves as one, without a card)."""
    return getattr(getattr(model.config, "quantization_config", None), "quant_method", None) == "rbe"


def _save_pretrained(self: nn.Module, save_directory: str | Path, *args: Any, **kwargs: Any) -> Any:
    target = resolve_target(save_directory)  # transformers would only log an error for a file
    if not kwargs.get("is_main_process", True):
        return type(self).save_pretrained(self, save_directory, *args, **kwargs)
    if kwargs.get("push_to_hub") and "repo_id" not in kwargs:
        kwargs["repo_id"] = Path(save_directory).name  # what transformers would derive from the name given
    card = _still_rbe(self) and replaceable(target / "README.md")
    with replace_directory(target) as staging:
        out = type(self).save_pretrained(self, staging, *args, **kwargs)
        _record_compute_dtype(self, staging / "config.json")
        if card:
            write_card(self, staging, base_model=_base_model(self), repo_id=target.name)  # not the staging dir's
    return out


def _record_compute_dtype(model: nn.Module, config_file: Path) -> None:
    # the packed layers know the dtype now (after a .bfloat16()); a dequantized model keeps the last one
    compute = next((m.compute_dtype for m in model.modules() if isinstance(m, PackedLinear)),
                   getattr(model, "rbe_compute_dtype", None))
    if compute is not None and config_file.exists():
        name = str(compute).removeprefix("torch.")
        model.config.dtype = name
        saved = json.loads(config_file.read_text())
        saved["dtype"] = name
        config_file.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")


def _upload_modified_files(self: nn.Module, working_dir: str | Path, repo_id: str, *args: Any, **kwargs: Any) -> Any:
    if _still_rbe(self) and replaceable(Path(working_dir) / "README.md"):
        write_card(self, working_dir, base_model=_base_model(self), repo_id=repo_id)
    return type(self)._upload_modified_files(self, working_dir, repo_id, *args, **kwargs)


def attach(model: nn.Module, compute_dtype: torch.dtype | None = None) -> None:
    """Bind the saving behaviour above to ``model`` (``compute_dtype``: what config.json records)."""
    # partials, not bound methods: they pickle (``torch.save(model)``) and deep-copy with the model
    model.save_pretrained = functools.partial(_save_pretrained, model)  # type: ignore[method-assign]
    model._upload_modified_files = functools.partial(_upload_modified_files, model)  # type: ignore[method-assign]
    if compute_dtype is not None:
        model.rbe_compute_dtype = compute_dtype
