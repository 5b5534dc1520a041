"""Where fetched data lives, and the checks every loader runs on it.

Files sit in ``$HF_RBE_CACHE`` (default ``~/.cache/hf_rbe``), each with a SHA-256 recorded by
the module that reads it. Loaders only read: a missing file raises :class:`DataNotFound` naming
the command that fetches it (``hf-rbe data fetch NAME``, ``hf_rbe.data.fetch``); a file
whose checksum differs is removed and reported the same way.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


class DataNotFound(FileNotFoundError):
    """A model or corpus is not in the cache (or failed its checksum) and must be fetched."""


def cache_dir() -> Path:
    path = Path(os.environ.get("HF_RBE_CACHE", Path.home() / ".cache" / "hf_rbe"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def checked_file(name: str, digest: str, source: str) -> Path:
    """The cached file ``name`` after checking its SHA-256 (``source``: what ``hf-rbe data
    fetch`` calls the data set it belongs to)."""
    path = cache_dir() / name
    if not path.exists():
        raise DataNotFound(f"{source}: {path} is not in the cache; run `hf-rbe data fetch {source}`")
    got = sha256(path)
    if got != digest:
        path.unlink()
        raise DataNotFound(f"{source}: checksum mismatch ({got}); the file was removed, "
                           f"run `hf-rbe data fetch {source}` again")
    return path
