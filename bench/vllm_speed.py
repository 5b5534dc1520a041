"""vLLM serving SmolLM2-135M in bf16 next to the same model's RBE checkpoints, on this machine.

    python bench/vllm_speed.py          # in vLLM's environment (.ci/vllm-env builds one)

For each model (the bf16 original, then RBE ``--presets``, calibration-free, embedding and head
stored in bf16, quantized once into ``--work``; or the RBE checkpoints ``--checkpoint`` names): vLLM in eager mode with bf16 activations, one
model at a time, reports decoding tokens/s at each ``--batches`` size (64 new tokens after
128-token prompts, the time of one token subtracted), the time to the first token of one
prompt, and the bytes its weights and buffers take in the worker. From those bytes, the KV-cache
tokens that fit in a ``--budget-gib`` memory budget beside the weights (vLLM's bf16 KV cache:
2 x layers x KV heads x head dim x 2 bytes per token) and how many 1024-token sequences that is.
transformers + hf-rbe (fp32, ``hf_rbe.evaluation.measure.decode_speed``) decodes each RBE model
at batch 1 for reference, and the share of the first block's q/k/v time spent rotating inputs is
measured there, timing the rotation the CPU kernel runs (``cpu_numba.rotate_rows``; at batch 1 the
same transform runs inside the layer's first GEMV call; each RBE layer rotates with its own signs;
vLLM's fused q/k/v applies three). Writes ``results/vllm_speed.{json,md}`` (``--out``); load average and
machine in both.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from torch.utils.benchmark import Timer
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from vllm_run import run  # bench/, on the path of a bench script

import hf_rbe
from hf_rbe import RBEConfig
from hf_rbe.data import smollm2_path
from hf_rbe.evaluation.measure import decode_speed
from hf_rbe.evaluation.results import run_meta, write_results

SEQ = 1024


def rbe_checkpoint(preset: str, work: Path) -> Path:
    out = work / f"smollm2-{preset}"
    if not (out / "config.json").exists():
        hf_rbe.quantize_checkpoint(smollm2_path(), out, RBEConfig.from_preset(preset, embedding_dtype="bfloat16"))
        AutoTokenizer.from_pretrained(smollm2_path()).save_pretrained(out)
    return out


def kv_bytes_per_token(model: Path) -> int:
    c = AutoConfig.from_pretrained(model)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * 2


def rotation_share(model: torch.nn.Module, batches: list[int]) -> dict[str, float]:
    """Per batch size: the share of the first block's q/k/v time (three RBE layers, each rotating
    the same input with its own signs) spent rotating: what one rotation shared by the three would
    save at most."""
    from hf_rbe.kernels import cpu_numba

    attn = model.model.layers[0].self_attn
    layers = [attn.q_proj, attn.k_proj, attn.v_proj]
    rotations = [cpu_numba.rotation(*m.op_args()) for m in layers]  # the kernel's own rotation, not the reference's
    out = {}
    with torch.no_grad():
        for b in batches:
            x = torch.randn(b, layers[0].in_features)
            full = Timer("[m(x) for m in layers]", globals={"layers": layers, "x": x}).blocked_autorange(min_run_time=1)
            rot = Timer("[rotate(x, s, k) for s, k in rotations]",
                        globals={"rotate": cpu_numba.rotate_rows, "rotations": rotations, "x": x}).blocked_autorange(
                min_run_time=1)
            out[str(b)] = rot.median / full.median
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["v2-2", "v2-3", "v2-4"])
    ap.add_argument("--checkpoint", nargs="*", default=[], metavar="NAME=DIR",
                    help="serve these RBE checkpoints (e.g. the main job's) instead of quantizing --presets")
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32])
    ap.add_argument("--budget-gib", type=float, default=1.0, help="memory for weights + KV cache")
    ap.add_argument("--work", type=Path, default=Path("runs/vllm_speed"), help="where RBE checkpoints are kept")
    ap.add_argument("--out", default="results/vllm_speed")
    args = ap.parse_args()
    meta = run_meta()
    given = [(n, Path(d)) for n, _, d in (c.partition("=") for c in args.checkpoint)]
    models = [("bf16", Path(smollm2_path()))] + (given or [(p, rbe_checkpoint(p, args.work)) for p in args.presets])
    request = {"dtype": "bfloat16", "max_model_len": SEQ, "speed": {"batches": args.batches, "prompt_len": 128,
                                                                    "new_tokens": 64}}
    rows = []
    for name, path in models:
        got = run(path, request)
        per_token = kv_bytes_per_token(path)
        kv_tokens = max(0, int((args.budget_gib * 2**30 - got["weight_bytes"]) // per_token))
        row = {"model": name, "weight_mib": got["weight_bytes"] / 2**20, "ttft_s": got["speed"]["ttft_s"],
               "decode_tokens_per_s": got["speed"]["decode_tokens_per_s"], "load_s": got["load_s"],
               "budget_gib": args.budget_gib, "kv_tokens_in_budget": kv_tokens, "sequences_in_budget": kv_tokens // SEQ,
               "worker_threads": got["worker_threads"]}
        if name != "bf16":
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
            row["transformers_fp32_tokens_per_s"] = decode_speed(model).tokens_per_second
            row["qkv_rotation_share"] = rotation_share(model, args.batches)
            del model
        rows.append(row)
        print(json.dumps(row), flush=True)
    meta["load_average_after"] = "%.2f %.2f %.2f" % os.getloadavg()
    batches = " | ".join(f"batch {b} tok/s" for b in args.batches)
    lines = [f"SmolLM2-135M-Instruct served by vLLM {_vllm_version()} (eager, bf16 activations) on "
             f"{meta['machine']}, {meta['date']}, load average {meta['load_average']} before and "
             f"{meta['load_average_after']} after: `{meta['command']}`", "",
             f"| model | weights MiB | {batches} | first token s | 1024-token sequences in {args.budget_gib:g} GiB "
             "| transformers + hf-rbe fp32 batch 1 tok/s |",
             "|---|" + "---|" * (len(args.batches) + 4)]
    for r in rows:
        speeds = " | ".join(f"{r['decode_tokens_per_s'][str(b)]:.1f}" for b in args.batches)
        ref = f"{r['transformers_fp32_tokens_per_s']:.1f}" if "transformers_fp32_tokens_per_s" in r else "-"
        lines.append(f"| {r['model']} | {r['weight_mib']:.1f} | {speeds} | {r['ttft_s']:.3f} | "
                     f"{r['sequences_in_budget']} | {ref} |")
    shares = [f"{r['model']} " + ", ".join(f"{100 * v:.1f}% at batch {k}" for k, v in r["qkv_rotation_share"].items())
              for r in rows if "qkv_rotation_share" in r]
    lines += ["", "Share of q/k/v time spent rotating the input (three rotations, transformers + hf-rbe, fp32): "
              + "; ".join(shares) + "."]
    workers = "; ".join(f"{r['model']} {r['worker_threads']['cpus']} CPU(s), torch "
                        f"{r['worker_threads']['torch_threads']} thread(s), kernels "
                        f"{r['worker_threads']['kernel_threads']}" for r in rows)
    lines += ["", f"vLLM's worker, as vLLM set it up (transformers + hf-rbe ran with {torch.get_num_threads()} "
              f"threads): {workers}."]
    md = "\n".join(lines) + "\n"
    print(md)
    write_results(args.out, meta, rows, md)


def _vllm_version() -> str:
    import vllm

    return vllm.__version__


if __name__ == "__main__":
    main()
