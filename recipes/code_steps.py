"""Moving a calibrated model's codes on the end-to-end loss: what code steps and straight-through latent weights buy.

    python recipes/code_steps.py                    # SmolLM2 v2-3: calibrate, then one code step
    python recipes/code_steps.py --preset v2-2 --steps 2 --windows 16
    python recipes/code_steps.py --steps 0 --latent-lr 3e-5 1e-4   # latent (QAT) arms beside the control

SmolLM2-135M-Instruct is calibrated as ``recipes/calibrate.py`` does (Wikipedia after its first
32,768 tokens, the default block and end-to-end fine-tunes), keeping each layer's Hessian
(``keep_calibration_statistics``). Then, on the first ``--windows`` calibration windows, it takes
``--steps`` code steps on the end-to-end KL to the full-precision model
(``hf_rbe.hf.calibration.codes.model_code_step``: every layer's codes chosen again along
``-G H^-1``, kept only where the measured loss falls), then ``--e2e-steps`` end-to-end
fine-tuning steps of the continuous parameters; the same fine-tune run from the calibrated model
without code steps is the control, so that a gain is compared with what more fine-tuning alone
gives. With ``--latent-lr`` a third arm runs the same end-to-end fine-tune from the calibrated
model with straight-through latent weights (``hf_rbe.hf.calibration.latent``: QAT started from
the calibrated codes, the latent weights encoded again against the kept Hessians every
``--reencode-every`` steps, new codes kept where the loss falls). Each model is
scored in memory (the first ``--tokens`` tokens of Wikipedia and of Austen, context 1024, stride
1024). Results: ``runs/code_steps.{json,md}`` (``--out`` elsewhere).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

import hf_rbe  # noqa: F401  (registers the quantizer)
from hf_rbe import RBEConfig, RBELinear
from hf_rbe.data import smollm2_path, token_stream
from hf_rbe.data.fetch import ensure
from hf_rbe.evaluation.measure import perplexity
from hf_rbe.evaluation.memory import MemoryProfile
from hf_rbe.evaluation.results import run_meta, write_results
from hf_rbe.hf.calibration.capture import features
from hf_rbe.hf.calibration.codes import model_code_step
from hf_rbe.hf.calibration.finetune import finetune_model
from hf_rbe.hf.calibration.latent import latent_finetune
from hf_rbe.hf.calibration.windows import calibration_ids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="v2-3")
    ap.add_argument("--steps", type=int, default=1, help="code steps")
    ap.add_argument("--samples", type=int, default=64, help="calibration windows (RBEConfig's calibration_samples)")
    ap.add_argument("--windows", type=int, default=16, help="calibration windows the code steps measure")
    ap.add_argument("--e2e-steps", type=int, default=16, help="end-to-end fine-tuning steps after the code steps "
                    "(and of the control without them)")
    ap.add_argument("--latent-lr", type=float, nargs="*", default=[], help="Adam learning rates of the latent "
                    "weights, one arm each (default: no latent arm)")
    ap.add_argument("--reencode-every", type=int, default=8, help="the latent arm's steps between re-encodings")
    ap.add_argument("--tokens", type=int, default=8192, help="scored tokens of each corpus")
    ap.add_argument("--out", default="runs/code_steps")
    args = ap.parse_args()
    with MemoryProfile() as mem:
        rows = experiment(args, mem)
    meta = {**run_meta(), "args": vars(args), "peak_rss_mib": mem.peak_mib}
    write_results(args.out, meta, rows, render(meta, rows))


def experiment(args: argparse.Namespace, mem: MemoryProfile) -> list[dict]:
    """Every stage of the module docstring, each scored into a row (with the job's peak resident memory so far)."""
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
        row["peak_rss_mib"] = mem.peak_mib  # the job's so far
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

    def kept(m: torch.nn.Module) -> dict[str, RBELinear]:
        return {n: x for n, x in m.named_modules() if isinstance(x, RBELinear) and x.calibration_hessian is not None}

    damp = cfg.damp_percent or 0.01
    for latent_lr in args.latent_lr:
        latent_model = copy.deepcopy(model)
        layers = kept(latent_model)
        t0 = time.perf_counter()
        run = latent_finetune(latent_model, layers, {n: m.calibration_hessian.float() for n, m in layers.items()},
                              windows, teacher, args.e2e_steps, cfg.calibration_e2e_lr, latent_lr,
                              args.reencode_every, damp, head)
        score(latent_model, f"+ {args.e2e_steps} end-to-end steps, latent lr {latent_lr:g}, "
              f"re-encoded every {args.reencode_every} ({run.kept} of {len(run.reencodings)} kept)",
              time.perf_counter() - t0, codes_changed=run.changed,
              reencodings=[dataclasses.asdict(r) for r in run.reencodings])
        del latent_model

    if args.steps:
        layers = kept(model)
        hessians = {n: m.calibration_hessian.float() for n, m in layers.items()}
        t0 = time.perf_counter()
        for k in range(args.steps):
            step = model_code_step(model, layers, hessians, windows, teacher, damp, head)
            score(model, f"+ code step {k + 1}", time.perf_counter() - t0, loss_before=step.before,
                  loss_after=step.after, kappa=step.kappa, codes_changed=step.changed)
            t0 = time.perf_counter()
        finetune_model(model, windows, teacher, args.e2e_steps, cfg.calibration_e2e_lr, head)
        score(model, f"+ code steps + {args.e2e_steps} end-to-end steps", time.perf_counter() - t0)

    return rows


def render(meta: dict, rows: list[dict]) -> str:
    """The results page: one row per model scored, then each latent arm's re-encodings."""
    args = meta["args"]
    lines = [f"`{meta['command']}` on {meta['machine']}, {meta['date']}", "",
             f"SmolLM2-135M {args['preset']}, perplexity over the first {args['tokens']} tokens (context 1024, stride "
             f"1024), scored in memory; code steps, latent weights and fine-tunes on {args['windows']} calibration "
             "windows.", "",
             "| stage | Wikipedia ppl | Austen ppl | end-to-end KL before -> after | codes moved | seconds "
             "| peak RSS so far MiB |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        step = r.get("loss_before") is not None and "reencodings" not in r  # a code step's own KL
        kl = f"{r['loss_before']:.4f} -> {r['loss_after']:.4f}" if step else "-"
        moved = f"{100 * r['codes_changed']:.2f}%" if "codes_changed" in r else "-"
        peak = f"{r['peak_rss_mib']:.0f}" if "peak_rss_mib" in r else "-"  # not recorded before 2026-12-07
        lines.append(f"| {r['stage']} | {r['wikipedia_ppl']:.2f} | {r['austen_ppl']:.2f} | {kl} | {moved} | "
                     f"{r['seconds']:.0f} | {peak} |")
    arms = [r for r in rows if "reencodings" in r]
    if arms:
        lines += ["", "Latent arms, each re-encoding: the end-to-end KL over the windows before it and with the new "
                  "codes (kept only when lower), and the codes it changed.", "",
                  "| latent lr | after step | KL before | KL with new codes | codes changed | kept |",
                  "|---|---|---|---|---|---|"]
        for r, lr in zip(arms, args["latent_lr"]):
            for e in r["reencodings"]:
                lines.append(f"| {lr:g} | {e['step']} | {e['before']:.4f} | {e['tried']:.4f} | "
                             f"{100 * e['changed']:.4f}% | {'yes' if e['tried'] < e['before'] else 'no'} |")
    return "\n".join(lines) + "\n"

if __name__ == "__main__":
    main()
