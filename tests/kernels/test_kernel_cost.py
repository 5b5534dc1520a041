"""The static cost check (no GPU): every v2 configuration compiled for the H100 has no spills, fits
in shared memory, and stays under its instruction ceiling; M = 1 at 2 bits stays <= 5 per weight.

It runs ``bench/kernel_cost.py`` in a clean process (the suite sets TRITON_INTERPRET=1, under which
nothing compiles) and checks its JSON. Ceilings are the compiled counts of 2026-11-24
(results/kernel_cost.md) plus about 10%: a change that makes a kernel costlier fails here, not
on a GPU nobody has at hand.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]
SMEM_LIMIT = 227 * 1024
CEILINGS = {  # instructions per weight in the main loop, per (preset, M), fp16 activations
    ("v2-2", 1): 5.0, ("v2-2", 16): 5.4, ("v2-2", 256): 10.5,
    ("v2-2.5", 1): 8.6, ("v2-2.5", 16): 12.3, ("v2-2.5", 256): 13.1,
    ("v2-3", 1): 8.1, ("v2-3", 16): 11.6, ("v2-3", 256): 13.3,
    ("v2-4", 1): 8.7, ("v2-4", 16): 11.4, ("v2-4", 256): 14.8,
}


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("cost") / "kernel_cost"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "bench/kernel_cost.py", "--out", str(out)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    return json.loads(out.with_suffix(".json").read_text())["rows"]


def test_every_configuration_is_measured(rows):
    got = {(r["preset"], r["M"]) for r in rows if r["kernel"].startswith("v2") and r["x_dtype"] == "float16"}
    assert got == set(CEILINGS)


def test_no_spills_shared_memory_fits_under_the_ceilings(rows):
    for r in rows:
        if not r["kernel"].startswith("v2"):
            continue
        where = (r["preset"], r["M"], r["x_dtype"])
        assert r["loop_instructions"] > 0, f"no main loop found: {where}"
        assert r["spill_instructions"] == 0, where
        assert r["shared_bytes"] <= SMEM_LIMIT, where
        if r["x_dtype"] == "float16":
            assert r["instructions_per_weight"] <= CEILINGS[r["preset"], r["M"]], (where, r["instructions_per_weight"])


def test_the_model_sees_a_costlier_kernel(rows):
    """The v1 kernel, written before the decoder was designed for the GPU, costs far more per weight."""
    v1 = next(r for r in rows if r["kernel"] == "v1 matmul")
    assert v1["instructions_per_weight"] > 3 * CEILINGS["v2-2", 1]
