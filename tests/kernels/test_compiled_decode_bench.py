"""bench/compiled_decode.py runs end to end (tiny random model, --smoke) and writes its table."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_compiled_decode_bench_smoke(tmp_path):
    out = tmp_path / "compiled_decode"
    subprocess.run([sys.executable, str(ROOT / "bench" / "compiled_decode.py"), "--smoke", "--out", str(out)],
                   check=True, cwd=ROOT, capture_output=True, timeout=900)
    res = json.loads(out.with_suffix(".json").read_text())
    assert [r["weights"] for r in res["rows"]] == ["fp32", "bf16", "v2-3 + bf16 embeddings"]
    for r in res["rows"]:
        assert r["eager_tokens_per_s"] > 0 and r["compiled_tokens_per_s"] > 0
        assert r["compiled_vs_eager"] == r["compiled_tokens_per_s"] / r["eager_tokens_per_s"]
        assert 0 <= r["same_greedy_tokens"] <= res["meta"]["new_tokens"]
    # fp32 compiled keeps the eager model's greedy tokens (the RBE row's op is the same kernel either way)
    assert res["rows"][0]["same_greedy_tokens"] == res["meta"]["new_tokens"]
    assert "compiled / eager" in out.with_suffix(".md").read_text()
