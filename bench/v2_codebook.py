"""Format v2's codebook, chosen by measurement: fit the universal tables and compare candidates on N(0,1).

    python bench/v2_codebook.py                 # fits, writes hf_rbe/core/v2_tables.safetensors and
                                                # results/v2_codebook.{json,md} (about 15 minutes on 2 cores)
    python bench/v2_codebook.py --measure-only  # keeps the shipped tables, re-measures

Fitting: k-means on 2^20 unit-variance Gaussian 8-vectors (the e8p table under its sign
structure), then on the unit-variance residual that the fitted e8p stage leaves (the tables of
later stages). Measuring: each candidate encodes a fresh 512 x 4096 Gaussian matrix with its
per-row fp16 scales (counted in bits per weight); MSE is relative to the matrix's energy.
Candidates at 2 bits: 512 entries + 7 signs + parity (e8p, chosen), 256 entries + 8 free
signs; at 2.5: e8p + a 4-bit residual plane (chosen) vs e8p with 4 gain bits per vector; then
e8p + 8-bit plane (3 bits) and two e8p stages (4 bits); the v1 presets at similar rates.
"""

from __future__ import annotations

import argparse
import time

import torch
from safetensors.torch import save_file

from hf_rbe.core import codec as v1_codec
from hf_rbe.core import codec_v2 as C
from hf_rbe.core import tables_v2 as T
from hf_rbe.core.format_v2 import LayerSpecV2, StageV2
from hf_rbe.core.tables import tables_for
from hf_rbe.evaluation.results import run_meta, write_results
from hf_rbe.hf.config import RBEConfig

FIT_SAMPLES, FIT_ITERS = 1 << 20, 40
TEST_ROWS, TEST_COLS = 512, 4032  # 4032 = 8 x 504 = 6 x 672: every preset's vector dim divides it


def fit_tables() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(FIT_SAMPLES, 8, generator=g)
    t0 = time.perf_counter()
    first = T.fit_e8p(x, FIT_ITERS, seed=1)
    _, decoded = C.nearest(x, "e8p", first)
    r = x - decoded
    r = r / r.pow(2).mean().sqrt()  # later stages see a unit-variance residual (their scale absorbs the rest)
    tables = {T.universal_key("e8p", True): first,
              T.universal_key("e8p", False): T.fit_e8p(r, FIT_ITERS, seed=2),
              T.universal_key("vq8", False): T.fit_vq(r, 256, FIT_ITERS, seed=3),
              T.universal_key("vq4", False): T.fit_vq(r, 16, FIT_ITERS, seed=4)}
    print(f"fitted the universal tables in {time.perf_counter() - t0:.0f} s", flush=True)
    return tables


def _signs8_table(x: torch.Tensor) -> torch.Tensor:
    """The 2-bit alternative: 256 non-negative entries, all 8 signs free (k-means on |x|)."""
    return T.fit_vq(x.abs(), 256, FIT_ITERS, seed=5)


def measure(w: torch.Tensor, tables: dict[str, torch.Tensor], signs8: torch.Tensor) -> list[dict]:
    energy = float(w.double().pow(2).sum())
    rows = []

    def add(name: str, bpw: float, rec: torch.Tensor, chosen: bool) -> None:
        rel = float((w.double() - rec.double()).pow(2).sum()) / energy
        rows.append({"codebook": name, "bits_per_weight": bpw, "rel_mse": rel, "shannon_bound": 2 ** (-2 * bpw),
                     "chosen_for_v2": chosen})
        print(rows[-1], flush=True)

    k = w.shape[1]
    for planes, chosen in ((("e8p",), True), (("e8p", "vq4"), True), (("e8p", "vq8"), True), (("e8p", "e8p"), True)):
        spec = LayerSpecV2(tuple(StageV2(p) for p in planes), rotation=False)
        stored = C.encode_layer(w, spec, {pre + "table": tables[T.universal_key(s.plane, i == 0)]
                                          for i, (pre, s) in enumerate(spec.prefixed_stages)})
        named = {**stored, **{pre + "table": tables[T.universal_key(s.plane, i == 0)]
                              for i, (pre, s) in enumerate(spec.prefixed_stages)}}
        add("v2 " + " + ".join(planes), spec.bits_per_weight_estimate(k), C.decode_layer(named, spec, k), chosen)
    # 256 entries, 8 free signs: nearest = sign(u) * nearest |u| entry
    s = w.pow(2).mean(1, keepdim=True).sqrt()
    u = (w / s).reshape(-1, 8)
    idx, _ = C.nearest(u.abs(), "vq8", signs8)
    add("256 entries + 8 free signs", 2 + 16 / k, (u.sign() * signs8[idx]).reshape(w.shape) * s, False)
    # e8p with 4 gain bits per vector: 16 Lloyd levels, each vector takes the best (level, codeword)
    levels = torch.linspace(0.55, 1.6, 16)
    for _ in range(6):
        errs, vals = [], []
        for lv in levels:
            _, v = C.nearest(u / lv, "e8p", tables[T.universal_key("e8p", True)])
            errs.append((u - lv * v).pow(2).sum(1))
            vals.append(v)
        pick = torch.stack(errs).argmin(0)
        v = torch.stack(vals)[pick, torch.arange(len(u))]
        for j in range(len(levels)):
            m = pick == j
            if m.any():
                levels[j] = (u[m] * v[m]).sum() / (v[m] * v[m]).sum()
    add("e8p + 4 gain bits per vector", 2.5 + 16 / k, (levels[pick][:, None] * v).reshape(w.shape) * s, False)
    for preset in ("rbe-2", "rbe-2.5", "rbe-3", "rbe-4"):
        spec = RBEConfig.from_preset(preset, rotation=False).base_spec()
        tab = tables_for(spec)
        enc = v1_codec.encode_layer(w, spec, tab, 0)
        add(f"v1 {preset}", spec.bits_per_weight_estimate(k), v1_codec.decode_layer(enc, spec, tab, k), False)
    return rows


def table_md(rows: list[dict], meta: dict) -> str:
    lines = [f"`{meta['command']}` on {meta['machine']}, {meta['date']}", "",
             f"N(0,1) matrix {TEST_ROWS} x {TEST_COLS}, per-row fp16 scales counted:", "",
             "| codebook | bits/weight | relative MSE | Shannon bound | in v2 |", "|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["bits_per_weight"], r["rel_mse"])):
        lines.append(f"| {r['codebook']} | {r['bits_per_weight']:.3f} | {r['rel_mse']:.4f} | "
                     f"{r['shannon_bound']:.4f} | {'yes' if r['chosen_for_v2'] else ''} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--measure-only", action="store_true", help="measure with the shipped tables, fit nothing")
    ap.add_argument("--out", default="results/v2_codebook")
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.measure_only:
        tables = T._shipped()
    else:
        tables = fit_tables()
        save_file({k: v.contiguous() for k, v in tables.items()}, str(T.TABLE_FILE))
        T._shipped.cache_clear()
    g = torch.Generator().manual_seed(123)
    signs8 = _signs8_table(torch.randn(FIT_SAMPLES, 8, generator=g))
    w = torch.randn(TEST_ROWS, TEST_COLS, generator=torch.Generator().manual_seed(7))
    rows = measure(w, tables, signs8)
    meta = run_meta()
    md = table_md(rows, meta)
    write_results(args.out, meta, rows, md)
    print(md)


if __name__ == "__main__":
    main()
