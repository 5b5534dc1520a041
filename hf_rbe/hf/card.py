"""Model cards for RBE checkpoints, from the template ``model_card.md`` beside this module.

``hf_rbe.hf.saving`` makes every RBE model's ``save_pretrained`` and ``push_to_hub`` write it:
README.md after the weights, and ours instead of transformers' generic card just before files
go to the Hub. A README.md the user wrote is never replaced.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from ..core.packed import packed_size

_GENERIC = "This model card has been automatically generated"  # transformers' placeholder card
_OURS = "quantized with [hf-rbe]"


def _template() -> str:
    return (Path(__file__).with_name("model_card.md")).read_text()


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


def replaceable(readme: Path) -> bool:
    """Whether a README.md may be (re)written: absent, transformers' placeholder, or ours."""
    if not readme.exists():
        return True
    text = readme.read_text(encoding="utf-8", errors="replace")
    return _GENERIC in text or _OURS in text
