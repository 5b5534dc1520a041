"""One end-to-end fine-tuning step of calibration, with block activations kept or recomputed.

    python bench/e2e_step.py                   # SmolLM2-135M at v2-3, 4 rounds (about 5 minutes)

The end-to-end fine-tune (``hf_rbe.hf.calibration.finetune.finetune_model``) keeps the activations
of as many blocks as ``calibration_e2e_memory`` GiB hold for its backward pass and runs the others a
second time there (activation checkpointing). This bench times one step (one 512-token Wikipedia
calibration window: the KL of the next-token distributions against the full-precision model's,
forward and backward) of SmolLM2-135M coded at ``--preset`` (calibration-free codes: the step costs
the same) at each ``--budgets`` value, the budgets interleaved round by round in one process, and
the resident memory a step adds over the process before it (sampled, ``hf_rbe.evaluation.memory``;
freed heap memory is handed back between steps). The gradients are equal whatever the budget
(``tests/hf/calibration/test_finetune.py``). Writes ``results/e2e_step.{json,md}`` (``--out``).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_rbe
from hf_rbe import RBEConfig
from hf_rbe.core.ops import reference_only
from hf_rbe.core.scale_tuning import tuned_scales
from hf_rbe.data import smollm2_path
from hf_rbe.evaluation.memory import MemoryProfile
from hf_rbe.evaluation.results import run_meta, write_results
from hf_rbe.hf.calibration.capture import features, find_blocks
from hf_rbe.hf.calibration.finetune import EndToEndLoss, checkpointed, keep_activations, shared_heads
from hf_rbe.hf.calibration.heap import trim
from hf_rbe.hf.calibration.windows import calibration_ids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="v2-3")
    ap.add_argument("--budgets", nargs="+", type=float, default=[0.0, 0.25, 1.0], help="calibration_e2e_memory, GiB")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--out", default="results/e2e_step")
    args = ap.parse_args()
    meta = run_meta()
    ref = AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=torch.float32).eval()
    cfg = RBEConfig.from_preset(args.preset, dataset="wikipedia")
    windows = list(calibration_ids(cfg, AutoTokenizer.from_pretrained(smollm2_path()), ref.config.vocab_size)
                   [: args.rounds + 1].split(1))
    with torch.no_grad():
        teacher = [features(ref, w) for w in windows]
    model = hf_rbe.quantize_model(copy.deepcopy(ref), RBEConfig.from_preset(args.preset))
    del ref
    for p in model.parameters():  # the scales alone train here (the fine-tune also trains norm weights and biases)
        p.requires_grad_(False)
    loss = EndToEndLoss(model)
    times: dict[float, list[float]] = {b: [] for b in args.budgets}
    added: dict[float, list[float]] = {b: [] for b in args.budgets}
    kept: dict[float, int] = {}
    with reference_only(), tuned_scales(model, shared_heads(model)) as scales:
        for s in scales:
            s.requires_grad_(True)
        loss(windows[0], teacher[0])  # warm-up: compiled kernels, the decoded head
        for r in range(1, args.rounds + 1):
            for b in args.budgets:
                with checkpointed(find_blocks(model)[1]) as wrappers:
                    kept[b] = keep_activations(model, wrappers, windows[0], int(b * 2**30))
                    trim()
                    with MemoryProfile() as prof:
                        t0 = time.perf_counter()
                        loss(windows[r], teacher[r])
                        times[b].append(time.perf_counter() - t0)
                    added[b].append(prof.peak_mib - prof.base_mib)
                for s in scales:
                    s.grad = None
                trim()
    meta["load_average_after"] = "%.2f %.2f %.2f" % os.getloadavg()
    n_blocks = len(find_blocks(model)[1])
    base = statistics.median(times[args.budgets[0]])
    rows = [{"budget_gib": b, "blocks_kept": kept[b], "blocks": n_blocks, "seconds": times[b],
             "median_s": statistics.median(times[b]), "speedup": base / statistics.median(times[b]),
             "added_mib": max(added[b])} for b in args.budgets]
    lines = [f"`{meta['command']}` on {meta['machine']}, {meta['date']}, load average {meta['load_average']} before "
             f"and {meta['load_average_after']} after", "",
             f"SmolLM2-135M at {args.preset}, one end-to-end calibration step on a 512-token window (forward, KL over "
             f"the vocabulary, backward), median of {args.rounds} rounds, budgets interleaved:", "",
             "| calibration_e2e_memory GiB | blocks kept | s per step | vs all recomputed | MiB a step adds |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['budget_gib']:g} | {r['blocks_kept']} of {r['blocks']} | {r['median_s']:.2f} | "
              f"{r['speedup']:.2f}x | {r['added_mib']:.0f} |" for r in rows]
    md = "\n".join(lines) + "\n"
    print(md)
    write_results(args.out, meta, rows, md)


if __name__ == "__main__":
    main()
