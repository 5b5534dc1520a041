"""bench/cpu_speed.py runs end to end (tiny shapes and model, --smoke) and writes its table."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LLAMA_CPP = all(importlib.util.find_spec(m) is not None for m in ("llama_cpp", "gguf"))


def test_cpu_speed_bench_smoke(tmp_path):
    out = tmp_path / "cpu_speed"
    subprocess.run([sys.executable, str(ROOT / "bench" / "cpu_speed.py"), "--smoke", "--out", str(out),
                    "--gguf-dir", str(tmp_path / "gguf")], check=True, cwd=ROOT, capture_output=True, timeout=600)
    res = json.loads(out.with_suffix(".json").read_text())
    names = [r["weights"] for r in res["models"]]
    assert names[:2] == ["fp32", "bf16"] and "v2-3" in names and "v2-3 + bf16 embeddings" in names
    assert "v2-b3 + bf16 embeddings" in names and "v2-b3 + bf16 embeddings, bf16 activations" in names
    assert {"v2-3 + bf16 embeddings, bf16 prefill", "v2-b3 + bf16 embeddings, bf16 prefill"} <= set(names)
    assert all(r["decode_tokens_per_s"] > 0 and r["prefill_tokens_per_s"] > 0 for r in res["models"])
    assert {"decode_vs_bf16", "prefill_vs_bf16", "decoder_8b_vs_bf16", "sign_planes"} <= set(res["verdicts"])
    sign = res["verdicts"]["sign_planes"]
    assert set(sign["decoder_8b_vs_bf16"]) == {"v2-b2", "v2-b3"}
    assert "decode_vs_bf16_bf16_activations" in sign  # (no layer verdicts: the smoke shape is not an 8B one)
    assert {"prefill_vs_bf16_bf16_prefill", "decode_vs_bf16_bf16_prefill"} <= set(sign) & set(res["verdicts"])
    bw = res["bandwidth"]
    assert bw["gbs"] == max(bw["copy_gbs"], bw["triad_gbs"], bw["read_gbs"]) > 0
    row = res["layers"][0]
    assert bw["peak_gbs"] == max(bw["gbs"], row["fp32_gbs"], row["bf16_gbs"])
    assert row["v2-3_gbs"] / bw["peak_gbs"] == row["v2-3_bandwidth_fraction"]
    assert {"v2-3 (bf16 x)_us", "v2-b3 (bf16 x)_vs_bf16"} <= set(row)
    llama = ["llama.cpp Q4_K_M", "llama.cpp Q3_K_M", "llama.cpp IQ3_S"] if LLAMA_CPP else []
    assert [r["weights"] for r in res["decoder_8b"]] == ["bf16", "v2-3", "v2-b2", "v2-b3", *llama]
    heads = {r["weights"]: r["head_bpw"] for r in res["decoder_8b"]}
    assert heads["bf16"] == 16 and all(heads[p] < 6 for p in ("v2-3", "v2-b2", "v2-b3"))  # RBE's head coded
    assert ("decoder_8b_vs_llama_cpp" in res["verdicts"]) == LLAMA_CPP
    probes = res["state_probes"]
    assert [p["at"] for p in probes] == ["start", "after the layer rows", "after the model rows", "end"]
    assert all(p["fp32_us"] > 0 and p["bf16_us"] > 0 for p in probes)
    md = out.with_suffix(".md").read_text()
    assert "Speedup over torch bf16" in md and "8B-shaped decoder" in md and "Sign planes" in md
    assert "Machine state" in md and "with fp32 activations and bf16 prefill products: decode" in md
