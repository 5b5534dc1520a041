"""MiniLM sentiment classifier: fp32 fine-tuning vs RBE QAT fine-tuning under the same budget.

    python recipes/qat_minilm.py                  # rbe-2.5, 60 steps each, results/qat_minilm.{json,md}

all-MiniLM-L6-v2 with a fresh classification head, trained with ``Trainer`` on the movie-review
snippets (label = sign of the rating; a fixed shuffled split, 80% train / 20% test):
(1) in fp32; (2) quantized at ``--preset`` with ``qat=True`` (codes re-encoded every
``--reencode-every`` steps, straight-through gradients; with ``--train-quantizer`` the scales,
gain curves and basis tables train too); (3) the fp32 fine-tuned model quantized after
training (post-training quantization), for reference. Test accuracy of each. The encoder
trains at ``--lr``; the new head (and trained scales and tables) at ``--head-lr``, in both runs.
"""

from __future__ import annotations

import argparse
import tempfile

import numpy as np
import torch
from datasets import Dataset
from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments
from transformers.utils import logging as hf_logging

import hf_rbe
from hf_rbe import RBEConfig, quantize_model
from hf_rbe.data import minilm_path, movie_reviews
from hf_rbe.data.fetch import ensure
from hf_rbe.evaluation.results import run_meta, write_results
from hf_rbe.training import ReencodeCallback, freeze, quantizer_parameters


def splits(tok, seed: int = 0) -> tuple[Dataset, Dataset]:  # type: ignore[no-untyped-def]
    rows = movie_reviews()
    order = np.random.default_rng(seed).permutation(len(rows))
    cut = int(0.8 * len(rows))

    def build(idx: np.ndarray) -> Dataset:
        enc = tok([rows[i]["text"] for i in idx], truncation=True, max_length=64, padding="max_length")
        return Dataset.from_dict({**enc, "labels": [rows[i]["label"] for i in idx]})

    return build(order[:cut]), build(order[cut:])


@torch.no_grad()
def accuracy(model: torch.nn.Module, data: Dataset) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(data), 256):
        batch = data[i : i + 256]
        logits = model(input_ids=torch.tensor(batch["input_ids"]),
                       attention_mask=torch.tensor(batch["attention_mask"])).logits
        correct += int((logits.argmax(-1) == torch.tensor(batch["labels"])).sum())
    return correct / len(data)


def train(model: torch.nn.Module, data: Dataset, steps: int, lr: float, head_lr: float, callbacks: list) -> float:
    # the new head and, when trained, the quantizer's scales and tables start far from their
    # optimum (or are few): they get ``head_lr``
    fast = [p for n, p in model.named_parameters() if n.startswith("classifier")] + quantizer_parameters(model)
    special = {id(x) for x in fast}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in special]
    opt = torch.optim.AdamW([{"params": rest, "lr": lr}, {"params": fast, "lr": head_lr}])
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, max_steps=steps, per_device_train_batch_size=32, learning_rate=lr,
                                 report_to=[], save_strategy="no", use_cpu=True, seed=0, logging_steps=50)
        result = Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks, optimizers=(opt, None)).train()
    return float(result.metrics["train_runtime"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="rbe-2.5", choices=sorted(hf_rbe.PRESETS))
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--head-lr", type=float, default=1e-3, help="learning rate of the head (and trained scales/tables)")
    ap.add_argument("--reencode-every", type=int, default=20)
    ap.add_argument("--train-quantizer", action="store_true",
                    help="also train scales, gain curves and basis tables (RBEConfig(qat_train_quantizer=True))")
    ap.add_argument("--out", default="results/qat_minilm")
    args = ap.parse_args()
    ensure("minilm", "movie_reviews")
    hf_logging.set_verbosity_error()
    path = minilm_path()
    tok = AutoTokenizer.from_pretrained(path)
    train_set, test_set = splits(tok)

    torch.manual_seed(0)
    fp32 = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    t_fp32 = train(fp32, train_set, args.steps, args.lr, args.head_lr, [])
    acc_fp32 = accuracy(fp32, test_set)
    acc_ptq = accuracy(quantize_model(fp32, RBEConfig.from_preset(args.preset)), test_set)

    torch.manual_seed(0)
    qat = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=2,
        quantization_config=RBEConfig.from_preset(args.preset, qat=True, qat_train_quantizer=args.train_quantizer))
    t_qat = train(qat, train_set, args.steps, args.lr, args.head_lr, [ReencodeCallback(args.reencode_every)])
    acc_qat = accuracy(freeze(qat), test_set)

    rows = [{"model": "fp32 fine-tuned", "accuracy": acc_fp32, "train_seconds": t_fp32},
            {"model": f"fp32 fine-tuned, then {args.preset} (post-training)", "accuracy": acc_ptq, "train_seconds": t_fp32},
            {"model": f"{args.preset} QAT fine-tuned{' (scales and tables trained too)' if args.train_quantizer else ''}"
                      " (frozen codes)", "accuracy": acc_qat, "train_seconds": t_qat}]
    meta = {**run_meta(), "split": f"{len(train_set)} train / {len(test_set)} test snippets, shuffled with seed 0",
            "steps": str(args.steps)}
    md = "\n".join([f"`{meta['command']}` on {meta['machine']}, {meta['date']}; {meta['split']}; "
                    f"{args.steps} steps of 32, lr {args.lr} (head, scales, tables {args.head_lr})", "",
                    "| model | test accuracy | train time (s) |", "|---|---|---|"]
                   + [f"| {r['model']} | {r['accuracy']:.4f} | {r['train_seconds']:.0f} |" for r in rows]) + "\n"
    write_results(args.out, meta, rows, md)
    print(md)


if __name__ == "__main__":
    main()
