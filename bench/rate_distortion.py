"""What the quality targets ask of the codebook and of calibration's fine-tunes, from committed results.

    python bench/rate_distortion.py     # reads results/v2_codebook.json and calibration runs, writes
                                        # results/rate_distortion.{json,md}

Across the e8p presets a calibrated SmolLM2's perplexity excess over fp32 has grown about in
proportion to its codebook's relative MSE on Gaussian data (``bench/v2_codebook.py``; after the
rotation the weights a layer codes look Gaussian). So each calibrated run gets a *slope*,
``(ppl - ppl_fp32) / MSE``: how much perplexity each unit of codebook error costs after that run's
fine-tunes. From it, two readings per target of the quality issue:

- the MSE the target needs at the run's slope, beside Shannon's bound ``2^(-2R)`` at the codebook's bits
  (no quantizer of Gaussian weights at R bits goes below it);
- the slope the target needs at the codebook's MSE: what the fine-tunes would have to reach.

A reading, not a law: the slope falls as fine-tuning grows (each run's is shown), and the model's
rotated weights are only near Gaussian.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
from pathlib import Path

from hf_rbe.core.errors import ConfigError
from hf_rbe.evaluation.results import run_meta, write_results
from hf_rbe.hf.presets import preset

ROOT = Path(__file__).resolve().parents[1]
RUNS = ["results/calibrate.json", "results/calibrate_smollm2_longer.json", "results/calibrate_smollm2_longer_v23.json",
        "results/calibrate_smollm2_longer_v24.json"]


def ppl_targets() -> tuple[tuple[float, float], ...]:
    """The quality issue's (bits per weight, Wikipedia perplexity limit) pairs, as the calibration recipe
    checks them (one definition)."""
    spec = importlib.util.spec_from_file_location("calibrate_recipe", ROOT / "recipes" / "calibrate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.PPL_TARGETS


def codebook_name(setting: str) -> str | None:
    """The ``bench/v2_codebook.py`` row of a calibration row's setting (``"v2-3 calibrated"`` ->
    ``"v2 e8p + vq8"``), ``None`` when the setting has options (``/g64``, ``@3.05``) or is not a v2 preset."""
    name = setting.removesuffix(" calibrated")
    if any(c in name for c in "/@+:") or not name.startswith("v2-"):
        return None
    try:
        return "v2 " + " + ".join(preset(name)["planes"])
    except ConfigError:  # not a preset's name
        return None


def readings(codebook: list[dict], runs: dict[str, list[dict]], targets: tuple[tuple[float, float], ...]) -> list[dict]:
    """One row per SmolLM2 calibration row whose codebook was measured: its slope and, where a target
    sits at its bits (within 0.1), what the target asks of the MSE and of the slope."""
    mse = {r["codebook"]: r for r in codebook}
    out = []
    for source, rows in runs.items():
        lm = [r for r in rows if r.get("model") == "SmolLM2-135M"]
        fp32 = next(r["wikipedia_ppl"] for r in lm if r["setting"] == "fp32")
        for r in lm:
            cb = mse.get(codebook_name(r["setting"]) or "")
            if cb is None:
                continue
            excess = r["wikipedia_ppl"] - fp32
            row = {"source": source, "setting": r["setting"], "bits_per_weight": r["bits_per_weight"],
                   "wikipedia_ppl": r["wikipedia_ppl"], "fp32_ppl": fp32, "codebook": cb["codebook"],
                   "codebook_mse": cb["rel_mse"], "codebook_bits": cb["bits_per_weight"],
                   "shannon_bound": cb["shannon_bound"], "slope": excess / cb["rel_mse"],
                   "minutes": r.get("calibrate_and_quantize_seconds", math.nan) / 60,
                   "e2e_steps": r.get("calibrated_with", {}).get("e2e_steps"),
                   "windows": r.get("calibrated_with", {}).get("samples")}
            target = next((limit for bits, limit in targets if abs(r["bits_per_weight"] - bits) < 0.1), None)
            if target is not None:
                row["target_ppl"] = target
                row["mse_needed"] = (target - fp32) / row["slope"]
                row["mse_needed_vs_bound"] = row["mse_needed"] / row["shannon_bound"]
                row["slope_needed"] = (target - fp32) / cb["rel_mse"]
            out.append(row)
    return out


def table(meta: dict, rows: list[dict]) -> str:
    lines = [f"`{meta['command']}` on {meta['machine']}, {meta['date']}", "",
             "Slope: SmolLM2 Wikipedia perplexity excess over fp32 per unit of the codebook's relative MSE on "
             "Gaussian data. Shannon's bound: 2^(-2R) at the codebook's bits R.", "",
             "| run | setting | windows / end-to-end steps | minutes | Wikipedia ppl | codebook MSE | Shannon bound "
             "| slope | target | MSE the target needs (x bound) | slope the target needs |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        need = (f"{r['target_ppl']:g} | {r['mse_needed']:.4f} ({r['mse_needed_vs_bound']:.2f}x) | {r['slope_needed']:.0f}"
                if "target_ppl" in r else "- | - | -")
        lines.append(f"| {Path(r['source']).stem} | {r['setting'].removesuffix(' calibrated')} | {r['windows']} / "
                     f"{r['e2e_steps']} | {r['minutes']:.0f} | {r['wikipedia_ppl']:.2f} | {r['codebook_mse']:.4f} | "
                     f"{r['shannon_bound']:.4f} | {r['slope']:.0f} | {need} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--codebook", default="results/v2_codebook.json")
    ap.add_argument("--runs", nargs="+", default=RUNS, help="calibration result files (recipes/calibrate.py)")
    ap.add_argument("--out", default="results/rate_distortion")
    args = ap.parse_args()
    codebook = json.loads((ROOT / args.codebook).read_text())["rows"]
    runs = {p: json.loads((ROOT / p).read_text())["rows"] for p in args.runs}
    rows = readings(codebook, runs, ppl_targets())
    meta = {**run_meta(), "inputs": [args.codebook, *args.runs]}
    md = table(meta, rows)
    write_results(ROOT / args.out, meta, rows, md)  # an absolute --out stays itself under pathlib's join
    print(md)


if __name__ == "__main__":
    main()
