"""Model cards for RBE checkpoints, from the template in ``model_cards/``.

``attach(model)`` (called by the quantizer on every RBE model) makes ``save_pretrained`` and
``push_to_hub`` write the card: ``save_pretrained`` writes README.md after the weights, and
the upload step swaps transformers' generic card for ours just before files go to the Hub.
A README.md the user wrote is never replaced.
"""

from __future__ import annotations

import json
import types
from pathlib import Path
from typing import Any

from torch import nn

from ..core.packed import packed_size

_TEMPLATE = "rbe_model_card.md"
_GENERIC = "This model card has been automatically generated"  # transformers' placeholder card
_OURS = "quantized with [hf-rbe]"


def _template() -> str:
    # hf_rbe/model_cards links to the repository's model_cards/ and ships in the wheel
    return (Path(__file__).parents[1] / "model_cards" / _TEMPLATE).read_text()


def render_card(model: nn.Module, base_model: str, repo_id: str, metrics: dict[str, Any] | None = None,
                size_bytes: int | None = None) -> str:
    """The card text: base model, RBE config, bits per weight, size, metrics, how to load it."""
    size = packed_size(model)
    cfg = model.config.quantization_config
    cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    if metrics:
        rows = "\n".join(f"| {k} | {v} |" for k, v in metrics.items())
        metrics_md = f"| metric | value |\n|---|---|\n{rows}"
    else:
        metrics_md = "Not measured yet: run `hf-rbe eval` on this checkpoint."
    return _template().format(
        name=repo_id.rsplit("/", 1)[-1], base_model=base_model, repo_id=repo_id, n_layers=size["rbe_layers"],
        bits_per_weight=size["bits_per_weight"], size_mib=(size_bytes or size["state_dict_bytes"]) / 2**20,
        config_json=json.dumps(cfg, indent=2, sort_keys=True), metrics=metrics_md,
    )


def write_card(model: nn.Module, out_dir: str | Path, base_model: str, repo_id: str | None = None,
               metrics: dict[str, Any] | None = None) -> Path:
    """Write ``README.md`` into a saved checkpoint directory (through ``huggingface_hub.ModelCard``)."""
    from huggingface_hub import ModelCard

    out = Path(out_dir)
    disk = sum(f.stat().st_size for f in out.glob("*.safetensors")) or None
    card = ModelCard(render_card(model, base_model, repo_id or out.name, metrics, disk))
    card.save(out / "README.md")
    return out / "README.md"


def _replaceable(readme: Path) -> bool:
    if not readme.exists():
        return True
    text = readme.read_text(encoding="utf-8", errors="replace")
    return _GENERIC in text or _OURS in text


def _base_model(model: nn.Module) -> str:
    return getattr(model.config, "_name_or_path", "") or "unknown"


def _save_pretrained(self: nn.Module, save_directory: str | Path, *args: Any, **kwargs: Any) -> Any:
    out = type(self).save_pretrained(self, save_directory, *args, **kwargs)
    if kwargs.get("is_main_process", True) and _replaceable(Path(save_directory) / "README.md"):
        write_card(self, save_directory, base_model=_base_model(self))
    return out


def _upload_modified_files(self: nn.Module, working_dir: str | Path, repo_id: str, *args: Any, **kwargs: Any) -> Any:
    if _replaceable(Path(working_dir) / "README.md"):
        write_card(self, working_dir, base_model=_base_model(self), repo_id=repo_id)
    return type(self)._upload_modified_files(self, working_dir, repo_id, *args, **kwargs)


def attach(model: nn.Module) -> None:
    """Make this model's ``save_pretrained`` / ``push_to_hub`` write an RBE model card.

    Bound methods on the instance (not a patched class): other models are untouched, and
    ``copy.deepcopy`` rebinds them to the copy."""
    model.save_pretrained = types.MethodType(_save_pretrained, model)  # type: ignore[method-assign]
    model._upload_modified_files = types.MethodType(_upload_modified_files, model)  # type: ignore[method-assign]
