"""Do the paper's extra code fields earn their bits? Same code width, bits moved between fields.

    python bench/field_ablation.py          # writes results/field_ablation.{json,md}

Each row spends 10 bits per 4 weights (2.5 bits/weight plus scales), like rbe-2.5, but gives
one or two of those bits to ``deriv`` (derived basis vector), ``cat``/``sub`` (choice of gain
curve per vector) or ``amp_fine`` instead of to ``idx``/``amp``. Measured on the 37 real
all-MiniLM-L6-v2 layers (relative weight MSE). A field earns its bit when its row beats the
plain row at equal width.
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModel

from hf_rbe import RBEConfig, RBELinear
from hf_rbe.core.rbe_codecs import universal_tables
from hf_rbe.data import minilm_path
from hf_rbe.data.fetch import ensure
from hf_rbe.evaluation.results import run_meta, write_results

ROWS = {
    "plain: idx 7, amp 2": {"idx": 7, "amp": 2},
    "deriv: idx 6 + deriv 1, amp 2": {"idx": 6, "deriv": 1, "amp": 2},
    "cat: idx 6 + cat 1, amp 2": {"idx": 6, "cat": 1, "amp": 2},
    "sub: idx 6 + sub 1, amp 2": {"idx": 6, "sub": 1, "amp": 2},
    "cat+sub: idx 5 + cat 1 + sub 1, amp 2": {"idx": 5, "cat": 1, "sub": 1, "amp": 2},
    "amp_fine: idx 6, amp 2 + amp_fine 1": {"idx": 6, "amp": 2, "amp_fine": 1},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="results/field_ablation")
    args = ap.parse_args()
    ensure("minilm")
    model = AutoModel.from_pretrained(minilm_path())
    weights = [m.weight.detach() for m in model.modules() if isinstance(m, torch.nn.Linear)]
    energy = sum(float(w.double().pow(2).sum()) for w in weights)
    rows = []
    for name, fields in ROWS.items():
        spec = RBEConfig(dim=4, sign=1, residual="none", **fields).base_spec()
        tables = universal_tables(spec)
        err = 0.0
        for k, w in enumerate(weights):
            lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
            lin.weight.data = w.clone()
            q = RBELinear.from_linear(lin, spec, tables, rotation_seed=k + 1)
            err += float((q.dequantize(torch.float64) - w.double()).pow(2).sum())
        rows.append({"setting": name, "code_bits": spec.stage.layout.width, "rel_mse": err / energy})
        print(rows[-1], flush=True)
    base = rows[0]["rel_mse"]
    meta = run_meta()
    lines = [f"`{meta['command']}` on {meta['machine']}, {meta['date']}; 37 all-MiniLM-L6-v2 layers, dim 4", "",
             "| setting (10-bit codes) | relMSE | vs plain |", "|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['setting']} | {r['rel_mse']:.4f} | {r['rel_mse'] / base:.3f}x |")
    write_results(args.out, meta, rows, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
