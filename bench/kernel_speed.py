"""Kernel benchmark (needs a CUDA GPU): y = x W^T from RBE codes vs fp16 cuBLAS and int4 tinygemm.

    python bench/kernel_speed.py                   # prints a table, writes results/kernels_<gpu>.json
    python bench/kernel_speed.py --check           # correctness only: kernels vs reference, fp16

Every timing replays a CUDA graph of ``--reps`` calls, cycling through enough weight copies
that they do not fit in L2 (so each call streams its weights from HBM, as in decoding).
Shapes: 4096x4096, 4096x14336 (N x K: 14336 outputs from 4096 inputs is written
"4096x14336" as in NOTES, i.e. in=4096, out=14336) and 14336x4096; M in {1, 4, 16, 64, 256}.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F

from hf_rbe import RBEConfig, RBELinear
from hf_rbe.core import ops
from hf_rbe.core.rbe_codecs import universal_tables

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096)]  # (in_features, out_features)
MS = [1, 4, 16, 64, 256]
SETTINGS = ["rbe-2.5", "rbe-4"]
L2_BYTES = 50 * 2**20


def graph_time_us(fns: list, reps: int) -> float:
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


def copies_for(nbytes: int) -> int:
    return max(2, -(-3 * L2_BYTES // max(nbytes, 1)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/kernel_speed.py needs a CUDA GPU; on CPU the kernels are checked by tests/kernels/")
    dev = torch.device("cuda")
    torch.manual_seed(0)
    rows = []
    for k, n in SHAPES:
        w = torch.randn(n, k, device=dev, dtype=torch.float16) * 0.02
        layers = {}
        for name in SETTINGS:
            spec = RBEConfig.from_preset(name).base_spec()
            lin = torch.nn.Linear(k, n, bias=False, device=dev, dtype=torch.float16)
            lin.weight.data.copy_(w)
            layers[name] = RBELinear.from_linear(lin, spec, universal_tables(spec), rotation_seed=1)
        for m in MS:
            x = torch.randn(m, k, device=dev, dtype=torch.float16)
            if args.check:
                for name, q in layers.items():
                    y = q(x)  # the dispatcher picks the Triton kernel for CUDA tensors
                    ref = ops.reference_linear(x, *q.op_args(), q.bias)
                    err = float((y.float() - ref.float()).norm() / ref.float().norm())
                    print(f"{name} {k}x{n} M={m}: relative error {err:.2e}")
                    assert err <= 1e-2
                continue
            row = {"in": k, "out": n, "M": m}
            ws = [w.clone() for _ in range(copies_for(w.numel() * 2))]
            fp16_us = graph_time_us([lambda ww=ww: F.linear(x, ww) for ww in ws], args.reps)
            row["fp16_us"] = fp16_us
            row["fp16_GBps"] = w.numel() * 2 / fp16_us / 1e3
            try:  # torch's int4 tinygemm (group 128), as in gpt-fast
                wq = torch.randint(0, 256, (n, k // 2), device=dev, dtype=torch.uint8)  # two 4-bit values per byte
                packed = torch.ops.aten._convert_weight_to_int4pack(wq, 8)
                sz = torch.rand(k // 128, n, 2, device=dev, dtype=torch.bfloat16)
                xb = x.to(torch.bfloat16)
                ps = [packed.clone() for _ in range(copies_for(n * k // 2))]
                t = graph_time_us([lambda p=p: torch.ops.aten._weight_int4pack_mm(xb, p, 128, sz) for p in ps], args.reps)
                row["int4_tinygemm_us"], row["int4_speedup"] = t, fp16_us / t
            except Exception as err:  # the packing API moves between torch releases
                row["int4_tinygemm_error"] = repr(err)[:200]
            for name, q in layers.items():
                clones = [copy.deepcopy(q) for _ in range(copies_for(q.storage_bits() // 8))]
                t = graph_time_us([lambda c=c: c(x) for c in clones], args.reps)
                row[f"{name}_us"] = t
                row[f"{name}_speedup"] = fp16_us / t
                row[f"{name}_bpw"] = q.bits_per_weight
            rows.append(row)
            print(row, flush=True)
    if args.check:
        print("all kernels within 1e-2 of the reference")
        return
    gpu = torch.cuda.get_device_name()
    meta = {"device": gpu, "date": date.today().isoformat(), "torch": torch.__version__, "host": platform.node()}
    out = Path(args.out or f"results/kernels_{gpu.replace(' ', '_')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    hdr = "| in x out | M | fp16 us | int4 tinygemm | " + " | ".join(SETTINGS) + " |"
    print(hdr + "\n|" + "---|" * (3 + len(SETTINGS)))
    for r in rows:
        cells = [f"{r.get(f'{s}_speedup', float('nan')):.2f}x" for s in SETTINGS]
        print(f"| {r['in']}x{r['out']} | {r['M']} | {r['fp16_us']:.1f} | {r.get('int4_speedup', float('nan')):.2f}x | "
              + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
