"""Static cost of the GPU kernels without a GPU: compile for the H100 (sm_90) and read the SASS.

    python bench/kernel_cost.py          # prints a table, writes results/kernel_cost.{json,md} (about a minute)

For every v2 preset and M in {1, 16, 256}: the configuration ``kernels/triton_v2.tiles`` picks
for a 4096 x 14336 layer (in x out), compiled as that launch would be; registers per thread,
spill instructions, shared memory, and instructions per weight in the main loop (SASS
instructions per thread per iteration x threads / weights per iteration). The v1 kernel at
M = 1 stands beside it. The predicted time at M = 1 is a floor: instructions at the H100's
~3e13 thread-instructions per second, or the bytes at 3 TB/s, whichever is larger; fp16 cuBLAS
measured 44.7 us on this shape on our H100 (NOTES). Real timings: ``bench/kernel_speed.py``.
"""

from __future__ import annotations

import argparse

import torch

from hf_rbe.core.format import CodeLayout
from hf_rbe.core.format_v2 import LayerSpecV2, StageV2
from hf_rbe.evaluation.results import run_meta, write_results
from hf_rbe.kernels import sass_cost
from hf_rbe.kernels import triton_v1 as T1
from hf_rbe.kernels import triton_v2 as T2

IN, OUT = 4096, 14336
H100_SMS, ISSUE_RATE, HBM_BPS, FP16_US = 132, 3e13, 3.0e12, 44.7
PRESETS = {"v2-2": ("e8p",), "v2-2.5": ("e8p", "vq4"), "v2-3": ("e8p", "vq8"), "v2-4": ("e8p", "e8p")}
MS = (1, 16, 256)
SMEM_LIMIT = 227 * 1024  # bytes of shared memory one H100 block may use


def v2_rows() -> list[dict]:
    rows = []
    for name, planes in PRESETS.items():
        spec = LayerSpecV2(tuple(StageV2(p) for p in planes))
        for m in MS:
            for dtype in (torch.float16, torch.bfloat16) if m == 1 else (torch.float16,):
                cfg = T2.tiles(m, OUT, IN, H100_SMS, len(planes))
                cost = sass_cost.analyse(T2.compile_sm90(cfg, spec, dtype))
                ipw = cost.per_weight(cfg.num_warps * 32, cfg.bn * T2.CHUNK)
                bpw = spec.bits_per_weight_estimate(IN)
                floor_us = max(ipw * IN * OUT / ISSUE_RATE, IN * OUT * bpw / 8 / HBM_BPS) * 1e6
                rows.append({"kernel": f"v2 {cfg.kernel}", "preset": name, "bits_per_weight": bpw, "M": m,
                             "x_dtype": str(dtype).removeprefix("torch."), "config": cfg.__dict__,
                             "registers": cost.registers, "spill_instructions": cost.spill_instructions,
                             "shared_bytes": cost.shared_bytes, "loop_instructions": cost.loop_instructions,
                             "instructions_per_weight": ipw,
                             "predicted_floor_us": floor_us if m == 1 else None,
                             "predicted_vs_fp16": FP16_US / floor_us if m == 1 else None})
                print(_line(rows[-1]), flush=True)
    return rows


def v1_row() -> dict:
    """The v1 kernel (rbe-2.5 layout) at M = 1, as ``triton_v1`` launches it."""
    lay = CodeLayout(idx=7, sign=1, amp=2)
    bm, bn, bk, use_dot = T1._tiles(1)
    sig = {"x_ptr": "*fp16", "y_ptr": "*fp32", "words_ptr": "*i32", "scale_ptr": "*fp16", "table_ptr": "*fp32",
           "lut_ptr": "*fp32", "M": "i32", "N": "i32", "K": "i32", "W": "i32", "G": "i32", "stride_xm": "i32",
           "stride_ym": "i32"}
    meta = {"MODE": T1.MODE_RBE, "DIM": 4, "WIDTH": lay.width, "VEC_PER_GROUP": IN // 4, "N_LEVELS": lay.n_levels,
            **{f"B_{s}": getattr(lay, f) for f, s in T1._SHORT.items()},
            **{f"O_{s}": lay.offsets[f] for f, s in T1._SHORT.items()}, "INT_BITS": 0, "GROUP": 1,
            "ACCUMULATE": False, "BM": bm, "BN": bn, "BK": bk, "USE_DOT": use_dot, "EXP_BIAS": 7, "MANT_BITS": 3}
    cost = sass_cost.analyse(sass_cost.compile_sm90(T1._matmul_kernel, sig, meta, num_warps=4,
                                                    multiples_of_16=("N", "K", "W", "stride_xm", "stride_ym")))
    ipw = cost.per_weight(4 * 32, bn * bk)
    row = {"kernel": "v1 matmul", "preset": "rbe-2.5", "bits_per_weight": 2.5, "M": 1, "x_dtype": "float16",
           "config": {"bm": bm, "bn": bn, "bk": bk}, "registers": cost.registers,
           "spill_instructions": cost.spill_instructions, "shared_bytes": cost.shared_bytes,
           "loop_instructions": cost.loop_instructions, "instructions_per_weight": ipw,
           "predicted_floor_us": ipw * IN * OUT / ISSUE_RATE * 1e6,
           "predicted_vs_fp16": FP16_US / (ipw * IN * OUT / ISSUE_RATE * 1e6)}
    print(_line(row), flush=True)
    return row


def _line(r: dict) -> str:
    pred = f", floor {r['predicted_floor_us']:.1f} us ({r['predicted_vs_fp16']:.2f}x fp16)" if r["M"] == 1 else ""
    return (f"{r['kernel']:<10} {r['preset']:<8} M={r['M']:<4} {r['x_dtype']:<9} regs {r['registers']:>3} "
            f"spills {r['spill_instructions']:>3} smem {r['shared_bytes'] // 1024:>3} KiB "
            f"{r['instructions_per_weight']:.2f} instr/weight{pred}")


def table(rows: list[dict], meta: dict) -> str:
    lines = [f"`{meta['command']}` on {meta['machine']}, {meta['date']}: compiled for sm_90 (H100) with Triton's "
             f"ptxas; layer {IN} x {OUT} (in x out). Predictions, not measurements.", "",
             "| kernel | preset | bpw | M | x | regs | spills | smem KiB | instr/weight | predicted floor at M=1 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        pred = f"{r['predicted_floor_us']:.1f} us = {r['predicted_vs_fp16']:.2f}x fp16" if r["M"] == 1 else ""
        lines.append(f"| {r['kernel']} | {r['preset']} | {r['bits_per_weight']:.2f} | {r['M']} | {r['x_dtype']} | "
                     f"{r['registers']} | {r['spill_instructions']} | {r['shared_bytes'] / 1024:.0f} | "
                     f"{r['instructions_per_weight']:.2f} | {pred} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="results/kernel_cost")
    args = ap.parse_args()
    rows = v2_rows() + [v1_row()]
    bad = [r for r in rows if r["kernel"].startswith("v2") and (r["spill_instructions"] or r["shared_bytes"] > SMEM_LIMIT)]
    meta = run_meta()
    md = table(rows, meta)
    write_results(args.out, meta, rows, md)
    print(md)
    if bad:
        raise SystemExit(f"{len(bad)} v2 configurations spill or exceed shared memory")


if __name__ == "__main__":
    main()
