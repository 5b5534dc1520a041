"""Result files name the machine they ran on, CPU model included."""

from pathlib import Path

import pytest

from hf_rbe.evaluation.results import run_meta

CPUINFO = Path("/proc/cpuinfo")


@pytest.mark.skipif(not CPUINFO.exists(), reason="no /proc/cpuinfo")
def test_machine_names_the_cpu_model():
    names = {line.partition(":")[2].strip() for line in CPUINFO.read_text().splitlines()
             if line.startswith("model name")}
    machine = run_meta()["machine"]
    assert any(machine.startswith(f"{n} (") for n in names), machine
    assert "CPUs, torch" in machine
