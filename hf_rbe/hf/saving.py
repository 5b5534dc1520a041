"""What an RBE model does when it is saved: write its model card, record the dtype it computes in.

``attach(model)`` (the quantizer and ``quantize_model`` call it) binds ``save_pretrained`` and the
upload step of ``push_to_hub`` on the instance (other models are untouched; ``copy.deepcopy``
rebinds them to the copy):

- README.md: the RBE card (``card``) after the weights; a README.md the user wrote is kept;
- atomic: the save is written to a temporary directory beside the target and moved in only once
  complete, so a failure halfway (a full disk) leaves the old checkpoint loadable;
- config.json's ``dtype``: transformers records the dtype of the model's first parameter, which
  is the half-precision embedding when ``embedding_dtype`` is set; the model computes in its own
  dtype, so that one is recorded (else a reload would compute in half precision).
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.packed import PackedLinear
from .card import replaceable, write_card

# A checkpoint's weight files (single, sharded, index): a new save replaces all of them.
_WEIGHT_FILE = re.compile(r"^(model|pytorch_model)(-\d{5}-of-\d{5})?\.(safetensors|bin)(\.index\.json)?$")


def _base_model(model: nn.Module) -> str:
    return getattr(model.config, "_name_or_path", "") or "unknown"


def _still_rbe(model: nn.Module) -> bool:
    """False once ``model.dequantize()`` has made it a plain model (it saves as one, without a card)."""
    return getattr(getattr(model.config, "quantization_config", None), "quant_method", None) == "rbe"


def _save_pretrained(self: nn.Module, save_directory: str | Path, *args: Any, **kwargs: Any) -> Any:
    target = Path(save_directory)
    if target.is_file():  # transformers would only log an error and return
        raise NotADirectoryError(f"save_pretrained: {target} is a file; pass a directory")
    if not kwargs.get("is_main_process", True):
        return type(self).save_pretrained(self, save_directory, *args, **kwargs)
    if kwargs.get("push_to_hub") and "repo_id" not in kwargs:
        kwargs["repo_id"] = target.name  # what transformers would derive from the directory's name
    card = _still_rbe(self) and replaceable(target / "README.md")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.saving-", dir=target.parent))
    try:
        out = type(self).save_pretrained(self, staging, *args, **kwargs)
        _record_compute_dtype(self, staging / "config.json")
        if card:
            write_card(self, staging, base_model=_base_model(self))
        _commit(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
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


def _commit(staging: Path, target: Path) -> None:
    """Move a complete save from ``staging`` into ``target``. Everything that can fail for lack of
    space or a write error happened in ``staging``; here files are only renamed (same filesystem):
    weights first, config.json last, then the old checkpoint's weight files that the new one no
    longer has are removed. Other files in ``target`` (tokenizer, a user's README) stay."""
    if not target.exists():
        os.replace(staging, target)
        return
    new = {p.name for p in staging.iterdir()}
    for name in sorted(new, key=lambda n: (n == "config.json", not n.endswith(".safetensors"), n)):
        if (staging / name).is_dir():
            shutil.copytree(staging / name, target / name, dirs_exist_ok=True)
        else:
            os.replace(staging / name, target / name)
    for old in target.iterdir():
        if old.name not in new and _WEIGHT_FILE.match(old.name):
            old.unlink()


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
