"""What the streaming path (``hf_rbe.quantize_checkpoint``) holds while it calibrates a checkpoint on disk.

    python bench/streaming_memory.py                          # 512 wide, 56 blocks (about 25 minutes)
    python bench/streaming_memory.py --blocks 8 --steps 1     # a quick look

A Llama-shaped checkpoint with random weights (SmolLM2's tokenizer and vocabulary, tied embeddings)
is written in fp32 and quantized calibrated (v2-3 on Wikipedia windows, block and end-to-end
fine-tuning, the end-to-end step keeping no block's activations: ``calibration_e2e_memory=0``, the
least memory) in a fresh process, which first quantizes a one-block checkpoint of the same shapes so
that libraries, compiled kernels and caches are loaded before the measurement. Reported: the
checkpoint's size; the peak resident memory of the whole process (``rss``) and its anonymous part
(``anon``: what the process wrote; clean library and checkpoint pages are dropped and reread under a
memory cap, ``hf_rbe.evaluation.memory``); what the calibration added to each over the process
after the warm-up; seconds; the peak per phase. What bounds the size on a small CPU machine is
time (``bench/calibration_scale.py``), not memory.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hf_rbe.evaluation.results import run_meta, write_results


def _save(path: Path, width: int, inter: int, blocks: int, vocab: int) -> int:
    """Write the checkpoint (in a child, so that this process never holds it); its bytes."""
    code = ("import sys, torch\nfrom transformers import LlamaConfig, LlamaForCausalLM\n"
            "w, i, n, v = (int(a) for a in sys.argv[1:5])\ntorch.manual_seed(0)\n"
            "cfg = LlamaConfig(hidden_size=w, intermediate_size=i, num_hidden_layers=n, num_attention_heads=w // 64,"
            " num_key_value_heads=w // 64, vocab_size=v, tie_word_embeddings=True, max_position_embeddings=2048)\n"
            "LlamaForCausalLM(cfg).save_pretrained(sys.argv[5], max_shard_size='500MB')\n")
    subprocess.run([sys.executable, "-c", code, str(width), str(inter), str(blocks), str(vocab), str(path)], check=True)
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def _config(args: argparse.Namespace) -> object:
    from hf_rbe import RBEConfig

    return RBEConfig.from_preset(args.preset, dataset="wikipedia", calibration_samples=args.samples,
                                 calibration_seqlen=args.seqlen, calibration_finetune_steps=args.steps,
                                 calibration_e2e_steps=args.steps, calibration_e2e_memory=0)


def child(args: argparse.Namespace) -> dict:
    """In a fresh process: warm up on ``warm``, then quantize ``src`` with both profiles running."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from hf_rbe import quantize_checkpoint
    from hf_rbe.data import smollm2_path
    from hf_rbe.evaluation.memory import MemoryProfile

    hf_logging.set_verbosity_error()
    tok = AutoTokenizer.from_pretrained(smollm2_path())
    quantize_checkpoint(args.warm, f"{args.out}-warm", _config(args), tokenizer=tok)
    with MemoryProfile() as rss, MemoryProfile(anonymous=True) as anon:
        t0 = time.perf_counter()
        quantize_checkpoint(args.src, args.out, _config(args), tokenizer=tok)
        seconds = time.perf_counter() - t0
    return {"seconds": seconds, "rss": rss.as_dict(), "anon": anon.as_dict()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--inter", type=int, default=1408, help="MLP width")
    ap.add_argument("--blocks", type=int, default=56)
    ap.add_argument("--preset", default="v2-3")
    ap.add_argument("--samples", type=int, default=16, help="calibration windows")
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--steps", type=int, default=4, help="block and end-to-end fine-tuning steps")
    ap.add_argument("--out", default="results/streaming_memory")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--warm", help=argparse.SUPPRESS)
    ap.add_argument("--src", help=argparse.SUPPRESS)
    args, _ = ap.parse_known_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    from transformers import AutoTokenizer

    from hf_rbe.data import smollm2_path

    vocab = len(AutoTokenizer.from_pretrained(smollm2_path()))
    meta = run_meta()
    with tempfile.TemporaryDirectory() as tmp:
        _save(Path(tmp, "warm"), args.width, args.inter, 1, vocab)
        size = _save(Path(tmp, "src"), args.width, args.inter, args.blocks, vocab)
        cmd = [sys.executable, __file__, "--child", "--warm", f"{tmp}/warm", "--src", f"{tmp}/src", "--out",
               f"{tmp}/out", *[f"--{k}={getattr(args, k)}" for k in ("preset", "samples", "seqlen", "steps")]]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode:
            raise SystemExit(f"the quantization failed:\n{res.stderr[-3000:]}")
        m = json.loads(res.stdout.strip().splitlines()[-1])
    mib = size / 2**20
    row = {"width": args.width, "mlp_width": args.inter, "blocks": args.blocks, "vocab": vocab, "preset": args.preset,
           "checkpoint_mib": mib, "seconds": m["seconds"], "seconds_per_block": m["seconds"] / args.blocks,
           "peak_rss_mib": m["rss"]["peak_mib"], "base_rss_mib": m["rss"]["base_mib"],
           "peak_anon_mib": m["anon"]["peak_mib"], "base_anon_mib": m["anon"]["base_mib"],
           "added_rss_mib": m["rss"]["peak_mib"] - m["rss"]["base_mib"],
           "added_anon_mib": m["anon"]["peak_mib"] - m["anon"]["base_mib"],
           "anon_phases_mib": {p: v["peak_mib"] - m["anon"]["base_mib"] for p, v in m["anon"]["phases"].items()}}
    row["checkpoint_over_added_anon"] = mib / row["added_anon_mib"]
    row["checkpoint_over_peak_rss"] = mib / row["peak_rss_mib"]
    md = table(row, meta, args)
    write_results(args.out, meta, [row], md)
    print(md)


def table(r: dict, meta: dict, args: argparse.Namespace) -> str:
    lines = [f"`{meta['command']}` on {meta['machine']}, {meta['date']} (load average {meta['load_average']}): "
             f"{r['preset']} calibrated on {args.samples} x {args.seqlen} Wikipedia tokens, {args.steps} block and "
             "end-to-end fine-tuning steps, random Llama-shaped weights.", "",
             "| checkpoint | fp32 MiB | peak RSS MiB | peak anonymous MiB | added RSS MiB | added anonymous MiB "
             "| checkpoint / added anonymous | s / block |", "|---|---|---|---|---|---|---|---|",
             f"| width {r['width']}, MLP {r['mlp_width']}, {r['blocks']} blocks, vocabulary {r['vocab']} | "
             f"{r['checkpoint_mib']:.0f} | {r['peak_rss_mib']:.0f} | {r['peak_anon_mib']:.0f} | {r['added_rss_mib']:.0f} | "
             f"{r['added_anon_mib']:.0f} | {r['checkpoint_over_added_anon']:.1f} | {r['seconds_per_block']:.0f} |", "",
             "Added anonymous memory at each phase's peak, MiB: " + ", ".join(
                 f"{p} {v:.0f}" for p, v in r["anon_phases_mib"].items()) + "."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
