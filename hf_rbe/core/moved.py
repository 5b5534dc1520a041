"""Old import paths of modules that moved: they keep working and warn once, naming the new path."""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable, Mapping
from typing import Any


def forward_to(old: str, new: str, homes: Mapping[str, str] | None = None) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``old`` that serves each name from module ``homes[name]`` (else
    ``new``); the first name asked for warns (``DeprecationWarning``) with the new path."""
    warned = False

    def __getattr__(name: str) -> Any:
        nonlocal warned
        home = (homes or {}).get(name, new)
        value = getattr(importlib.import_module(home), name)
        if not warned:
            warned = True
            warnings.warn(f"{old} moved to {new}; import {name} from {home}", DeprecationWarning, stacklevel=2)
        return value

    return __getattr__
