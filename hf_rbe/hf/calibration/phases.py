"""Named phases of a calibration run, for whoever wants to account for its time and memory.

The pipeline marks each phase (``with phase("blocks"): ...``); a listener (``listen``) hears every
start and end. Nothing listens by default, and then a phase costs one function call.
``hf_rbe.evaluation.memory.MemoryProfile`` listens to attribute peak resident memory and time to
phases.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

_LISTENERS: list[Callable[[str, bool], None]] = []


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """Mark the phase ``name`` (listeners hear ``(name, True)`` at the start, ``(name, False)`` at the end)."""
    for listener in list(_LISTENERS):
        listener(name, True)
    try:
        yield
    finally:
        for listener in list(_LISTENERS):
            listener(name, False)


@contextlib.contextmanager
def listen(callback: Callable[[str, bool], None]) -> Iterator[None]:
    """Call ``callback(name, started)`` at every phase boundary inside the block."""
    _LISTENERS.append(callback)
    try:
        yield
    finally:
        _LISTENERS.remove(callback)
