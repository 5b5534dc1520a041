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
        if name.startswith("__"):  # the import system's own questions (``__path__``): not a moved name
            raise AttributeError(f"module {old!r} has no attribute {name!r}")
        home = (homes or {}).get(name, new)
        value = getattr(importlib.import_module(home), name)
        if not warned:
            warned = True
            warnings.warn(f"{old} moved to {new}; import {name} from {home}", DeprecationWarning, stacklevel=2)
        return value

    return __getattr__


def renamed(old: str, replacements: Mapping[str, tuple[str, Any]]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for names of ``old`` that were replaced: ``{name: (new path, object)}``;
    the first one asked for warns (``DeprecationWarning``) with its new path."""
    warned = False

    def __getattr__(name: str) -> Any:
        nonlocal warned
        if name not in replacements:
            raise AttributeError(f"module {old!r} has no attribute {name!r}")
        new, value = replacements[name]
        if not warned:
            warned = True
            warnings.warn(f"{old}.{name} is replaced by {new}", DeprecationWarning, stacklevel=2)
        return value

    return __getattr__
