"""How far calibration's result moves under last-bit differences of the activations it sees.

    python recipes/calibration_spread.py                  # SmolLM2 v2-3, first 4 blocks, 4 perturbed runs
    python recipes/calibration_spread.py --blocks 0 --seeds 2   # the whole model (slow)

A kernel and the reference op agree to the last few bits, not exactly, and calibration makes
discrete choices (LDLQ rounds each code against the error of the codes before it), so such
differences in the inputs of one block can change the codes of the next. This recipe measures the
spread that causes: SmolLM2-135M-Instruct (its first ``--blocks`` blocks; 0: all) is calibrated
once as it is and once per ``--seeds`` with every RBE layer's output under ``no_grad`` (the
products that carry activations from block to block) multiplied by ``1 + eps * N(0, 1)``, then
scored by its KL to the full-precision model (same blocks) on the first ``--tokens`` Wikipedia
tokens (windows of 1024). A difference between two calibration settings smaller than this spread
says nothing about the settings. Results: ``runs/calibration_spread.{json,md}`` (``--out``
elsewhere).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

import hf_rbe  # noqa: F401  (registers the quantizer)
from hf_rbe import RBEConfig, RBELinear
from hf_rbe.data import smollm2_path, token_stream
from hf_rbe.data.fetch import ensure
from hf_rbe.evaluation.results import run_meta, write_results


@torch.no_grad()
def kl_to(ref: nn.Module, model: nn.Module, ids: torch.Tensor, window: int = 1024) -> float:
    """Mean per-token KL(ref || model) over ``ids`` in windows of ``window`` tokens."""
    total, n = 0.0, 0
    for w in ids[: ids.numel() // window * window].view(-1, window):
        p = torch.log_softmax(ref(w[None]).logits.float(), -1)
        q = torch.log_softmax(model(w[None]).logits.float(), -1)
        total += float((p.exp() * (p - q)).sum(-1).sum())
        n += w.numel()
    return total / n


def perturbed(eps: float, seed: int) -> torch.utils.hooks.RemovableHandle:
    """A global forward hook: every RBE layer's output under ``no_grad`` times ``1 + eps * N(0, 1)``."""
    gen = torch.Generator().manual_seed(seed)

    def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
        if not isinstance(module, RBELinear) or torch.is_grad_enabled():
            return None
        noise = torch.randn(out.shape, generator=gen, dtype=torch.float32)
        return out * (1 + eps * noise).to(out.dtype)

    return nn.modules.module.register_module_forward_hook(hook)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="v2-3")
    ap.add_argument("--blocks", type=int, default=4, help="the first N decoder blocks (0: the whole model)")
    ap.add_argument("--samples", type=int, default=16, help="calibration windows (calibration_samples)")
    ap.add_argument("--seeds", type=int, default=4, help="perturbed calibrations")
    ap.add_argument("--eps", type=float, default=1e-7, help="relative size of the perturbation")
    ap.add_argument("--tokens", type=int, default=4096, help="scored Wikipedia tokens")
    ap.add_argument("--out", default="runs/calibration_spread")
    args = ap.parse_args()
    ensure("smollm2", "wikipedia")
    hf_logging.set_verbosity_error()
    path = smollm2_path()
    ids = token_stream(AutoTokenizer.from_pretrained(path), "wikipedia")[: args.tokens]
    shape = {"num_hidden_layers": args.blocks} if args.blocks else {}
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **shape).eval()
    rows: list[dict] = []
    for seed in [None, *range(1, args.seeds + 1)]:
        torch.manual_seed(0)
        cfg = RBEConfig.from_preset(args.preset, dataset="wikipedia", calibration_samples=args.samples,
                                    embedding_dtype="bfloat16")
        handle = None if seed is None else perturbed(args.eps, seed)
        t0 = time.perf_counter()
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, quantization_config=cfg,
                                                         **shape).eval()
        finally:
            if handle is not None:
                handle.remove()
        seconds = time.perf_counter() - t0
        rows.append({"run": "as is" if seed is None else f"perturbed, seed {seed}", "noise_seed": seed,
                     "kl": kl_to(ref, model, ids), "seconds": seconds})
        print(rows[-1], flush=True)
        del model
    kls = [r["kl"] for r in rows]
    summary = {"mean": statistics.mean(kls), "stdev": statistics.stdev(kls), "min": min(kls), "max": max(kls)}
    meta = {**run_meta(), "args": vars(args), "summary": summary}
    blocks = f"first {args.blocks} blocks" if args.blocks else "whole model"
    lines = [f"`{meta['command']}` on {meta['machine']}, {meta['date']}", "",
             f"SmolLM2-135M ({blocks}) calibrated at {args.preset} on {args.samples} windows; perturbed runs multiply "
             f"every RBE output under no_grad by 1 + {args.eps:g} * N(0, 1). KL to fp32 per token over the first "
             f"{args.tokens} Wikipedia tokens.", "",
             "| run | KL to fp32 | calibrate s |", "|---|---|---|"]
    lines += [f"| {r['run']} | {r['kl']:.4f} | {r['seconds']:.0f} |" for r in rows]
    lines += ["", f"All runs: mean {summary['mean']:.4f}, standard deviation {summary['stdev']:.4f} "
              f"({100 * summary['stdev'] / summary['mean']:.1f}% of the mean), range {summary['min']:.4f} - "
              f"{summary['max']:.4f}."]
    write_results(args.out, meta, rows, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
