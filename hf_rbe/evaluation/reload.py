"""What a user who downloads a checkpoint gets: its logits from a plain ``from_pretrained`` in a new
Python process, with nothing imported there but ``hf_rbe`` (no state of the process that wrote it).
The tests and the main job both check reloads through this."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

_SCRIPT = """
import sys, torch, hf_rbe
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
ids = load_file(sys.argv[2])["ids"]
with torch.no_grad():
    logits = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()(ids).logits
save_file({"logits": logits.contiguous()}, sys.argv[3])
"""


def fresh_process_logits(saved: str | Path, ids: torch.Tensor, timeout: float = 600) -> torch.Tensor:
    """Logits on ``ids`` of the causal LM saved in ``saved``, loaded in a new Python process;
    ``RuntimeError`` with the child's error output if it fails."""
    with tempfile.TemporaryDirectory() as tmp:
        inputs, outputs = os.path.join(tmp, "ids.safetensors"), os.path.join(tmp, "logits.safetensors")
        save_file({"ids": ids.contiguous()}, inputs)
        env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error"}
        res = subprocess.run([sys.executable, "-c", _SCRIPT, str(saved), inputs, outputs], capture_output=True,
                             text=True, timeout=timeout, env=env)
        if res.returncode:
            raise RuntimeError(f"reloading {saved} in a fresh process failed:\n{res.stderr[-3000:]}")
        return load_file(outputs)["logits"]


def reload_verdict(saved: str | Path, ids: torch.Tensor, logits: torch.Tensor) -> str:
    """``"bit-identical"`` when a fresh-process reload of ``saved`` gives ``logits`` on ``ids`` bit for
    bit, else ``"DIFFERENT max|d|=..."``."""
    again = fresh_process_logits(saved, ids)
    return "bit-identical" if torch.equal(again, logits) else f"DIFFERENT max|d|={(again - logits).abs().max():.3g}"
