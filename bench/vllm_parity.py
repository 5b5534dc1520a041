"""One RBE checkpoint of SmolLM2 through vLLM and through transformers + hf-rbe: the same text?

    hf-rbe quantize smollm2 CKPT --preset v2-3 --config '{"dataset": "wikipedia", "embedding_dtype": "bfloat16"}'
    python bench/vllm_parity.py CKPT        # in vLLM's environment (.ci/vllm-env builds one)

The first command writes the main job's checkpoint (calibrated v2-3, embedding and head in bf16).
Both engines run it in fp32 on the CPU. Greedy continuations of eight prompts (32 new tokens each)
are compared token by token, and the Wikipedia perplexity from vLLM's prompt log-probabilities is
compared with ``hf_rbe.evaluation.measure.perplexity`` (what ``hf-rbe eval`` prints) over the same
windows: the first ``--tokens`` tokens in windows of 1024 that do not overlap. Writes
``results/vllm_parity.{json,md}`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from vllm_run import run  # bench/, on the path of a bench script

import hf_rbe  # noqa: F401  (registers RBE with transformers)
from hf_rbe.data import token_stream
from hf_rbe.data.fetch import ensure
from hf_rbe.evaluation.measure import perplexity
from hf_rbe.evaluation.results import run_meta, write_results

CONTEXT = 1024
NEW_TOKENS = 32
PROMPTS = ["The capital of France is", "In 1969, the first humans to walk on the Moon",
           "Photosynthesis is the process by which", "The best way to learn a new language is",
           "def fibonacci(n):", "Once upon a time, in a small village,",
           "The main causes of the First World War were", "Water boils at a temperature of"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--tokens", type=int, default=8192, help="Wikipedia tokens scored (the main job's 8192)")
    ap.add_argument("--out", default="results/vllm_parity")
    args = ap.parse_args()
    if args.tokens % CONTEXT:
        raise SystemExit(f"--tokens must be a multiple of {CONTEXT}")
    ensure("wikipedia")
    meta = run_meta()
    tok = AutoTokenizer.from_pretrained(args.checkpoint)
    prompts = [tok(p).input_ids for p in PROMPTS]
    ids = token_stream(tok, "wikipedia")[: args.tokens]
    windows = [ids[b:b + CONTEXT].tolist() for b in range(0, args.tokens, CONTEXT)]

    served = run(args.checkpoint, {"prompts": prompts, "max_tokens": NEW_TOKENS, "score": windows,
                                    "max_model_len": CONTEXT + NEW_TOKENS})
    nll = -sum(sum(w) for w in served["score_logprobs"])
    n = sum(len(w) for w in served["score_logprobs"])
    vllm_ppl = math.exp(nll / n)

    model = AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=torch.float32).eval()
    with torch.no_grad():
        hf_tokens = [model.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                    pad_token_id=tok.eos_token_id)[0, len(p):].tolist() for p in prompts]
    hf = perplexity(model, ids, CONTEXT, CONTEXT)
    if hf.tokens_scored != n:
        raise SystemExit(f"scored {hf.tokens_scored} tokens with transformers, {n} with vLLM")

    same = [a == b for a, b in zip(served["tokens"], hf_tokens)]
    first_diff = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), None)
                  for x, y in zip(served["tokens"], hf_tokens)]
    gaps = {}  # where a continuation differs: transformers' two best logits there (a tie decides alone)
    with torch.no_grad():
        for k, i in enumerate(first_diff):
            if i is not None:
                top = model(torch.tensor([prompts[k] + hf_tokens[k][:i]])).logits[0, -1].topk(2).values
                gaps[PROMPTS[k]] = {"token": i, "top_two_logits": top.tolist()}
    rel = vllm_ppl / hf.perplexity - 1
    result = {"checkpoint": str(args.checkpoint), "quantization_config": json.loads(
        (args.checkpoint / "config.json").read_text()).get("quantization_config"),
        "prompts": PROMPTS, "new_tokens": NEW_TOKENS, "identical_continuations": sum(same),
        "first_differing_token": first_diff, "differences": gaps, "vllm_tokens": served["tokens"],
        "transformers_tokens": hf_tokens,
        "tokens_scored": n, "context": CONTEXT, "perplexity_vllm": vllm_ppl, "perplexity_transformers": hf.perplexity,
        "perplexity_relative_difference": rel}
    md = "\n".join([
        f"SmolLM2-135M RBE checkpoint (`{args.checkpoint.name}`) in fp32 on the CPU, "
        f"{meta['date']}, {meta['machine']}: `{meta['command']}`", "",
        "| | vLLM + hf-rbe plugin | transformers + hf-rbe |", "|---|---|---|",
        f"| greedy continuations identical ({NEW_TOKENS} new tokens) | {sum(same)} of {len(same)} | |",
        f"| Wikipedia perplexity ({n} tokens, windows of {CONTEXT}) | {vllm_ppl:.3f} | {hf.perplexity:.3f} |",
        f"| relative difference | {rel:+.4%} | |", "",
        *[f"'{p}' differs at new token {g['token'] + 1}, where transformers' two best logits are "
          f"{g['top_two_logits'][0]:.4f} and {g['top_two_logits'][1]:.4f}." for p, g in gaps.items()]])
    print(md)
    write_results(args.out, meta, result, md)


if __name__ == "__main__":
    main()
