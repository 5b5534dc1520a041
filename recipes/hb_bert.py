"""Euclidean MiniLM vs Hb-BERT (MiniLM moved into the Poincaré ball), fine-tuned under the same
budget, then compressed with RBE: does hyperbolic space help, and does it survive compression?

    python recipes/hb_bert.py                       # 2 tasks x 2 models x 3 seeds: results/hb_bert.{json,md}
    python recipes/hb_bert.py --seeds 0 --steps 20  # a quick look

Tasks (fixed splits, ``--train`` / ``--test`` examples):
  sentiment  the movie-review snippets (label = sign of the rating);
  hypernymy  WordNet noun pairs: is one noun a hypernym of the other (``hf_rbe.data.hypernym_pairs``).
Models: the Euclidean ``BertForSequenceClassification`` (pooler + linear head) and
``HbBertForSequenceClassification`` (``to_hb_bert``, gyro-midpoint pooling, hyperbolic MLR head,
learnable curvature), both from all-MiniLM-L6-v2. Both train with ``Trainer`` and geoopt's
Riemannian Adam (plain Adam on Euclidean parameters; on the ball for the MLR's class points),
the same steps, batch, learning rates and seeds. Each fine-tuned model is saved, reloaded with
``quantization_config=RBEConfig.from_preset(p)`` for each ``--presets`` p, and tested again.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np
import torch
from datasets import Dataset
from geoopt.optim import RiemannianAdam
from transformers import (
    AutoModel,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
    set_seed,
)
from transformers.utils import logging as hf_logging

import hf_rbe
from hf_rbe import RBEConfig
from hf_rbe.core.packed import packed_size
from hf_rbe.data import hypernym_pairs, minilm_path, movie_reviews
from hf_rbe.data.fetch import ensure
from hf_rbe.evaluation.results import run_meta, write_results
from hf_rbe.hyperbolic.hb_bert import to_hb_bert


def task_data(task: str, tok, n_train: int, n_test: int) -> tuple[Dataset, Dataset]:  # type: ignore[no-untyped-def]
    if task == "sentiment":
        rows = movie_reviews()
        order = np.random.default_rng(0).permutation(len(rows))
        split = {"train": [rows[i] for i in order[:n_train]], "test": [rows[i] for i in order[n_train : n_train + n_test]]}
        enc = {k: tok([r["text"] for r in v], truncation=True, max_length=64) for k, v in split.items()}
    else:
        pairs = hypernym_pairs(n_train, n_test)
        split = {k: list(pairs[k]) for k in ("train", "test")}
        enc = {k: tok([r["word_a"] for r in v], [r["word_b"] for r in v]) for k, v in split.items()}
    out = [Dataset.from_dict({**enc[k], "labels": [r["label"] for r in split[k]]}) for k in ("train", "test")]
    return out[0], out[1]


@torch.no_grad()
def accuracy(model: torch.nn.Module, data: Dataset, collate) -> float:  # type: ignore[no-untyped-def]
    model.eval()
    correct = 0
    for i in range(0, len(data), 128):
        batch = collate([data[j] for j in range(i, min(i + 128, len(data)))])
        labels = batch.pop("labels")
        correct += int((model(**batch).logits.argmax(-1) == labels).sum())
    return correct / len(data)


def build(kind: str, base: str, curvature: float, workdir: str) -> torch.nn.Module:
    if kind == "euclidean":
        return AutoModelForSequenceClassification.from_pretrained(base, num_labels=2)
    # convert the encoder, save it, and load the classifier through the Auto classes
    to_hb_bert(AutoModel.from_pretrained(base), curvature=curvature).save_pretrained(workdir)
    return AutoModelForSequenceClassification.from_pretrained(workdir, num_labels=2)


def finetune(model: torch.nn.Module, data: Dataset, collate, args: argparse.Namespace, seed: int) -> float:  # type: ignore[no-untyped-def]
    head = [p for n, p in model.named_parameters() if n.startswith(("classifier", "hb_bert.ball"))]
    body = [p for n, p in model.named_parameters() if not n.startswith(("classifier", "hb_bert.ball"))]
    opt = RiemannianAdam([{"params": body, "lr": args.lr}, {"params": head, "lr": args.head_lr}], stabilize=10)
    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArguments(output_dir=tmp, max_steps=args.steps, per_device_train_batch_size=args.batch,
                                  report_to=[], save_strategy="no", use_cpu=True, seed=seed, logging_steps=10**6,
                                  disable_tqdm=True)
        res = Trainer(model=model, args=targs, train_dataset=data, data_collator=collate,
                      optimizers=(opt, None)).train()
    return float(res.metrics["train_runtime"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=["sentiment", "hypernymy"], choices=["sentiment", "hypernymy"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=60, help="training steps per run (same for both models)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-5, help="encoder learning rate")
    ap.add_argument("--head-lr", type=float, default=1e-3, help="head (and curvature) learning rate")
    ap.add_argument("--curvature", type=float, default=1.0, help="initial curvature c of Hb-BERT's ball")
    ap.add_argument("--train", type=int, default=2000)
    ap.add_argument("--test", type=int, default=1000)
    ap.add_argument("--presets", nargs="+", default=["rbe-2", "rbe-3"], choices=sorted(hf_rbe.PRESETS))
    ap.add_argument("--out", default="results/hb_bert")
    args = ap.parse_args()
    ensure("minilm", "movie_reviews", "wordnet")
    hf_logging.set_verbosity_error()
    t_start = time.perf_counter()
    base = minilm_path()
    tok = AutoTokenizer.from_pretrained(base)
    collate = DataCollatorWithPadding(tok)

    rows = []
    for task in args.tasks:
        train_set, test_set = task_data(task, tok, args.train, args.test)
        for seed in args.seeds:
            for kind in ("euclidean", "hyperbolic"):
                with tempfile.TemporaryDirectory() as tmp:
                    set_seed(seed)
                    model = build(kind, base, args.curvature, f"{tmp}/converted")
                    secs = finetune(model, train_set, collate, args, seed)
                    row = {"task": task, "model": kind, "seed": seed, "train_seconds": secs,
                           "fp32": accuracy(model, test_set, collate)}
                    if kind == "hyperbolic":
                        row["curvature_after"] = float(model.hb_bert.ball.c)
                    model.save_pretrained(f"{tmp}/tuned")
                    for preset in args.presets:
                        q = AutoModelForSequenceClassification.from_pretrained(
                            f"{tmp}/tuned", quantization_config=RBEConfig.from_preset(preset))
                        row[preset] = accuracy(q, test_set, collate)
                        row[f"{preset}_bpw"] = packed_size(q)["bits_per_weight"]
                rows.append(row)
                print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
    meta = {**run_meta(), "seconds": round(time.perf_counter() - t_start),
            "budget": f"{args.steps} steps of {args.batch}, lr {args.lr} (head and curvature {args.head_lr}), "
                      f"initial curvature {args.curvature}", "split": f"{args.train} train / {args.test} test"}
    md = table(rows, args.presets, meta)
    write_results(args.out, meta, rows, md)
    print(md)


def table(rows: list[dict], presets: list[str], meta: dict) -> str:
    def cell(vals: list[float]) -> str:
        spread = statistics.stdev(vals) if len(vals) > 1 else 0.0
        return f"{statistics.mean(vals):.3f} ± {spread:.3f}"

    cols = ["fp32"] + presets
    bpw = {p: statistics.mean(r[f"{p}_bpw"] for r in rows) for p in presets}
    lines = [f"`{meta['command']}` on {meta['machine']}, {meta['date']} ({meta['seconds']} s in all); "
             f"{meta['budget']}; {meta['split']} examples per task; test accuracy, mean ± standard deviation "
             f"over seeds {sorted({r['seed'] for r in rows})}.", "",
             "| task | model | " + " | ".join(["fp32"] + [f"{p} ({bpw[p]:.2f} bpw)" for p in presets]) + " |",
             "|---|---|" + "---|" * len(cols)]
    for task in dict.fromkeys(r["task"] for r in rows):
        for kind in ("euclidean", "hyperbolic"):
            rs = [r for r in rows if r["task"] == task and r["model"] == kind]
            name = "MiniLM (Euclidean)" if kind == "euclidean" else "Hb-BERT (Poincaré)"
            lines.append(f"| {task} | {name} | " + " | ".join(cell([r[c] for r in rs]) for c in cols) + " |")
    curv = [r["curvature_after"] for r in rows if "curvature_after" in r]
    if curv:
        lines += ["", f"Hb-BERT curvature after training: {min(curv):.3f} to {max(curv):.3f}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
