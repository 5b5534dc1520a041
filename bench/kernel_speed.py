"""Kernel and decode speed on a CUDA GPU: RBE v2 (and v1) next to fp16 cuBLAS and int4 tinygemm.

    python bench/kernel_speed.py            # on the H100: table, results/kernel_speed_<gpu>.{json,md}
    python bench/kernel_speed.py --smoke    # tiny shapes on the CPU: checks the script, times nothing useful

Layers: y = x W^T for in x out = 4096 x 4096, 4096 x 14336, 14336 x 4096 and M in {1, 16, 256};
each timing replays a CUDA graph cycling through enough weight copies that they do not fit in
L2 (every call streams its weights from HBM, as in decoding). Every RBE row also reports its
relative error against the op's fp32 reference on the same fp16 input. End to end: a ~1.1B
Llama-shaped model (random weights; hidden 2048, MLP 8192, 16 layers) generating 128 tokens at
batch 1 with a static cache under ``torch.compile(mode="reduce-overhead")`` (CUDA graphs), fp16
vs RBE v2.
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from hf_rbe import RBEConfig, RBELinear, quantize_model
from hf_rbe.core import ops
from hf_rbe.core.rbe_codecs import universal_tables
from hf_rbe.evaluation.results import run_meta, write_results

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096)]  # (in_features, out_features)
MS = [1, 16, 256]
SETTINGS = ["v2-2", "v2-3", "v2-4", "rbe-2.5"]
L2_BYTES = 50 * 2**20


def graph_time_us(fns: list[Callable[[], object]], reps: int) -> float:
    """Mean microseconds per call of a CUDA graph replaying ``fns`` round-robin ``reps`` times."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f in fns:
            f()  # warm up / compile outside the graph
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(reps):
            fns[i % len(fns)]()
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / (5 * reps)


def wall_time_us(fns: list[Callable[[], object]], reps: int) -> float:
    for f in fns:
        f()
    t0 = time.perf_counter()
    for i in range(reps):
        fns[i % len(fns)]()
    return (time.perf_counter() - t0) * 1e6 / reps


def copies_for(nbytes: int) -> int:
    return max(2, -(-3 * L2_BYTES // max(nbytes, 1)))


def layer_rows(shapes: list[tuple[int, int]], ms: list[int], reps: int, dev: torch.device) -> list[dict]:
    timer = graph_time_us if dev.type == "cuda" else wall_time_us
    rows = []
    for k, n in shapes:
        w = torch.randn(n, k, device=dev, dtype=torch.float16) * 0.02
        layers = {}
        for name in SETTINGS:
            lin = torch.nn.Linear(k, n, bias=False, device=dev, dtype=torch.float16)
            lin.weight.data.copy_(w)
            spec = RBEConfig.from_preset(name).base_spec()
            layers[name] = RBELinear.from_linear(lin, spec, universal_tables(spec), rotation_seed=1)
        for m in ms:
            x = torch.randn(m, k, device=dev, dtype=torch.float16)
            row: dict = {"in": k, "out": n, "M": m}
            ws = [w.clone() for _ in range(copies_for(w.numel() * 2))] if dev.type == "cuda" else [w]
            row["fp16_us"] = timer([lambda ww=ww: F.linear(x, ww) for ww in ws], reps)
            if dev.type == "cuda":
                try:  # torch's int4 tinygemm (group 128), as in gpt-fast
                    wq = torch.randint(0, 256, (n, k // 2), device=dev, dtype=torch.uint8)
                    packed = torch.ops.aten._convert_weight_to_int4pack(wq, 8)
                    sz = torch.rand(k // 128, n, 2, device=dev, dtype=torch.bfloat16)
                    xb = x.to(torch.bfloat16)
                    ps = [packed.clone() for _ in range(copies_for(n * k // 2))]
                    t = timer([lambda p=p: torch.ops.aten._weight_int4pack_mm(xb, p, 128, sz) for p in ps], reps)
                    row["int4_tinygemm_speedup"] = row["fp16_us"] / t
                except Exception as err:  # the packing API moves between torch releases
                    row["int4_tinygemm_error"] = repr(err)[:200]
            for name, q in layers.items():
                tensors, layout = q.op_args()
                y = q(x)
                ref = ops.reference_linear(x.float(), tensors, layout, None)
                row[f"{name}_rel_err"] = float((y.float() - ref).norm() / ref.norm())
                clones = [copy.deepcopy(q) for _ in range(copies_for(q.storage_bits() // 8))] if dev.type == "cuda" \
                    else [q]
                t = timer([lambda c=c: c(x) for c in clones], reps)
                row[f"{name}_us"], row[f"{name}_speedup"] = t, row["fp16_us"] / t
                row[f"{name}_bpw"] = q.bits_per_weight
            rows.append(row)
            print(row, flush=True)
    return rows


def decode_rows(dev: torch.device, smoke: bool, new_tokens: int) -> list[dict]:
    """Tokens per second generating ``new_tokens`` at batch 1, fp16 vs RBE v2, static cache, CUDA graphs."""
    from transformers import LlamaConfig, LlamaForCausalLM

    size = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=256) if smoke else \
        dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=16,
             num_key_value_heads=8, vocab_size=32000)
    cfg = LlamaConfig(**size, max_position_embeddings=1024)
    rows = []
    for name in ["fp16", "v2-2", "v2-3", "v2-4"]:
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg).to(device=dev, dtype=torch.float16).eval()
        if name != "fp16":
            quantize_model(model, RBEConfig.from_preset(name))
        params = sum(p.numel() for p in model.parameters())
        model.generation_config.cache_implementation = "static"
        if dev.type == "cuda":
            model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
        ids = torch.tensor([[1, 2, 3, 4]], device=dev)
        kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        model.generate(ids, **kw)  # compile and capture
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.generate(ids, **kw)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        secs = time.perf_counter() - t0
        rows.append({"model": f"Llama-shaped {params / 1e9:.2f}B", "weights": name, "new_tokens": new_tokens,
                     "tokens_per_second": new_tokens / secs})
        print(rows[-1], flush=True)
        del model
    return rows


def table(res: dict) -> str:
    m = res["meta"]
    lines = [f"`{m['command']}` on {m['device']}, {m['date']}", "", "| in x out | M | fp16 us | int4 tinygemm | "
             + " | ".join(SETTINGS) + " | max rel. error |", "|---|---|---|---|" + "---|" * (len(SETTINGS) + 1)]
    for r in res["layers"]:
        cells = [f"{r[f'{s}_speedup']:.2f}x" for s in SETTINGS]
        err = max(r[f"{s}_rel_err"] for s in SETTINGS)
        lines.append(f"| {r['in']}x{r['out']} | {r['M']} | {r['fp16_us']:.1f} | "
                     f"{r.get('int4_tinygemm_speedup', float('nan')):.2f}x | " + " | ".join(cells) + f" | {err:.1e} |")
    lines += ["", "| model | weights | decode tokens/s (batch 1) |", "|---|---|---|"]
    lines += [f"| {r['model']} | {r['weights']} | {r['tokens_per_second']:.1f} |" for r in res["decode"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: checks the script only")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.smoke:
        dev, shapes, ms, reps, tokens = torch.device("cpu"), [(512, 256)], [1, 17], 3, 4
    elif torch.cuda.is_available():
        dev, shapes, ms, reps, tokens = torch.device("cuda"), SHAPES, MS, args.reps, args.tokens
    else:
        raise SystemExit("bench/kernel_speed.py needs a CUDA GPU (or --smoke); statically: bench/kernel_cost.py")
    torch.manual_seed(0)
    gpu = torch.cuda.get_device_name() if dev.type == "cuda" else "CPU (smoke run)"
    res = {"meta": {**run_meta(), "device": gpu}, "layers": layer_rows(shapes, ms, reps, dev),
           "decode": decode_rows(dev, args.smoke, tokens)}
    out = args.out or ("runs/kernel_speed_smoke" if args.smoke else f"results/kernel_speed_{gpu.replace(' ', '_')}")
    write_results(out, res["meta"], {k: v for k, v in res.items() if k != "meta"}, table(res))
    print(table(res))


if __name__ == "__main__":
    main()
