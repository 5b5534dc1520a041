"""Eager against compiled decoding on the CPU: SmolLM2-135M generating with a static KV cache.

    python bench/compiled_decode.py           # results/compiled_decode.{json,md} (about 15 minutes on 2 cores)
    python bench/compiled_decode.py --smoke   # a tiny random Llama: checks the script only

On a model this small a decoding step is mostly Python between kernels (210 Linear calls per
token on SmolLM2, plus attention and norms), which is what ``torch.compile`` removes. Each model
runs twice: as loaded (eager), and with ``model.forward = torch.compile(model.forward,
fullgraph=True)`` (inductor's default mode: CUDA graphs, the reduce-overhead mode, do not exist on
a CPU), both through ``generate`` with one ``StaticCache`` reset between calls, so the compiled
forward sees the same shapes every call and compiles once per phase (prompt, step). An RBE
Linear stays one custom op in the graph (the registered CPU kernel); inductor fuses what is
around it.

Models: torch fp32 and bf16, and v2-3 (calibration-free codes: they cost the same to decode) with
its embedding and tied head in bf16, the model of ``bench/cpu_speed.py``'s decode target.
Decode tokens/s = ``(N - 1) / (t(generate N) - t(generate 1))`` from a 16-token prompt, medians of
``--repeats`` rounds timed round-robin in this one process. Reported beside it: the seconds of the
first compiled calls (compilation) and how many of the N greedy tokens the compiled model
generates as the eager one does (a fused reduction may round differently; the RBE op does not
change under compile).
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import sys
import time
from pathlib import Path

import numba
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_speed import median_rounds, smollm2_loader  # noqa: E402  (the benches' timer and models)

from hf_rbe import RBEConfig  # noqa: E402
from hf_rbe.evaluation.results import run_meta, write_results  # noqa: E402

PROMPT = 16
PRESET = "v2-3"
RBE_ROW = f"{PRESET} + bf16 embeddings"


def _models(smoke: bool) -> dict[str, torch.nn.Module]:
    load = smollm2_loader(smoke)
    qc = RBEConfig.from_preset(PRESET, embedding_dtype="bfloat16")
    models = {"fp32": load(None, torch.float32), "bf16": load(None, torch.bfloat16), RBE_ROW: load(qc, torch.float32)}
    return {k: m.eval() for k, m in models.items()}


def _compiled(model: torch.nn.Module) -> torch.nn.Module:
    out = copy.deepcopy(model)
    out.forward = torch.compile(out.forward, fullgraph=True)
    return out


def _generator(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int):
    """``f(n)``: greedy ``generate`` of ``n`` tokens on one static cache of ``PROMPT + new_tokens``."""
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=prompt.shape[1] + new_tokens)

    def run(n: int) -> torch.Tensor:
        cache.reset()
        return model.generate(prompt, attention_mask=torch.ones_like(prompt), cache=cache,
                              max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0,
                              disable_compile=True)

    return run


@torch.inference_mode()
def rows(smoke: bool, new_tokens: int, repeats: int) -> list[dict]:
    models = _models(smoke)
    vocab = next(iter(models.values())).config.vocab_size
    prompt = torch.randint(0, vocab, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    runs, compile_s, tokens = {}, {}, {}
    # every model's forward is one code object to dynamo, and each model compiles its own graphs
    # (prompt and step) under it: the default limit of 8 per code object is too few for the rows
    torch._dynamo.config.recompile_limit = 64
    for name, model in models.items():
        for mode, m in (("eager", model), ("compiled", _compiled(model))):
            f = _generator(m, prompt, new_tokens)
            t0 = time.perf_counter()
            tokens[name, mode] = f(new_tokens)[0, PROMPT:]  # compiles both phases on the compiled model
            compile_s[name, mode] = time.perf_counter() - t0
            logging.info("%s %s: first generate %.1f s", name, mode, compile_s[name, mode])
            runs[f"{name}/{mode}/gen1"] = lambda f=f: f(1)
            runs[f"{name}/{mode}/genN"] = lambda f=f: f(new_tokens)
    secs = median_rounds(runs, repeats)
    out = []
    for name in models:
        row: dict = {"weights": name}
        for mode in ("eager", "compiled"):
            row[f"{mode}_tokens_per_s"] = (new_tokens - 1) / (secs[f"{name}/{mode}/genN"] - secs[f"{name}/{mode}/gen1"])
        row["compiled_vs_eager"] = row["compiled_tokens_per_s"] / row["eager_tokens_per_s"]
        row["first_compiled_generate_s"] = compile_s[name, "compiled"]
        row["first_eager_generate_s"] = compile_s[name, "eager"]
        row["same_greedy_tokens"] = int((tokens[name, "eager"] == tokens[name, "compiled"]).sum())
        out.append(row)
        logging.info("%s", row)
    bf16 = next(r for r in out if r["weights"] == "bf16")
    for r in out:
        for mode in ("eager", "compiled"):
            r[f"{mode}_vs_bf16_{mode}"] = r[f"{mode}_tokens_per_s"] / bf16[f"{mode}_tokens_per_s"]
    return out


def table(meta: dict, res: list[dict], new_tokens: int) -> str:
    lines = [f"`{meta['command']}` on {meta['machine']}, numba {meta['numba_threads']} threads, load average before "
             f"{meta['load_before']}, after {meta['load_after']}, {meta['date']}", "",
             f"Greedy decoding at batch 1 on a static cache, {new_tokens} new tokens after a {PROMPT}-token prompt: "
             "tokens/s eager and with the forward compiled (`torch.compile(fullgraph=True)`, inductor's default mode); "
             "in brackets, against torch bf16 run the same way.", "",
             "| weights | eager tokens/s | compiled tokens/s | compiled / eager | first compiled generate s "
             "| greedy tokens as eager |",
             "|---|---|---|---|---|---|"]
    for r in res:
        lines.append(f"| {r['weights']} | {r['eager_tokens_per_s']:.1f} ({r['eager_vs_bf16_eager']:.2f}x) "
                     f"| {r['compiled_tokens_per_s']:.1f} ({r['compiled_vs_bf16_compiled']:.2f}x) "
                     f"| {r['compiled_vs_eager']:.2f}x | {r['first_compiled_generate_s']:.0f} "
                     f"| {r['same_greedy_tokens']} / {new_tokens} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5, help="round-robin rounds of the timings")
    ap.add_argument("--tokens", type=int, default=32, help="new tokens per decode timing")
    ap.add_argument("--smoke", action="store_true", help="a tiny random model: checks the script only")
    ap.add_argument("--out", default=None, help="default: results/compiled_decode (runs/compiled_decode_smoke with --smoke)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    numba.set_num_threads(args.threads)
    load_before = "%.2f %.2f %.2f" % os.getloadavg()
    tokens, repeats = (4, 1) if args.smoke else (args.tokens, args.repeats)
    res = rows(args.smoke, tokens, repeats)
    meta = {**run_meta(), "numba_threads": numba.get_num_threads(), "load_before": load_before,
            "load_after": "%.2f %.2f %.2f" % os.getloadavg(), "new_tokens": tokens, "prompt_tokens": PROMPT}
    out = args.out or ("runs/compiled_decode_smoke" if args.smoke else "results/compiled_decode")
    md = table(meta, res, tokens)
    write_results(out, meta, res, md)
    print(md)


if __name__ == "__main__":
    main()
