"""bench/few_rows.py runs end to end (small shapes, a tiny random model, --smoke) and writes its tables."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_few_rows_bench_smoke(tmp_path):
    out = tmp_path / "few_rows"
    subprocess.run([sys.executable, str(ROOT / "bench" / "few_rows.py"), "--smoke", "--out", str(out)],
                   check=True, cwd=ROOT, capture_output=True, timeout=900)
    res = json.loads(out.with_suffix(".json").read_text())
    assert [r["M"] for r in res["layers"]] == [2, 3]
    for r in res["layers"]:
        for name in ("v2-2", "v2-2.5", "v2-3", "v2-4"):
            c = r[name]
            assert c["us"] > 0 and c["per_stage_us"] > 0
            lo, hi = c["speedup_quartiles"]
            assert lo <= c["speedup"] <= hi
    model = res["model"]
    assert model["same_tokens"]  # both ways compute the same products, up to fp32 rounding
    assert all(len(v) == 2 and min(v) > 0 for v in model["rates"].values())
    md = out.with_suffix(".md").read_text()
    assert "one pass per stage" in md and "as the library runs" in md
