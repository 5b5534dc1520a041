"""Code steps on the end-to-end loss: what moving a calibrated model's codes buys after calibration.

    python recipes/code_steps.py                    # SmolLM2 v2-3: calibrate, then one code step
    python recipes/code_steps.py --preset v2-2 --steps 2 --windows 16

SmolLM2-135M-Instruct is calibrated as ``recipes/calibrate.py`` does (Wikipedia after its first
32,768 tokens, the default block and end-to-end fine-tunes), keeping each layer's Hessian
(``keep_calibration_statistics``). Then, on the first ``--windows`` calibration windows, it takes
``--steps`` code steps on the end-to-end KL to the full-precision model
(``hf_rbe.hf.calibration.codes.model_code_step``: every layer's codes chosen again along
``-G H^-1``, kept only where the measured loss falls), then ``--e2e-steps`` end-to-end
fine-tuning steps of the continuous parameters; the same fine-tune run from the calibrated model
without code steps is the control, so that a gain is compared with what more fine-tuning alone
gives. Each model is
scored in memory (the first ``--tokens`` tokens of Wikipedia and of Austen, context 1024, stride
1024). Results: ``runs/code_steps.{json,md}`` (``--out`` elsewhere).
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

import hf_rbe  # noqa: F401  (registers the quantizer)
from hf_rbe import RBEConfig, RBELinear
from hf_rbe.data import smollm2_path, token_stream
from hf_rbe.data.fetch import ensure
from hf_rbe.evaluation.measure import perplexity
from hf_rbe.evaluation.results import run_meta, write_results
from hf_rbe.hf.calibration.capture import features
from hf_rbe.hf.calibration.codes import model_code_step
from hf_rbe.hf.calibration.finetune import finetune_model
from hf_rbe.hf.calibration.windows import calibration_ids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="v2-3")
    ap.add_argument("--steps", type=int, default=1, help="code steps")
    ap.add_argument("--samples", type=int, default=64, help="calibration windows (RBEConfig's calibration_samples)")
    ap.add_argument("--windows", type=int, default=16, help="calibration windows the code steps measure")
    ap.add_argument("--e2e-steps", type=int, default=16, help="end-to-end fine-tuning steps after the code steps "
                    "(and of the control without them)")
    ap.add_argument("--tokens", type=int, default=8192, help="scored tokens of each corpus")
    ap.add_argument("--out", default="runs/code_steps")
    args = ap.parse_args()
    ensure("smollm2", "wikipedia", "austen")
    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    path = smollm2_path()
    tok = AutoTokenizer.from_pretrained(path)
    streams = {c: token_stream(tok, c)[: args.tokens] for c in ("wikipedia", "austen")}
    rows: list[dict] = []

    def score(model: torch.nn.Module, stage: str, seconds: float, **extra: object) -> None:
        row = {"stage": stage, "seconds": seconds, **extra,
               **{f"{c}_ppl": perplexity(model, ids, 1024, 1024, progress=False).perplexity
                  for c, ids in streams.items()}}
        rows.append(row)
        print(row, flush=True)

    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    score(ref, "fp32", 0.0)
    cfg = RBEConfig.from_preset(args.preset, dataset="wikipedia", keep_calibration_statistics=True,
                                calibration_samples=args.samples, embedding_dtype="bfloat16")
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, quantization_config=cfg).eval()
    score(model, f"{args.preset} calibrated", time.perf_counter() - t0)
    windows = list(calibration_ids(cfg, tok, model.config.vocab_size)[: args.windows].split(1))
    with torch.no_grad():
        teacher = [features(ref, w) for w in windows]
    head = ref.get_output_embeddings()

    tuned = copy.deepcopy(model)  # the same continuous fine-tune without code steps: the control
    t0 = time.perf_counter()
    finetune_model(tuned, windows, teacher, args.e2e_steps, cfg.calibration_e2e_lr, head)
    score(tuned, f"+ {args.e2e_steps} end-to-end steps", time.perf_counter() - t0)
    del tuned

    layers = {n: m for n, m in model.named_modules() if isinstance(m, RBELinear) and m.calibration_hessian is not None}
    hessians = {n: m.calibration_hessian.float() for n, m in layers.items()}
    t0 = time.perf_counter()
    for k in range(args.steps):
        step = model_code_step(model, layers, hessians, windows, teacher, cfg.damp_percent or 0.01, head)
        score(model, f"+ code step {k + 1}", time.perf_counter() - t0, loss_before=step.before,
              loss_after=step.after, kappa=step.kappa, codes_changed=step.changed)
        t0 = time.perf_counter()
    finetune_model(model, windows, teacher, args.e2e_steps, cfg.calibration_e2e_lr, head)
    score(model, f"+ code steps + {args.e2e_steps} end-to-end steps", time.perf_counter() - t0)

    meta = {**run_meta(), "args": vars(args)}
    lines = [f"`{meta['command']}` on {meta['machine']}, {meta['date']}", "",
             f"SmolLM2-135M {args.preset}, perplexity over the first {args.tokens} tokens (context 1024, stride "
             f"1024), scored in memory; code steps and fine-tunes on {args.windows} calibration windows.", "",
             "| stage | Wikipedia ppl | Austen ppl | end-to-end KL before -> after | codes moved | seconds |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        kl = f"{r['loss_before']:.4f} -> {r['loss_after']:.4f}" if "loss_before" in r else "-"
        moved = f"{100 * r['codes_changed']:.2f}%" if "codes_changed" in r else "-"
        lines.append(f"| {r['stage']} | {r['wikipedia_ppl']:.2f} | {r['austen_ppl']:.2f} | {kl} | {moved} | "
                     f"{r['seconds']:.0f} |")
    write_results(args.out, meta, rows, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
