"""Decoding with and without the one-row paths: the row kernels a packed layer keeps
(``core.ops.row_kernel``) and the stored bf16 head's matrix-vector product (``core.stored``).

    python bench/row_kernel.py           # results/row_kernel.{json,md} (about 10 minutes on 2 cores)
    python bench/row_kernel.py --smoke   # a tiny random Llama: checks the script only

A decoding step calls every Linear with one row; a packed layer keeps its CPU kernel's one-row
form between such calls and checks only that its stored tensors are the ones it was made from,
where the op path checks and converts the same tensors on every call (``PackedLinear.forward``).
A stored bf16 head (``embedding_dtype="bfloat16"``) multiplies one row by a compiled row product
(``kernels/cpu_dense``; before it ``torch.mv``, whose kernel already read the weight faster on a CPU
than the matrix product ``F.linear`` takes).
This bench decodes SmolLM2-135M (``generate``, greedy, batch 1) each way, in one process: the
models of ``bench/cpu_speed.py``'s decode rows (v2-3 and v2-b3 with the embedding and tied head in
bf16, v2-3 also with bf16 activations; calibration-free codes cost the same to decode), each timed
as the library runs it, with row kernels switched off (the registry emptied), with the head
by ``F.linear`` and with it by ``torch.mv``; torch's bf16 model beside them. Rounds are short (``--tokens`` new tokens) and every round times every candidate, so that
the machine's speed, which moves by a fifth within minutes here, hits them alike; the speedup is
the median of each round's ratio, with its quartiles. Every way must generate the same tokens.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numba
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_speed import smollm2_loader  # noqa: E402  (the benches' models)

from hf_rbe import RBEConfig  # noqa: E402
from hf_rbe.core import ops, stored  # noqa: E402
from hf_rbe.evaluation.results import run_meta, write_results  # noqa: E402

PROMPT = 16
#: The other ways each model decodes (result key: row name): the library's way is timed against each.
WAYS = {"op_every_call": "op every call", "head_by_linear": "head by F.linear", "head_by_mv": "head by torch.mv"}


@contextlib.contextmanager
def head_by_linear() -> Iterator[None]:
    """The stored head multiplied by ``F.linear`` whatever its input, as before ``torch.mv``."""
    kept = stored.stored_linear
    stored.stored_linear = stored.matrix_product
    try:
        yield
    finally:
        stored.stored_linear = kept


@contextlib.contextmanager
def head_by_mv() -> Iterator[None]:
    """The stored head's one row by ``torch.mv``, as before the compiled row product."""
    kept = stored._cpu_row_product
    stored.set_cpu_row_product(None)
    try:
        yield
    finally:
        stored.set_cpu_row_product(kept)


@contextlib.contextmanager
def no_row_kernels(model: torch.nn.Module) -> Iterator[None]:
    """Every packed layer's one-row calls take the op, as before row kernels existed."""
    kept = dict(ops._ROW_KERNELS)
    ops._ROW_KERNELS.clear()
    for m in model.modules():
        m.__dict__.pop("_row", None)
    try:
        yield
    finally:
        ops._ROW_KERNELS.update(kept)
        for m in model.modules():
            m.__dict__.pop("_row", None)


def _models(smoke: bool) -> dict[str, torch.nn.Module]:
    load = smollm2_loader(smoke)
    v23 = load(RBEConfig.from_preset("v2-3", embedding_dtype="bfloat16"), torch.float32)
    models = {"bf16": load(None, torch.bfloat16), "v2-3 + bf16 embeddings": v23,
              "v2-3 + bf16 embeddings, bf16 activations": copy.deepcopy(v23).to(torch.bfloat16),
              "v2-b3 + bf16 embeddings": load(RBEConfig.from_preset("v2-b3", embedding_dtype="bfloat16"), torch.float32)}
    return {k: m.eval() for k, m in models.items()}


def decode_rate(model: torch.nn.Module, prompt: torch.Tensor, n: int) -> tuple[float, torch.Tensor]:
    """(tokens/s over the batch of the last ``n - 1`` new tokens, the new tokens [batch, n]): greedy
    ``generate n`` minus ``generate 1``."""
    def gen(k: int) -> torch.Tensor:
        return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=k, min_new_tokens=k,
                              do_sample=False, pad_token_id=0)

    t0 = time.perf_counter()
    gen(1)
    t1 = time.perf_counter()
    out = gen(n)
    return prompt.shape[0] * (n - 1) / (time.perf_counter() - t1 - (t1 - t0)), out[:, prompt.shape[1]:]


#: Each other way (``WAYS``' row name) as a switch around a model's decoding.
SWITCHES: dict[str, Callable[[torch.nn.Module], contextlib.AbstractContextManager]] = {
    WAYS["op_every_call"]: no_row_kernels, WAYS["head_by_linear"]: lambda m: head_by_linear(),
    WAYS["head_by_mv"]: lambda m: head_by_mv()}


def rows(smoke: bool, new_tokens: int, rounds: int) -> list[dict]:
    models = _models(smoke)
    vocab = next(iter(models.values())).config.vocab_size
    prompt = torch.randint(0, vocab, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    cands: dict[str, Callable[[], tuple[float, torch.Tensor]]] = {}
    for name, model in models.items():
        if name == "bf16":
            cands[name] = lambda m=model: decode_rate(m, prompt, new_tokens)
            continue
        cands[f"{name}/row kernels"] = lambda m=model: decode_rate(m, prompt, new_tokens)
        for way, switch in SWITCHES.items():
            def other(m: torch.nn.Module = model, switch: Callable = switch) -> tuple[float, torch.Tensor]:
                with switch(m):
                    return decode_rate(m, prompt, new_tokens)

            cands[f"{name}/{way}"] = other
    rates: dict[str, list[float]] = {k: [] for k in cands}
    tokens: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for f in cands.values():
            f()  # warm-up: compiled kernels, plans
        for r in range(rounds):
            for k, f in cands.items():
                rate, tokens[k] = f()
                rates[k].append(rate)
            logging.info("round %d: %s", r, {k: round(v[-1], 1) for k, v in rates.items()})
    bf16 = statistics.median(rates["bf16"])
    out = [{"weights": "bf16", "tokens_per_s": bf16, "rates": rates["bf16"]}]
    for name in models:
        if name == "bf16":
            continue
        on = rates[f"{name}/row kernels"]
        row = {"weights": name, "tokens_per_s": statistics.median(on), "vs_bf16": statistics.median(on) / bf16,
               "rates": on}
        for key, way in WAYS.items():
            other = rates[f"{name}/{way}"]
            ratios = [a / b for a, b in zip(on, other)]
            q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
            row.update({f"{key}_tokens_per_s": statistics.median(other), f"{key}_vs_bf16": statistics.median(other) / bf16,
                        f"{key}_speedup": statistics.median(ratios), f"{key}_speedup_quartiles": [q[0], q[2]],
                        f"{key}_rates": other})
        row["same_tokens"] = all(torch.equal(tokens[f"{name}/row kernels"], tokens[f"{name}/{way}"])
                                 for way in WAYS.values())
        out.append(row)
        logging.info("%s", {k: v for k, v in out[-1].items() if "rates" not in k})
    return out


def table(meta: dict, res: list[dict], new_tokens: int, rounds: int) -> str:
    lines = [f"`{meta['command']}` on {meta['machine']}, numba {meta['numba_threads']} threads, load average before "
             f"{meta['load_before']}, after {meta['load_after']}, {meta['date']}", "",
             f"{'A tiny random Llama (smoke)' if meta['smoke'] else 'SmolLM2-135M'} greedy decoding at batch 1, {new_tokens} new tokens after a {PROMPT}-token prompt "
             f"(tokens/s of the last {new_tokens - 1}), {rounds} rounds each timing every row; tokens/s are medians "
             "(against torch bf16 in brackets); the speedups, of the library's way over the other, are medians of "
             "each round's ratio (quartiles in brackets):", "",
             "| weights | as the library runs | " + " | ".join(f"{way} | speedup" for way in WAYS.values())
             + " | same tokens |", "|---|---|" + "---|---|" * len(WAYS) + "---|"]
    for r in res:
        if r["weights"] == "bf16":
            lines.append(f"| torch bf16 | {r['tokens_per_s']:.1f} | " + "- | - | " * len(WAYS) + "- |")
            continue
        cells = [f"{r['tokens_per_s']:.1f} ({r['vs_bf16']:.2f}x)"]
        for key in WAYS:
            lo, hi = r[f"{key}_speedup_quartiles"]
            cells += [f"{r[f'{key}_tokens_per_s']:.1f} ({r[f'{key}_vs_bf16']:.2f}x)",
                      f"{r[f'{key}_speedup']:.2f}x ({lo:.2f}-{hi:.2f})"]
        lines.append(f"| {r['weights']} | {' | '.join(cells)} | {'yes' if r['same_tokens'] else 'no'} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--tokens", type=int, default=9, help="new tokens per timing (the first is the prompt's)")
    ap.add_argument("--smoke", action="store_true", help="a tiny random model: checks the script only")
    ap.add_argument("--out", default=None, help="default: results/row_kernel (runs/row_kernel_smoke with --smoke)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    numba.set_num_threads(args.threads)
    load_before = "%.2f %.2f %.2f" % os.getloadavg()
    res = rows(args.smoke, args.tokens, 2 if args.smoke else args.rounds)
    meta = {**run_meta(), "numba_threads": numba.get_num_threads(), "load_before": load_before,
            "load_after": "%.2f %.2f %.2f" % os.getloadavg(), "new_tokens": args.tokens, "smoke": args.smoke}
    md = table(meta, res, args.tokens, 2 if args.smoke else args.rounds)
    write_results(args.out or ("runs/row_kernel_smoke" if args.smoke else "results/row_kernel"), meta, res, md)
    print(md)


if __name__ == "__main__":
    main()
