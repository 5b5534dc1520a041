"""Quantization-aware training of SmolLM2-135M at an RBE setting, with Trainer, on Wikipedia text.

    python recipes/qat.py                          # rbe-2.5, 30 minutes, distillation on
    python recipes/qat.py --minutes 5 --no-kd      # a quick look

Held-out text: the first ``--eval-tokens`` Wikipedia tokens; training text: everything after
the first 32,768 tokens (never scored anywhere). The latent weights start from the fp32
weights; codes are refreshed every ``--reencode-every`` steps; the loss is cross-entropy,
mixed half and half with KL to the fp32 model's logits when distilling. After the time budget
the model is frozen into codes, saved, reloaded, and scored. Writes results/qat.{json,md}.
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments
from transformers.utils import logging as hf_logging

import hf_rbe
from hf_rbe import RBEConfig
from hf_rbe.data import lm_splits, smollm2_path
from hf_rbe.data.fetch import ensure
from hf_rbe.evaluation.measure import perplexity
from hf_rbe.evaluation.results import run_meta, write_results
from hf_rbe.training import (
    DistillTrainer,
    ReencodeCallback,
    TimeBudgetCallback,
    freeze,
    prepare_qat,
    quantizer_parameters,
)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="rbe-2.5", choices=sorted(hf_rbe.PRESETS))
    ap.add_argument("--minutes", type=float, default=30.0, help="training time budget")
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--reencode-every", type=int, default=25)
    ap.add_argument("--no-kd", action="store_true", help="plain cross-entropy, no distillation")
    ap.add_argument("--train-quantizer", action="store_true",
                    help="also train scales, gain curves and basis tables (RBEConfig(qat_train_quantizer=True))")
    ap.add_argument("--quantizer-lr", type=float, default=1e-4, help="learning rate of trained scales and tables")
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--out", default="results/qat")
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    ensure("smollm2", "wikipedia")
    hf_logging.set_verbosity_error()
    torch.manual_seed(0)

    path = smollm2_path()
    tok = AutoTokenizer.from_pretrained(path)
    held_out, data = lm_splits(tok, args.eval_tokens, args.seq)

    teacher = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ppl_fp32 = perplexity(teacher, held_out, 1024, 1024).perplexity
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                 quantization_config=RBEConfig.from_preset(
                                                     args.preset, qat=True, qat_train_quantizer=args.train_quantizer))
    prepare_qat(model, latent_from=teacher)  # latent weights from fp32, not from the decoded codes
    ppl_ptq = perplexity(model.eval(), held_out, 1024, 1024).perplexity
    print(f"held-out perplexity: fp32 {ppl_fp32:.2f}, {args.preset} post-training {ppl_ptq:.2f}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArguments(output_dir=tmp, max_steps=100_000, per_device_train_batch_size=args.batch,
                                  learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0,
                                  logging_steps=5, report_to=[], save_strategy="no", use_cpu=True, seed=0)
        callbacks = [ReencodeCallback(args.reencode_every), TimeBudgetCallback(args.minutes)]
        quant = quantizer_parameters(model)
        special = {id(x) for x in quant}
        rest = [p for p in model.parameters() if p.requires_grad and id(p) not in special]
        opt = torch.optim.AdamW([{"params": rest, "lr": args.lr}] + ([{"params": quant, "lr": args.quantizer_lr}]
                                                                     if quant else []),
                                weight_decay=0.0)  # as Trainer's default optimizer
        common = dict(model=model.train(), args=targs, train_dataset=data, callbacks=callbacks, optimizers=(opt, None))
        trainer = Trainer(**common) if args.no_kd else DistillTrainer(**common, teacher=teacher)
        result = trainer.train()
        freeze(model)
        model.save_pretrained(Path(tmp) / "frozen")
        reloaded = AutoModelForCausalLM.from_pretrained(Path(tmp) / "frozen").eval()
    ppl_qat = perplexity(reloaded, held_out, 1024, 1024).perplexity
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    gap_closed = (ppl_ptq - ppl_qat) / (ppl_ptq - ppl_fp32)
    nll_gap_closed = (math.log(ppl_ptq) - math.log(ppl_qat)) / (math.log(ppl_ptq) - math.log(ppl_fp32))
    row = {"preset": args.preset, "minutes": args.minutes, "steps": trainer.state.global_step, "lr": args.lr,
           "train_quantizer": args.train_quantizer, "quantizer_lr": args.quantizer_lr if args.train_quantizer else None,
           "batch": args.batch, "seq": args.seq, "kd": not args.no_kd, "reencode_every": args.reencode_every,
           "train_seconds": result.metrics["train_runtime"], "losses_every_5_steps": losses,
           "heldout_tokens": args.eval_tokens, "ppl_fp32": ppl_fp32, "ppl_ptq": ppl_ptq,
           "ppl_qat_frozen_reloaded": ppl_qat, "gap_closed": gap_closed, "nll_gap_closed": nll_gap_closed}
    meta = run_meta()
    md = (f"`{meta['command']}` on {meta['machine']}, {meta['date']}\n\n"
          f"QAT of SmolLM2-135M at {args.preset}: {row['steps']} steps of {args.batch}x{args.seq} tokens in "
          f"{row['train_seconds'] / 60:.1f} min, lr {args.lr}, {'distillation from fp32 + CE' if row['kd'] else 'CE'}, "
          f"{f'scales and tables trained (lr {args.quantizer_lr}), ' if args.train_quantizer else ''}"
          f"codes re-encoded every {args.reencode_every} steps. Held-out: first {args.eval_tokens} Wikipedia tokens, "
          "context 1024, stride 1024.\n\n| model | held-out perplexity |\n|---|---|\n"
          f"| fp32 | {ppl_fp32:.2f} |\n| {args.preset} post-training | {ppl_ptq:.2f} |\n"
          f"| {args.preset} after QAT (frozen, saved, reloaded) | {ppl_qat:.2f} |\n\n"
          f"Gap to fp32 closed: {100 * gap_closed:.1f}% in perplexity, "
          f"{100 * nll_gap_closed:.1f}% in log-perplexity (nats per token).\n")
    write_results(args.out, meta, [row], md)
    print(md)


if __name__ == "__main__":
    main()
