"""bench/row_kernel.py runs end to end (tiny random model, --smoke) and writes its table."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_row_kernel_bench_smoke(tmp_path):
    out = tmp_path / "row_kernel"
    subprocess.run([sys.executable, str(ROOT / "bench" / "row_kernel.py"), "--smoke", "--out", str(out)],
                   check=True, cwd=ROOT, capture_output=True, timeout=900)
    res = json.loads(out.with_suffix(".json").read_text())
    assert [r["weights"] for r in res["rows"]] == ["bf16", "v2-3 + bf16 embeddings",
                                                   "v2-3 + bf16 embeddings, bf16 activations", "v2-b3 + bf16 embeddings"]
    for r in res["rows"][1:]:
        assert r["same_tokens"], r["weights"]  # every way computes with the same kernels
        for key in ("op_every_call", "head_by_linear", "head_by_mv"):
            assert len(r["rates"]) == len(r[f"{key}_rates"]) == 2 and min(r["rates"] + r[f"{key}_rates"]) > 0
            lo, hi = r[f"{key}_speedup_quartiles"]
            assert lo <= r[f"{key}_speedup"] <= hi
    md = out.with_suffix(".md").read_text()
    assert "op every call" in md and "head by F.linear" in md and "head by torch.mv" in md
