"""The main job: quantize real models with RBE on load and report size, quality and speed.

    python recipes/quantize.py                          # SmolLM2-135M at v2-3, calibrated, plus MiniLM
    python recipes/quantize.py --settings v2-3 --no-calibration   # a few minutes: no calibration

For each setting, SmolLM2-135M-Instruct is quantized while it loads
(``from_pretrained(..., quantization_config=RBEConfig.from_preset(name, dataset="wikipedia", ...))``:
calibrated on Wikipedia windows after the scored text, embedding and tied head stored in bf16),
generates a few tokens greedily, is saved with ``save_pretrained`` and reloaded with a plain
``from_pretrained`` in a fresh Python process, which must give bit-identical logits; the peak
resident memory of the process while it quantized is recorded (the quantized settings run before
the unquantized reference is loaded). Its
perplexity on the first ``--tokens`` tokens of the Wikipedia articles (sliding window,
context and stride printed) and its greedy decoding speed on this machine stand next to the
unquantized model's. all-MiniLM-L6-v2 is quantized at the default preset (calibrated the same
way) and scored by sentence-embedding cosine to fp32 on the first 1,000 movie-review
snippets. Results go to ``runs/quantize.{json,md}`` and the model cards to ``runs/model_cards``
(pass ``--out results/quantize --cards model_cards`` to replace the committed ones).
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

import hf_rbe
from hf_rbe import RBEConfig
from hf_rbe.core.packed import packed_size
from hf_rbe.data import minilm_path, movie_reviews, smollm2_path, token_stream
from hf_rbe.data.fetch import ensure
from hf_rbe.evaluation.measure import decode_speed, mean_pooled_embeddings, perplexity
from hf_rbe.evaluation.memory import MemoryProfile
from hf_rbe.evaluation.reload import reload_verdict
from hf_rbe.evaluation.results import run_meta, write_results
from hf_rbe.hf.config import DEFAULT_PRESET

PROMPT = "The capital of France is"


def wiki_ids(tokenizer, n_tokens: int) -> torch.Tensor:
    ids = token_stream(tokenizer, "wikipedia")
    if ids.numel() < n_tokens:
        raise ValueError(f"the Wikipedia text has only {ids.numel()} tokens")
    return ids[:n_tokens]


def generate(model, tokenizer) -> str:
    x = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**x, max_new_tokens=20, do_sample=False)
    return tokenizer.decode(out[0], skip_special_tokens=True)


def reload_check(model, saved: Path, cards: Path, card_name: str) -> tuple[str, int]:
    """Save, reload in a fresh process, compare logits bit for bit; returns verdict and bytes on disk.
    The model card ``save_pretrained`` writes is kept as ``cards/card_name``."""
    model.save_pretrained(saved)
    cards.mkdir(parents=True, exist_ok=True)
    (cards / card_name).write_text((saved / "README.md").read_text())
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314, 253, 1345]])
    with torch.no_grad():
        logits = model(ids).logits
    disk = sum(f.stat().st_size for f in saved.glob("*.safetensors"))
    return reload_verdict(saved, ids, logits), disk


# Calibration as in recipes/calibrate.py (RBEConfig's defaults): windows of Wikipedia after its first
# 32,768 tokens (never scored).
CALIBRATION = {"dataset": "wikipedia"}


def config(name: str, calibrate: bool, **kw: object) -> RBEConfig:
    return RBEConfig.from_preset(name, **{"embedding_dtype": "bfloat16", **(CALIBRATION if calibrate else {}), **kw})


def smollm2(settings: list[str], calibrate: bool, n_tokens: int, context: int, stride: int, cards: Path) -> list[dict]:
    """The quantized settings first, each with the peak resident memory of the whole process while it
    quantized (``MemoryProfile``: what a machine's memory limit is checked against, libraries
    included), then the unquantized reference, so that no float model was ever in this process
    before the quantized ones are measured."""
    path = smollm2_path()
    tok = AutoTokenizer.from_pretrained(path)
    ids = wiki_ids(tok, n_tokens)
    rows = []
    for name in settings:
        t0 = time.perf_counter()
        with MemoryProfile() as mem:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                         quantization_config=config(name, calibrate)).eval()
        secs = time.perf_counter() - t0
        size = packed_size(model)
        text = generate(model, tok)
        with tempfile.TemporaryDirectory() as tmp:
            repo = f"SmolLM2-135M-Instruct-rbe-{name}"  # the name its card gives the checkpoint
            verdict, disk = reload_check(model, Path(tmp) / repo, cards, f"{repo}.md")
        ppl = perplexity(model, ids, context, stride)
        speed = decode_speed(model)
        label = f"{name} calibrated" if calibrate else name
        rows.append({"model": "SmolLM2-135M", "setting": label, **size, "load_and_quantize_seconds": secs,
                     "quantize_peak_rss_mib": mem.peak_mib, "rss_before_quantizing_mib": mem.base_mib, "memory_phases": mem.as_dict()["phases"],
                     "bytes_on_disk": disk, "reload": verdict, **ppl.as_dict(), "generation": text,
                     "decode_tokens_per_s": speed.tokens_per_second})
        print(f"{label}: {size['bits_per_weight']:.3f} bits/weight over {size['rbe_layers']} layers, "
              f"{disk / 2**20:.1f} MiB on disk, quantized in {secs:.0f} s at a peak of {mem.peak_mib:.0f} MiB "
              f"resident, reload {verdict}, perplexity {ppl.perplexity:.3f}, decoding "
              f"{speed.tokens_per_second:.1f} tokens/s\n  {text!r}")
        del model
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ppl = perplexity(ref, ids, context, stride)
    n_params = sum(p.numel() for p in ref.parameters())
    speed = decode_speed(ref)
    rows.insert(0, {"model": "SmolLM2-135M", "setting": "fp32 (unquantized)", "bits_per_weight": 32.0,
                    **ppl.as_dict(), "generation": generate(ref, tok), "params": n_params,
                    "decode_tokens_per_s": speed.tokens_per_second})
    print(f"fp32: perplexity {ppl.perplexity:.3f} ({ppl.tokens_scored} tokens, context {context}, stride {stride}), "
          f"decoding {speed.tokens_per_second:.1f} tokens/s on {speed.threads} threads")
    return rows


def minilm(setting: str, calibrate: bool, n_sentences: int = 1000) -> dict:
    path = minilm_path()
    tok = AutoTokenizer.from_pretrained(path)
    sentences = [r["text"] for r in movie_reviews()[:n_sentences]]
    ref = mean_pooled_embeddings(AutoModel.from_pretrained(path).eval(), tok, sentences)
    model = AutoModel.from_pretrained(path, quantization_config=config(setting, calibrate, calibration_seqlen=256)).eval()
    cos = (mean_pooled_embeddings(model, tok, sentences) * ref).sum(-1)
    size = packed_size(model)
    setting = f"{setting} calibrated" if calibrate else setting
    print(f"MiniLM {setting}: {size['bits_per_weight']:.3f} bits/weight over {size['rbe_layers']} layers, "
          f"embedding cosine to fp32 {cos.mean():.4f} (min {cos.min():.4f}) on {n_sentences} sentences")
    return {"model": "all-MiniLM-L6-v2", "setting": setting, **size, "cos_mean": float(cos.mean()),
            "cos_min": float(cos.min()), "sentences": n_sentences}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", nargs="+", default=["v2-3"], choices=sorted(hf_rbe.PRESETS))
    ap.add_argument("--no-calibration", dest="calibrate", action="store_false",
                    help="encode by weight error alone (minutes instead of about 10 per SmolLM2 setting)")
    ap.add_argument("--tokens", type=int, default=8192, help="Wikipedia tokens scored for perplexity")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--stride", type=int, default=1024)
    ap.add_argument("--out", default="runs/quantize", help="output path without extension")
    ap.add_argument("--cards", default="runs/model_cards", help="where the quantized checkpoints' model cards go "
                    "(the committed one: model_cards)")
    args = ap.parse_args()
    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    ensure("smollm2", "minilm", "wikipedia", "movie_reviews")

    rows = smollm2(args.settings, args.calibrate, args.tokens, args.context, args.stride, Path(args.cards))
    rows.append(minilm(DEFAULT_PRESET, args.calibrate))
    meta = {**run_meta(), "hf_rbe": hf_rbe.__version__,
            "process_peak_rss_mib": f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f}"}
    write_results(args.out, meta, rows, table(rows, meta))
    print(table(rows, meta))


def _num(row: dict, key: str, factor: float) -> str:
    return f"{row[key] * factor:.0f}" if key in row else "-"


def table(rows: list[dict], meta: dict) -> str:
    lm = [r for r in rows if r["model"] == "SmolLM2-135M"]
    lines = [f"`{meta['command']}` on {meta['machine']}, {meta['date']}", "",
             f"SmolLM2-135M-Instruct, Wikipedia perplexity over the first {lm[0]['tokens_total']} tokens "
             f"(context {lm[0]['context']}, stride {lm[0]['stride']}, {lm[0]['tokens_scored']} tokens scored):", "",
             "| setting | bits/weight (RBE layers) | MiB on disk | perplexity | decode tokens/s | quantized in, min "
             "| peak RSS while quantizing, MiB | reload | greedy text |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in lm:
        disk = f"{r['bytes_on_disk'] / 2**20:.1f}" if "bytes_on_disk" in r else f"{r['params'] * 4 / 2**20:.1f}"
        lines.append(f"| {r['setting']} | {r['bits_per_weight']:.3f} | {disk} | {r['perplexity']:.3f} | "
                     f"{r['decode_tokens_per_s']:.1f} | {_num(r, 'load_and_quantize_seconds', 1 / 60)} | "
                     f"{_num(r, 'quantize_peak_rss_mib', 1)} | {r.get('reload', '-')} | {r['generation']!r} |")
    for r in rows:
        if r["model"] == "all-MiniLM-L6-v2":
            lines += ["", f"all-MiniLM-L6-v2 at {r['setting']} ({r['bits_per_weight']:.3f} bits/weight, "
                          f"{r['rbe_layers']} layers): embedding cosine to fp32 {r['cos_mean']:.4f} "
                          f"(min {r['cos_min']:.4f}) on {r['sentences']} movie-review sentences."]
    lines.append(f"\nPeak RSS: the whole process's resident memory while it quantized (libraries included), "
                 f"sampled every 10 ms; the process's peak over the whole job was {meta['process_peak_rss_mib']} MiB. "
                 f"Decoding: greedy, batch 1, {torch.get_num_threads()} threads, load average at the end "
                 f"{meta['load_average']} (`bench/cpu_speed.py` has the side-by-side benchmark). The GGUF "
                 "the SmolLM2 weights come from is Q4_1 (a 4-bit grid, blocks of 32); the unquantized row is "
                 "that model dequantized to fp32; quantized rows store the embedding and tied head in bf16.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
