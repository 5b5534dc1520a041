"""RBE on the real all-MiniLM-L6-v2: weight error vs bits, next to scalar and the Shannon bound,
and sentence-embedding cosine to fp32 on 1,000 real movie-review sentences.

    python bench/minilm.py                 # every preset, writes results/minilm.{json,md}

Bits per weight count everything stored for the 37 Linear layers: codes, scales, rotation
seeds and the shared tables. relMSE = sum ||W - W_hat||^2 / sum ||W||^2 over the layers.
Scalar baseline: asymmetric min-max b-bit with an fp16 scale and zero per group of g.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from transformers import AutoModel, AutoTokenizer
from transformers.utils import logging as hf_logging

import hf_rbe
from hf_rbe import RBEConfig, RBELinear
from hf_rbe.data import minilm_path, movie_reviews
from hf_rbe.data.fetch import ensure
from hf_rbe.evaluation.baselines import minmax_quantize
from hf_rbe.evaluation.measure import mean_pooled_embeddings
from hf_rbe.evaluation.results import run_meta, write_results

N_SENTENCES = 1000
SCALAR = [(2, 128), (2, 64), (2, 32), (3, 128), (3, 64), (4, 128), (4, 64), (5, 64), (6, 64)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", nargs="*", help="preset names (default: all presets)")
    ap.add_argument("--out", default="results/minilm", help="output path without extension")
    args = ap.parse_args()
    ensure("minilm", "movie_reviews")
    hf_logging.disable_progress_bar()
    torch.manual_seed(0)

    path = minilm_path()
    tok = AutoTokenizer.from_pretrained(path)
    sentences = [r["text"] for r in movie_reviews()[:N_SENTENCES]]
    ref = AutoModel.from_pretrained(path).eval()
    ref_emb = mean_pooled_embeddings(ref, tok, sentences)
    linears = {n: m.weight.detach().clone() for n, m in ref.named_modules() if isinstance(m, torch.nn.Linear)}
    n_weights = sum(w.numel() for w in linears.values())
    energy = sum(float(w.double().pow(2).sum()) for w in linears.values())

    rows = []
    settings = {k: v for k, v in hf_rbe.PRESETS.items() if not args.settings or k in args.settings}
    for name in settings:
        t0 = time.perf_counter()
        model = AutoModel.from_pretrained(path, quantization_config=RBEConfig.from_preset(name, modules_to_not_convert=[])).eval()
        secs = time.perf_counter() - t0
        layers = {n: m for n, m in model.named_modules() if isinstance(m, RBELinear)}
        assert len(layers) == len(linears) == 37, (len(layers), len(linears))
        err = sum(float((layers[n].dequantize(torch.float64) - w.double()).pow(2).sum()) for n, w in linears.items())
        bits = sum(m.storage_bits() for m in layers.values())
        cos = (mean_pooled_embeddings(model, tok, sentences) * ref_emb).sum(-1)
        rows.append(_row("RBE " + name, bits / n_weights, err / energy, cos, secs))
        print(_fmt(rows[-1]), flush=True)
    for bits, group in SCALAR:
        model = AutoModel.from_pretrained(path).eval()
        err = 0.0
        for n, m in model.named_modules():
            if isinstance(m, torch.nn.Linear):
                q = minmax_quantize(m.weight.data, bits, group)
                err += float((q.double() - m.weight.data.double()).pow(2).sum())
                m.weight.data = q
        cos = (mean_pooled_embeddings(model, tok, sentences) * ref_emb).sum(-1)
        rows.append(_row(f"scalar {bits}-bit g{group}", bits + 32 / group, err / energy, cos, None))
        print(_fmt(rows[-1]), flush=True)

    meta = {**run_meta(), "hf_rbe": hf_rbe.__version__, "model": "all-MiniLM-L6-v2 (37 Linear layers)",
            "sentences": f"first {N_SENTENCES} movie-review snippets"}
    write_results(args.out, meta, rows, _table(rows, meta))
    print(_table(rows, meta))


def _row(method: str, bpw: float, rel: float, cos: torch.Tensor, secs: float | None) -> dict:
    bound = 2 ** (-2 * bpw)
    return {"method": method, "bits_per_weight": round(bpw, 4), "rel_mse": rel, "shannon_bound": bound,
            "db_from_bound": 10 * math.log10(rel / bound), "cos_mean": float(cos.mean()), "cos_min": float(cos.min()),
            "quantize_seconds": secs}


def _fmt(r: dict) -> str:
    return (f"{r['method']:<22} {r['bits_per_weight']:6.3f} bpw  relMSE {r['rel_mse']:.4f}  bound {r['shannon_bound']:.4f}"
            f"  (+{r['db_from_bound']:.2f} dB)  cos {r['cos_mean']:.4f} (min {r['cos_min']:.4f})")


def _table(rows: list[dict], meta: dict) -> str:
    lines = [f"all-MiniLM-L6-v2, 37 Linear layers; {meta['sentences']}; {meta['machine']}, {meta['date']}", "",
             "| method | bits/weight | relMSE | Shannon bound | dB above bound | embedding cos (mean / min) |",
             "|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: r["bits_per_weight"]):
        lines.append(f"| {r['method']} | {r['bits_per_weight']:.3f} | {r['rel_mse']:.4f} | {r['shannon_bound']:.4f} | "
                     f"{r['db_from_bound']:.2f} | {r['cos_mean']:.4f} / {r['cos_min']:.4f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
