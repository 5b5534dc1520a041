"""CPU speed of RBE layers and of SmolLM2-135M quantized with them, next to torch fp32 and bf16.

    python bench/cpu_speed.py                  # results/cpu_speed.{json,md} (about 15 minutes on 2 cores)
    python bench/cpu_speed.py --smoke          # tiny shapes and a tiny random model: checks the script only

Layers: ``y = x W^T`` at M = 1 (decoding) for SmolLM2's 576->1536 and 1536->576 and a
4096x4096 layer. Every timing cycles through enough copies of the layer (fp32 or bf16 weights,
or RBE codes) that they fill ``STREAM_BYTES`` (8x this machine's 32 MiB L3): the weights come
from memory, not cache, as in decoding a model bigger than the cache. Candidates are timed side by side, round-robin, in
this one process; a row reports the median round.

End to end: SmolLM2-135M (offline, ``hf_rbe.data.smollm2_path``) in fp32, bf16 and every
preset (quantized without calibration: codes cost the same to decode either way; embedding and
tied head in fp32 as loaded, once more with ``embedding_dtype="bfloat16"`` and once with
``quantize_embeddings=True``: the head RBE-coded, the embedding reading its rows), greedy,
batch 1. Decode tokens/s = ``(N - 1) / (t(generate N) - t(generate 1))`` from a 16-token prompt;
prefill tokens/s = 512 / one forward over 512 tokens. Medians of ``--repeats``. Format-v1
presets have no CPU kernel yet (the PyTorch reference decodes every weight on every call);
``--v1`` adds them.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import statistics
import time
from collections.abc import Callable

import numba
import torch
import torch.nn.functional as F

from hf_rbe import RBEConfig, RBELinear
from hf_rbe.core.packed import packed_size
from hf_rbe.core.rbe_codecs import universal_tables
from hf_rbe.evaluation.results import run_meta, write_results
from hf_rbe.hf.config import PRESETS

SHAPES = [(576, 1536), (1536, 576), (4096, 4096)]  # (in_features, out_features)
STREAM_BYTES = 256 * 2**20
V2_PRESETS = sorted((p for p, v in PRESETS.items() if v.get("format_version") == 2), key=lambda p: float(p[3:]))
V1_PRESETS = sorted((p for p, v in PRESETS.items() if p.startswith("rbe-")), key=lambda p: float(p[4:]))
ACCEPT_PRESET = "v2-3"


def median_rounds(cands: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median seconds per call of each candidate, timed round-robin so load hits them alike."""
    for f in cands.values():
        f()  # warm up (JIT, allocator)
    times: dict[str, list[float]] = {k: [] for k in cands}
    for _ in range(rounds):
        for k, f in cands.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def _copies(nbytes: int, stream_bytes: int) -> int:
    return max(2, -(-stream_bytes // nbytes))


def layer_rows(shapes: list[tuple[int, int]], presets: list[str], rounds: int, stream_bytes: int) -> list[dict]:
    """Every candidate cycles through its own copies, ``stream_bytes`` of them in all (fp32's and
    each RBE preset's alike), so that none of them runs from cache."""
    rows = []
    for k, n in shapes:
        torch.manual_seed(0)
        lin = torch.nn.Linear(k, n, bias=False)
        x = torch.randn(1, k)
        xb = x.bfloat16()
        weights = {"fp32": [lin.weight.detach().clone() for _ in range(_copies(4 * n * k, stream_bytes))],
                   "bf16": [lin.weight.detach().bfloat16() for _ in range(_copies(2 * n * k, stream_bytes))]}
        cands: dict[str, Callable[[], object]] = {
            "fp32": lambda ws=weights["fp32"]: [F.linear(x, w) for w in ws],
            "bf16": lambda ws=weights["bf16"]: [F.linear(xb, w) for w in ws]}
        copies = {c: len(w) for c, w in weights.items()}
        bpw = {}
        for name in presets:
            spec = RBEConfig.from_preset(name).base_spec()
            q = RBELinear.from_linear(lin, spec, universal_tables(spec), rotation_seed=1)
            clones = [copy.deepcopy(q) for _ in range(_copies(q.storage_bits(include_tables=False) // 8, stream_bytes))]
            bpw[name], copies[name] = q.bits_per_weight, len(clones)
            cands[name] = lambda clones=clones: [c(x) for c in clones]
        secs = {c: t / copies[c] for c, t in median_rounds(cands, rounds).items()}
        row = {"in": k, "out": n, "M": 1, "copies": copies,
               **{f"{c}_us": secs[c] * 1e6 for c in cands},
               **{f"{c}_speedup": secs["fp32"] / secs[c] for c in cands if c != "fp32"},
               **{f"{c}_bpw": b for c, b in bpw.items()}}
        rows.append(row)
        logging.info("%s", row)
    return rows


def _models(smoke: bool, presets: list[str]) -> dict[str, torch.nn.Module]:
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if smoke:
        cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=256)

        def load(qc: RBEConfig | None, dtype: torch.dtype) -> torch.nn.Module:
            torch.manual_seed(0)
            model = LlamaForCausalLM(cfg).to(dtype)
            if qc is not None:
                from hf_rbe import quantize_model

                quantize_model(model, qc)
            return model
    else:
        from hf_rbe.data import smollm2_path

        path = smollm2_path()

        def load(qc: RBEConfig | None, dtype: torch.dtype) -> torch.nn.Module:
            return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, quantization_config=qc)

    models = {"fp32": load(None, torch.float32), "bf16": load(None, torch.bfloat16)}
    for name in presets:
        models[name] = load(RBEConfig.from_preset(name), torch.float32)
    if ACCEPT_PRESET in presets:  # the same codes with the embedding and tied head stored (and multiplied) in bf16
        models[f"{ACCEPT_PRESET} + bf16 embeddings"] = load(
            RBEConfig.from_preset(ACCEPT_PRESET, embedding_dtype="bfloat16"), torch.float32)
        # ... or the head RBE-coded too, the tied embedding decoding its rows from the head's codes
        models[f"{ACCEPT_PRESET} + RBE head and embedding"] = load(
            RBEConfig.from_preset(ACCEPT_PRESET, quantize_embeddings=True), torch.float32)
    return {k: m.eval() for k, m in models.items()}


@torch.inference_mode()
def model_rows(smoke: bool, presets: list[str], new_tokens: int, prefill: int, repeats: int) -> list[dict]:
    models = _models(smoke, presets)
    vocab = next(iter(models.values())).config.vocab_size
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (1, 16), generator=g)
    long = torch.randint(0, vocab, (1, prefill), generator=g)

    def gen(model: torch.nn.Module, n: int) -> Callable[[], object]:
        return lambda: model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                                      min_new_tokens=n, do_sample=False, pad_token_id=0)

    cands: dict[str, Callable[[], object]] = {}
    for name, m in models.items():
        cands[f"{name}/gen1"] = gen(m, 1)
        cands[f"{name}/genN"] = gen(m, new_tokens)
        cands[f"{name}/prefill"] = lambda m=m: m(long)
    secs = median_rounds(cands, repeats)
    rows = []
    for name, m in models.items():
        rows.append({"weights": name, "decode_tokens_per_s": (new_tokens - 1) / (secs[f"{name}/genN"] - secs[f"{name}/gen1"]),
                     "prefill_tokens_per_s": prefill / secs[f"{name}/prefill"],
                     "linear_bits_per_weight": packed_size(m)["bits_per_weight"] if packed_size(m)["rbe_layers"]
                     else None, "state_dict_mib": packed_size(m)["state_dict_bytes"] / 2**20})
        logging.info("%s", rows[-1])
    return rows


def _geo_mean(xs: list[float]) -> float:
    return statistics.geometric_mean(xs)


def verdicts(res: dict) -> dict:
    layers = [r[f"{ACCEPT_PRESET}_speedup"] for r in res["layers"] if f"{ACCEPT_PRESET}_speedup" in r]
    models = {r["weights"]: r for r in res["models"]}
    if not layers or ACCEPT_PRESET not in models:
        return {}
    q, f = models[ACCEPT_PRESET], models["fp32"]
    return {"layer_geomean_speedup": _geo_mean(layers), "layer_target": 1.0,
            "decode_ratio": q["decode_tokens_per_s"] / f["decode_tokens_per_s"], "decode_target": 1.0,
            "prefill_ratio": q["prefill_tokens_per_s"] / f["prefill_tokens_per_s"], "prefill_target": 0.5}


def table(res: dict) -> str:
    m, names = res["meta"], res["presets"]
    lines = [f"`{m['command']}` on {m['machine']}, numba {m['numba_threads']} threads, load average before "
             f"{m['load_before']}, after {m['load_after']}, {m['date']}", "",
             "Layer GEMV, M=1, weights streamed (microseconds per call; speedup over torch fp32):", "",
             "| in x out | fp32 us | bf16 | " + " | ".join(names) + " |", "|---|---|---|" + "---|" * len(names)]
    for r in res["layers"]:
        cells = [f"{r[f'{s}_speedup']:.2f}x ({r[f'{s}_us']:.0f} us)" for s in names]
        lines.append(f"| {r['in']}x{r['out']} | {r['fp32_us']:.0f} | {r['bf16_speedup']:.2f}x | " + " | ".join(cells) + " |")
    geo = [_geo_mean([r[f"{s}_speedup"] for r in res["layers"]]) for s in names]
    lines.append("| geometric mean | | " + f"{_geo_mean([r['bf16_speedup'] for r in res['layers']]):.2f}x | "
                 + " | ".join(f"{g:.2f}x" for g in geo) + " |")
    lines += ["", "SmolLM2-135M, batch 1, greedy:", "",
              "| weights | Linear bits/weight | state dict MiB | decode tokens/s | prefill tokens/s (512) |",
              "|---|---|---|---|---|"]
    for r in res["models"]:
        bpw = "-" if r["linear_bits_per_weight"] is None else f"{r['linear_bits_per_weight']:.2f}"
        lines.append(f"| {r['weights']} | {bpw} | {r['state_dict_mib']:.0f} | {r['decode_tokens_per_s']:.1f} | "
                     f"{r['prefill_tokens_per_s']:.0f} |")
    v = res.get("verdicts")
    if v:
        lines += ["", f"Acceptance ({ACCEPT_PRESET}): layer geometric-mean speedup {v['layer_geomean_speedup']:.2f}x "
                  f"(target >= 1.0x), decode {v['decode_ratio']:.2f}x fp32 (target >= 1.0x), prefill "
                  f"{v['prefill_ratio']:.2f}x fp32 (target >= 0.5x)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=15, help="rounds of the layer timings")
    ap.add_argument("--repeats", type=int, default=3, help="repeats of the model timings")
    ap.add_argument("--tokens", type=int, default=32, help="new tokens per decode timing")
    ap.add_argument("--v1", action="store_true", help="also the format-v1 presets (no CPU kernel: slow)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes and model: checks the script only")
    ap.add_argument("--out", default=None, help="default: results/cpu_speed (runs/cpu_speed_smoke with --smoke)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    numba.set_num_threads(args.threads)
    presets = V2_PRESETS + (V1_PRESETS if args.v1 else [])
    load_before = "%.2f %.2f %.2f" % os.getloadavg()
    if args.smoke:
        layers = layer_rows([(256, 64)], presets, 2, 2**20)
        models = model_rows(True, presets, 3, 32, 1)
    else:
        layers = layer_rows(SHAPES, presets, args.rounds, STREAM_BYTES)
        models = model_rows(False, presets, args.tokens, 512, args.repeats)
    meta = {**run_meta(), "numba_threads": numba.get_num_threads(), "load_before": load_before,
            "load_after": "%.2f %.2f %.2f" % os.getloadavg()}
    res = {"meta": meta, "presets": presets, "layers": layers, "models": models}
    res["verdicts"] = verdicts(res)
    out = args.out or ("runs/cpu_speed_smoke" if args.smoke else "results/cpu_speed")
    write_results(out, meta, {k: v for k, v in res.items() if k != "meta"}, table(res))
    print(table(res))


if __name__ == "__main__":
    main()
