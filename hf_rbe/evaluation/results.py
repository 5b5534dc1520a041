"""Result files: every JSON and markdown table carries the machine, the date and the command."""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
from datetime import date
from pathlib import Path
from typing import Any

import torch


def run_meta() -> dict[str, str]:
    """Machine, date, command line and load average (1, 5, 15 min; timings mean little on a busy
    machine), stamped on every result file."""
    return {"machine": f"{_processor()} ({platform.machine()}), {os.cpu_count()} CPUs, torch {torch.__version__} "
                       f"({torch.get_num_threads()} threads)",
            "date": date.today().isoformat(), "command": _command(),
            "load_average": "%.2f %.2f %.2f" % os.getloadavg()}


def _processor() -> str:
    """The CPU's model name as the OS reports it (a virtual machine's may be generic): results from
    two machines of one architecture must not read alike, since their kernels time differently."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _command() -> str:
    """The command line as typed: ``hf-rbe compare``, or ``python recipes/x.py --flag``."""
    prog = Path(sys.argv[0]).name if sys.argv else ""
    if prog == "hf-rbe":
        return shlex.join(["hf-rbe", *sys.argv[1:]])
    return "python " + shlex.join(sys.argv)  # quoted where needed: --families "RBE v2"


def write_results(out: str | Path, meta: dict[str, str], rows: list[dict] | dict[str, Any], markdown: str) -> None:
    """``out``.json (meta, then ``rows`` or the sections of a dict) and ``out``.md (the table a
    README quotes)."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {"rows": rows} if isinstance(rows, list) else rows
    path.with_suffix(".json").write_text(json.dumps({"meta": meta, **body}, indent=2))
    path.with_suffix(".md").write_text(markdown)
