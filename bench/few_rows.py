"""The CPU GEMV of a few rows (1 < M <= ``GEMV_MAX_M``): an e8p stage and the next in one pass,
against a pass per stage.

    python bench/few_rows.py           # results/few_rows.{json,md} (about 5 minutes on 2 cores)
    python bench/few_rows.py --smoke   # small shapes, a tiny random Llama: checks the script only

Decoding several sequences at once (``generate`` on a batch, a serving engine's decode step, beam
search) multiplies every layer by a few rows. ``kernels/cpu_numba`` sums an e8p stage and the next
with their scales per weight vector and multiplies the sum by each row (one FMA per row); before,
each stage took its own pass (one FMA per row and stage, then a scale per group and row), which is
what ``per_stage`` puts back. Both ways, in one process, round-robin: layers at SmolLM2's and an 8B
model's shapes for each M, every candidate cycling through copies of its weights beyond the caches,
with torch's bf16 ``F.linear`` at the same M beside them; then SmolLM2-135M (v2-3, bf16 embedding
and head) generating greedily for a batch of four prompts, each way, with torch's bf16 model. The
speedups are medians of each round's ratio (quartiles in brackets); both ways must generate the
same tokens.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import os
import statistics
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numba
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_speed import random_rbe_layer, smollm2_loader, timed_rounds  # noqa: E402  (the benches' layers, models, timer)
from row_kernel import decode_rate  # noqa: E402

from hf_rbe import RBEConfig  # noqa: E402
from hf_rbe.evaluation.results import run_meta, write_results  # noqa: E402
from hf_rbe.kernels import cpu_numba  # noqa: E402

SHAPES = [(576, 1536), (1536, 576), (4096, 4096), (4096, 14336), (14336, 4096)]
PRESETS = ["v2-2", "v2-2.5", "v2-3", "v2-4"]
ROWS = [2, 3, 4, 8, 12]
STREAM_BYTES = 64 * 2**20
BATCH, PROMPT = 4, 16


@contextlib.contextmanager
def per_stage() -> Iterator[None]:
    """Every stage of a few-row call in its own pass (``_GEMV4``), as before the fused pair."""
    kept = cpu_numba._few_calls
    cpu_numba._few_calls = lambda stages: [(cpu_numba._GEMV4[p], (c, s, t)) for c, s, t, p in stages]
    try:
        yield
    finally:
        cpu_numba._few_calls = kept


def _speedup(slow: list[float], fast: list[float]) -> tuple[float, list[float]]:
    """(median of each round's ``slow / fast``, its quartiles)."""
    ratios = [a / b for a, b in zip(slow, fast)]
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    return statistics.median(ratios), [q[0], q[2]]


def layer_rows(shapes: list[tuple[int, int]], presets: list[str], ms: list[int], rounds: int,
               stream_bytes: int) -> list[dict]:
    rows = []
    for k, n in shapes:
        torch.manual_seed(0)
        w = torch.randn(n, k, dtype=torch.bfloat16)
        bf16 = [w.clone() for _ in range(max(2, -(-stream_bytes // (2 * n * k))))]
        layers = {}
        for name in presets:
            q = random_rbe_layer(RBEConfig.from_preset(name).base_spec(), k, n, seed=1)
            nbytes = q.storage_bits(include_tables=False) // 8
            layers[name] = [q] + [copy.deepcopy(q) for _ in range(max(2, -(-stream_bytes // nbytes)) - 1)]
        for m in ms:
            x = torch.randn(m, k)
            xb = x.bfloat16()
            cands: dict[str, Callable[[], object]] = {"bf16": lambda xb=xb, ws=bf16: [F.linear(xb, w) for w in ws]}
            for name, clones in layers.items():
                cands[name] = lambda x=x, clones=clones: [c(x) for c in clones]

                def old(x: torch.Tensor = x, clones: list = clones) -> None:
                    with per_stage():
                        for c in clones:
                            c(x)

                cands[f"{name}/per stage"] = old
            with torch.no_grad():
                times = timed_rounds(cands, rounds)
            copies = {"bf16": len(bf16), **{c: len(layers[c.split("/")[0]]) for c in cands if c != "bf16"}}
            row: dict = {"in": k, "out": n, "M": m,
                         "bf16_us": statistics.median(times["bf16"]) / copies["bf16"] * 1e6}
            for name in presets:
                fused, old_t = times[name], times[f"{name}/per stage"]
                speed, quart = _speedup(old_t, fused)
                row[name] = {"us": statistics.median(fused) / copies[name] * 1e6,
                             "per_stage_us": statistics.median(old_t) / copies[name] * 1e6,
                             "speedup": speed, "speedup_quartiles": quart,
                             "vs_bf16": statistics.median(times["bf16"]) / copies["bf16"]
                             / (statistics.median(fused) / copies[name])}
            rows.append(row)
            logging.info("%s", row)
        del layers, bf16
    return rows


def model_rows(smoke: bool, new_tokens: int, rounds: int) -> dict:
    load = smollm2_loader(smoke)
    bf16 = load(None, torch.bfloat16).eval()
    rbe = load(RBEConfig.from_preset("v2-3", embedding_dtype="bfloat16"), torch.float32).eval()
    prompt = torch.randint(0, bf16.config.vocab_size, (BATCH, PROMPT), generator=torch.Generator().manual_seed(0))
    tokens: dict[str, torch.Tensor] = {}
    rates: dict[str, list[float]] = {k: [] for k in ("bf16", "v2-3", "v2-3/per stage")}

    def run(name: str, model: torch.nn.Module, old: bool = False) -> Callable[[], None]:
        def f() -> None:
            with per_stage() if old else contextlib.nullcontext():
                rate, tokens[name] = decode_rate(model, prompt, new_tokens)
            rates[name].append(rate)
        return f

    cands = {"bf16": run("bf16", bf16), "v2-3": run("v2-3", rbe), "v2-3/per stage": run("v2-3/per stage", rbe, True)}
    with torch.no_grad():
        timed_rounds(cands, rounds)
    rates = {k: v[1:] for k, v in rates.items()}  # the warm-up call's rate dropped
    speed, quart = _speedup(rates["v2-3"], rates["v2-3/per stage"])
    out = {"batch": BATCH, "prompt": PROMPT, "new_tokens": new_tokens, "rates": rates,
           "bf16_tokens_per_s": statistics.median(rates["bf16"]),
           "tokens_per_s": statistics.median(rates["v2-3"]),
           "per_stage_tokens_per_s": statistics.median(rates["v2-3/per stage"]),
           "speedup": speed, "speedup_quartiles": quart,
           "same_tokens": torch.equal(tokens["v2-3"], tokens["v2-3/per stage"])}
    logging.info("%s", {k: v for k, v in out.items() if k != "rates"})
    return out


def table(meta: dict, layers: list[dict], model: dict, presets: list[str], rounds: int) -> str:
    lines = [f"`{meta['command']}` on {meta['machine']}, numba {meta['numba_threads']} threads, load average before "
             f"{meta['load_before']}, after {meta['load_after']}, {meta['date']}", "",
             f"Layer GEMV at M input rows, weights streamed, {rounds} rounds: microseconds per call, the e8p stage and "
             "the next in one pass (one pass per stage -> one pass; speedup, quartiles; against torch bf16's F.linear "
             "at the same M):", "",
             "| in x out | M | torch bf16 | " + " | ".join(presets) + " |", "|---|---|---|" + "---|" * len(presets)]
    for r in layers:
        cells = []
        for name in presets:
            c = r[name]
            lo, hi = c["speedup_quartiles"]
            cells.append(f"{c['per_stage_us']:.0f} -> {c['us']:.0f} ({c['speedup']:.2f}x, {lo:.2f}-{hi:.2f}; "
                         f"{c['vs_bf16']:.2f}x bf16)")
        lines.append(f"| {r['in']}x{r['out']} | {r['M']} | {r['bf16_us']:.0f} | " + " | ".join(cells) + " |")
    lo, hi = model["speedup_quartiles"]
    lines += ["", f"{'A tiny random Llama (smoke)' if meta['smoke'] else 'SmolLM2-135M'} greedy decoding of a batch of "
              f"{model['batch']} {model['prompt']}-token prompts, {model['new_tokens']} new tokens each (tokens/s over the "
              f"batch of the last {model['new_tokens'] - 1}), medians of {len(model['rates']['bf16'])} rounds:", "",
              "| weights | tokens/s | vs torch bf16 |", "|---|---|---|",
              f"| torch bf16 | {model['bf16_tokens_per_s']:.1f} | 1.00x |",
              f"| v2-3 + bf16 embeddings, one pass per stage | {model['per_stage_tokens_per_s']:.1f} | "
              f"{model['per_stage_tokens_per_s'] / model['bf16_tokens_per_s']:.2f}x |",
              f"| v2-3 + bf16 embeddings, as the library runs | {model['tokens_per_s']:.1f} | "
              f"{model['tokens_per_s'] / model['bf16_tokens_per_s']:.2f}x |", "",
              f"Speedup of the library's way: {model['speedup']:.2f}x ({lo:.2f}-{hi:.2f}); same tokens both ways: "
              f"{'yes' if model['same_tokens'] else 'no'}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=9, help="rounds of the layer timings")
    ap.add_argument("--model-rounds", type=int, default=12, help="rounds of the batch decoding")
    ap.add_argument("--tokens", type=int, default=9, help="new tokens per decoding (the first is the prompt's)")
    ap.add_argument("--smoke", action="store_true", help="small shapes, a tiny random model: checks the script only")
    ap.add_argument("--out", default=None, help="default: results/few_rows (runs/few_rows_smoke with --smoke)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    numba.set_num_threads(args.threads)
    load_before = "%.2f %.2f %.2f" % os.getloadavg()
    if args.smoke:
        layers = layer_rows([(256, 96)], PRESETS, [2, 3], 2, 2**20)
        model = model_rows(True, args.tokens, 2)
        rounds = 2
    else:
        layers = layer_rows(SHAPES, PRESETS, ROWS, args.rounds, STREAM_BYTES)
        model = model_rows(False, args.tokens, args.model_rounds)
        rounds = args.rounds
    meta = {**run_meta(), "numba_threads": numba.get_num_threads(), "load_before": load_before,
            "load_after": "%.2f %.2f %.2f" % os.getloadavg(), "smoke": args.smoke}
    md = table(meta, layers, model, PRESETS, rounds)
    write_results(args.out or ("runs/few_rows_smoke" if args.smoke else "results/few_rows"), meta,
                  {"layers": layers, "model": model}, md)
    print(md)


if __name__ == "__main__":
    main()
