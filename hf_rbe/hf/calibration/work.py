"""A calibration's progress on disk (``calibration_work_dir``): a run that stops resumes from its last
finished block and ends exactly where an uninterrupted run would.

After each block the work directory gets that block's state (its packed layers' stored tensors,
its norms and biases as fine-tuned: ``block-NNNNN.safetensors``), the activations the next block
starts from (the quantized path's and the full-precision path's hidden states per batch:
``activations-NNNNN.safetensors``, by the number of finished blocks) and, written last,
``progress.json`` (how many blocks are done, and a fingerprint of everything that decides the
result: the config, the calibration windows, the model's config and its tensor names and shapes).
A run finding a directory with another fingerprint refuses it instead of mixing two runs. Every
file is written beside its final name and renamed into place, so a run killed at any point leaves
either the old state or the new one.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ...core.errors import ConfigError

_PROGRESS = "progress.json"


def _activations(blocks: int) -> str:
    """The activations after ``blocks`` finished blocks (named by the count, so a run killed between
    writing them and ``progress.json`` never pairs a count with another count's activations)."""
    return f"activations-{blocks:05d}.safetensors"


def fingerprint(*parts: Any) -> str:
    """SHA-256 over the parts (tensors by their bytes, anything else by its JSON)."""
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, torch.Tensor):
            h.update(p.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            h.update(json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()


def _atomic(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


class WorkDir:
    """The progress of one calibration run in ``path`` (module docstring)."""

    def __init__(self, path: str | Path, fingerprint: str) -> None:
        self.path, self.fingerprint = Path(path), fingerprint
        self.path.mkdir(parents=True, exist_ok=True)

    def finished(self) -> int:
        """Blocks a previous run of the same calibration finished here (0: none)."""
        progress = self.path / _PROGRESS
        if not progress.exists():
            return 0
        saved = json.loads(progress.read_text())
        if saved.get("fingerprint") != self.fingerprint:
            raise ConfigError(f"{self.path} holds the progress of another calibration (another config, model or "
                              "calibration text); delete it or choose another calibration_work_dir")
        return int(saved["blocks"])

    def save(self, index: int, block: nn.Module, q: list[torch.Tensor], fp: list[torch.Tensor] | None) -> None:
        """Block ``index`` is done: its state, and the activations block ``index + 1`` starts from."""
        state = {k: v.detach().cpu().contiguous() for k, v in block.state_dict().items()}
        _atomic(self.path / f"block-{index:05d}.safetensors", lambda p: save_file(state, str(p)))
        acts = {f"q.{j}": h.cpu().contiguous() for j, h in enumerate(q)}
        acts.update({f"fp.{j}": h.cpu().contiguous() for j, h in enumerate(fp or [])})
        _atomic(self.path / _activations(index + 1), lambda p: save_file(acts, str(p)))
        record = json.dumps({"fingerprint": self.fingerprint, "blocks": index + 1})
        _atomic(self.path / _PROGRESS, lambda p: p.write_text(record))
        (self.path / _activations(index)).unlink(missing_ok=True)

    def block_state(self, index: int) -> dict[str, torch.Tensor]:
        return load_file(str(self.path / f"block-{index:05d}.safetensors"))

    def activations(self, n: int, with_fp: bool) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        """The ``n`` per-batch hidden states of the quantized path (and of the full-precision path)
        after the finished blocks."""
        acts = load_file(str(self.path / _activations(self.finished())))
        return [acts[f"q.{j}"] for j in range(n)], [acts[f"fp.{j}"] for j in range(n)] if with_fp else None
