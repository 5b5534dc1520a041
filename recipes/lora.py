"""LoRA on an RBE-quantized SmolLM2-135M with PEFT + Trainer, then merge into the codes.

    python recipes/lora.py                       # rbe-2.5, 20 steps, results/lora.{json,md}
    python recipes/lora.py --preset rbe-3 --steps 200

The codes stay frozen; LoRA adapters (all linear layers) train on Wikipedia text that comes
after the held-out part (the first ``--eval-tokens`` tokens, the same text the quantize
recipe scores). Held-out perplexity is measured before training, after training (adapters
active) and after ``hf_rbe.training.merge_and_unload`` re-encodes W + BA into RBE codes.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments
from transformers.utils import logging as hf_logging

import hf_rbe
from hf_rbe import RBEConfig, RBELinear
from hf_rbe.data import lm_splits, smollm2_path
from hf_rbe.data.fetch import ensure
from hf_rbe.evaluation.measure import perplexity
from hf_rbe.evaluation.results import run_meta, write_results
from hf_rbe.training import TimeBudgetCallback, merge_and_unload


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="rbe-2.5", choices=sorted(hf_rbe.PRESETS))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--minutes", type=float, default=None, help="time budget instead of a step count")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--eval-tokens", type=int, default=8192, help="held-out tokens (the start of the text)")
    ap.add_argument("--out", default="results/lora")
    args = ap.parse_args()
    ensure("smollm2", "wikipedia")
    hf_logging.set_verbosity_error()
    torch.manual_seed(0)

    path = smollm2_path()
    tok = AutoTokenizer.from_pretrained(path)
    held_out, data = lm_splits(tok, args.eval_tokens, args.seq)

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                 quantization_config=RBEConfig.from_preset(args.preset))
    ppl_before = perplexity(model.eval(), held_out, 1024, 1024).perplexity
    peft_model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                                                  target_modules="all-linear", task_type="CAUSAL_LM"))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArguments(output_dir=tmp, max_steps=100_000 if args.minutes else args.steps, per_device_train_batch_size=args.batch,
                                  learning_rate=args.lr, lr_scheduler_type="constant", logging_steps=1,
                                  report_to=[], save_strategy="no", use_cpu=True, seed=0)
        callbacks = [TimeBudgetCallback(args.minutes)] if args.minutes else []
        trainer = Trainer(model=peft_model, args=targs, train_dataset=data, callbacks=callbacks)
        result = trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    ppl_adapter = perplexity(peft_model.eval(), held_out, 1024, 1024).perplexity
    merged = merge_and_unload(peft_model)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    n_rbe = sum(isinstance(m, RBELinear) for m in merged.modules())
    ppl_merged = perplexity(merged.eval(), held_out, 1024, 1024).perplexity

    row = {"preset": args.preset, "steps": trainer.state.global_step, "minutes": args.minutes, "lr": args.lr, "rank": args.rank, "batch": args.batch,
           "seq": args.seq, "trainable_params": trainable, "losses": losses,
           "first5_mean_loss": sum(losses[:5]) / 5, "last5_mean_loss": sum(losses[-5:]) / 5,
           "train_seconds": result.metrics["train_runtime"], "heldout_tokens": args.eval_tokens,
           "ppl_before": ppl_before, "ppl_with_adapters": ppl_adapter, "ppl_merged": ppl_merged,
           "rbe_layers_after_merge": n_rbe}
    meta = run_meta()
    md = (f"`{meta['command']}` on {meta['machine']}, {meta['date']}\n\n"
          f"LoRA r={args.rank} on all linear layers of SmolLM2-135M at {args.preset} ({trainable:,} trainable "
          f"parameters), {row['steps']} steps of {args.batch}x{args.seq} tokens, lr {args.lr}, "
          f"{row['train_seconds']:.0f} s.\n\n"
          "| | mean loss, first 5 steps | mean loss, last 5 steps | held-out perplexity |\n|---|---|---|---|\n"
          f"| before training | {row['first5_mean_loss']:.3f} | | {ppl_before:.2f} |\n"
          f"| with adapters | | {row['last5_mean_loss']:.3f} | {ppl_adapter:.2f} |\n"
          f"| merged into RBE codes ({n_rbe} layers) | | | {ppl_merged:.2f} |\n\n"
          f"Held-out perplexity: first {args.eval_tokens} Wikipedia tokens, context 1024, stride 1024.\n")
    write_results(args.out, meta, [row], md)
    print(md)


if __name__ == "__main__":
    main()
