"""``bench/rate_distortion.py``: the slopes and what the targets ask, from result rows."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("rate_distortion", ROOT / "bench" / "rate_distortion.py")
rd = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(rd)

CODEBOOK = [{"codebook": "v2 e8p + vq8", "bits_per_weight": 3.0, "rel_mse": 0.03, "shannon_bound": 0.015625},
            {"codebook": "v2 e8p", "bits_per_weight": 2.0, "rel_mse": 0.09, "shannon_bound": 0.0625}]


def _row(setting: str, bpw: float, ppl: float, model: str = "SmolLM2-135M") -> dict:
    return {"model": model, "setting": setting, "bits_per_weight": bpw, "wikipedia_ppl": ppl,
            "calibrate_and_quantize_seconds": 600.0, "calibrated_with": {"e2e_steps": 32, "samples": 64}}


def test_slope_and_what_a_target_asks() -> None:
    rows = [_row("fp32", 32.0, 20.0), _row("v2-3 calibrated", 3.05, 26.0), _row("v2-2 calibrated", 2.02, 29.0),
            _row("v2-3/g64 calibrated", 3.5, 25.0), _row("v2-2.5@3.05 calibrated", 3.05, 27.0),
            _row("v2-6 calibrated", 6.1, 20.5), _row("v2-3 calibrated", 3.08, 0.0, model="all-MiniLM-L6-v2")]
    out = rd.readings(CODEBOOK, {"run.json": rows}, ((2.0, 26.0), (3.0, 25.4)))
    assert [r["setting"] for r in out] == ["v2-3 calibrated", "v2-2 calibrated"]  # options, unmeasured codebooks, encoders skipped
    v23, v22 = out
    assert v23["slope"] == pytest.approx(6.0 / 0.03)
    assert v23["mse_needed"] == pytest.approx(5.4 / 200.0)
    assert v23["mse_needed_vs_bound"] == pytest.approx(0.027 / 0.015625)
    assert v23["slope_needed"] == pytest.approx(5.4 / 0.03)
    assert v22["slope"] == pytest.approx(100.0) and v22["mse_needed"] == pytest.approx(0.06)


def test_a_row_without_a_target_at_its_bits() -> None:
    rows = [_row("fp32", 32.0, 20.0), _row("v2-3 calibrated", 3.05, 26.0)]
    (only,) = rd.readings(CODEBOOK, {"run.json": rows}, ((2.0, 26.0),))
    assert "target_ppl" not in only and only["slope"] == pytest.approx(200.0)


def test_the_targets_are_the_recipes() -> None:
    spec = importlib.util.spec_from_file_location("calibrate_recipe", ROOT / "recipes" / "calibrate.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    assert rd.ppl_targets() == recipe.PPL_TARGETS


def test_the_committed_results(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(ROOT / "bench" / "rate_distortion.py"), "--out", str(tmp_path / "rd")],
                   check=True, capture_output=True, cwd=ROOT)
    rows = json.loads((tmp_path / "rd.json").read_text())["rows"]
    calibrated = json.loads((ROOT / "results" / "calibrate.json").read_text())["rows"]
    fp32 = next(r["wikipedia_ppl"] for r in calibrated if r["setting"] == "fp32" and r["model"] == "SmolLM2-135M")
    v23 = next(r for r in calibrated if r["setting"] == "v2-3 calibrated")
    got = next(r for r in rows if r["source"] == "results/calibrate.json" and r["setting"] == "v2-3 calibrated")
    assert got["slope"] * got["codebook_mse"] == pytest.approx(v23["wikipedia_ppl"] - fp32)
    assert (tmp_path / "rd.md").read_text().count("| calibrate |") >= 4
