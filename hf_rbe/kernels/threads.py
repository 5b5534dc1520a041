"""How many threads the CPU kernels run on: as many as torch (``torch.set_num_threads``).

numba starts its own thread pool, as large as the CPUs the process may use, and its parallel loops
would use all of it whatever torch was told: a process limited to one thread (a vLLM worker, a
job sharing the machine) would still run the RBE kernels on every core. Each kernel entry calls
:func:`follow_torch` first; numba's count is per Python thread, so the last value set is kept per
thread too, and nothing is set again until torch's count changes (asking numba for its count on
every call would cost several times a one-row kernel's other checks). So a direct
``numba.set_num_threads`` holds only until the next ``torch.set_num_threads``.
"""

from __future__ import annotations

import threading

import numba
import torch

_SET = threading.local()


def follow_torch() -> None:
    """numba's thread count for this Python thread := ``torch.get_num_threads()``, at most the
    threads numba started (``NUMBA_NUM_THREADS``)."""
    n = torch.get_num_threads()
    if getattr(_SET, "n", None) != n:
        numba.set_num_threads(max(1, min(n, numba.config.NUMBA_NUM_THREADS)))
        _SET.n = n
