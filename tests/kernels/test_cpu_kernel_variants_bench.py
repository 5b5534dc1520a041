"""bench/cpu_kernel_variants.py runs end to end (tiny shapes, --smoke): every variant agrees with the product kernel."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_cpu_kernel_variants_bench_smoke(tmp_path):
    out = tmp_path / "variants"
    subprocess.run([sys.executable, str(ROOT / "bench" / "cpu_kernel_variants.py"), "--smoke", "--out", str(out)],
                   check=True, cwd=ROOT, capture_output=True, timeout=600)
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [r["preset"] for r in rows] == ["v2-2", "v2-3"]
    assert all(r["product_vs_product"] == 1.0 and r["16 offsets_us"] > 0 for r in rows)
    assert "| 64x24 | v2-3 |" in out.with_suffix(".md").read_text()
