"""Peak resident memory of a job, overall and per calibration phase, sampled in a thread.

Resident memory (RSS) is what the operating system charges the process, the number a machine's
memory limit is checked against: tensors, the Python heap, libraries, and the pages of memory-mapped
files (safetensors) the process has touched. ``anonymous=True`` counts only the memory the process
itself wrote (RSS less its file-backed pages): library code and mapped checkpoint pages are clean,
and under a memory cap the kernel drops and rereads them instead of failing, so a job's need
under a cap is its anonymous memory (Linux only).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import psutil

from ..hf.calibration.phases import listen


@dataclass
class PhaseCost:
    """One phase: wall seconds, and the peak RSS seen while it ran (MiB)."""

    seconds: float = 0.0
    peak_mib: float = 0.0


@dataclass
class MemoryProfile:
    """``with MemoryProfile() as p:`` samples RSS (``anonymous``: its anonymous part, module
    docstring) every ``interval`` seconds; afterwards ``p.peak_mib`` (the whole block),
    ``p.base_mib`` (at its start) and ``p.phases`` (per calibration phase, in the order they first
    ran; nested phases each get their own entry)."""

    interval: float = 0.01
    anonymous: bool = False
    base_mib: float = 0.0
    peak_mib: float = 0.0
    phases: dict[str, PhaseCost] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._proc = psutil.Process()
        self._open: dict[str, float] = {}
        self._stop = threading.Event()
        self._listen = listen(self._on_phase)

    def _rss(self) -> float:
        info = self._proc.memory_info()
        if not self.anonymous:
            return info.rss / 2**20
        if not hasattr(info, "shared"):
            raise NotImplementedError("MemoryProfile(anonymous=True) needs Linux (file-backed resident pages)")
        return (info.rss - info.shared) / 2**20

    def _on_phase(self, name: str, started: bool) -> None:
        cost = self.phases.setdefault(name, PhaseCost())
        if started:
            self._open[name] = time.perf_counter()
            cost.peak_mib = max(cost.peak_mib, self._rss())
        elif name in self._open:
            cost.seconds += time.perf_counter() - self._open.pop(name)
            cost.peak_mib = max(cost.peak_mib, self._rss())

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            rss = self._rss()
            self.peak_mib = max(self.peak_mib, rss)
            for name in list(self._open):
                self.phases[name].peak_mib = max(self.phases[name].peak_mib, rss)

    def __enter__(self) -> MemoryProfile:
        self.base_mib = self.peak_mib = self._rss()
        self._listen.__enter__()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._listen.__exit__(None, None, None)
        self.peak_mib = max(self.peak_mib, self._rss())

    @property
    def added_mib(self) -> float:
        """Peak above the level at the start."""
        return self.peak_mib - self.base_mib

    def as_dict(self) -> dict:
        return {"base_mib": self.base_mib, "peak_mib": self.peak_mib,
                "phases": {n: {"seconds": c.seconds, "peak_mib": c.peak_mib} for n, c in self.phases.items()}}
