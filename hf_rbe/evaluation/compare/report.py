"""The report of ``hf-rbe compare``: acceptance targets, the markdown table and the Pareto plot,
all from the measured rows (``render`` redraws them from the JSON without measuring)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from .methods import BASELINES, MINILM, PROBE_TEST, PROBE_TRAIN, SMOLLM2

#: SmolLM2's third corpus: the movie-review snippets, which nothing calibrates or tunes on. Rows
#: measured before it was scored show '-'.
HELD_OUT = "movie_reviews"


def targets(rows: list[dict]) -> list[str]:
    """The issue's acceptance targets, checked against the measured rows (met or missed)."""
    lm = [r for r in rows if r["model"] == SMOLLM2 and "error" not in r]
    enc = [r for r in rows if r["model"] == MINILM and "error" not in r]
    out = []

    def best(rs: list[dict], families: tuple[str, ...], key: str, lower: bool) -> dict | None:
        cand = [r for r in rs if r["family"] in families and r["bits_per_weight"] <= 2.5 and key in r]
        return min(cand, key=lambda r: r[key] if lower else -r[key]) if cand else None

    for rs, key, lower, what in ((lm, "wikipedia_ppl", True, "SmolLM2 Wikipedia perplexity"),
                                 (enc, "cos_mean", False, "MiniLM embedding cosine"),
                                 (enc, "accuracy", False, "MiniLM probe accuracy")):
        ours, theirs = best(rs, ("RBE",), key, lower), best(rs, BASELINES, key, lower)
        if ours and theirs:
            won = ours[key] < theirs[key] if lower else ours[key] > theirs[key]
            out.append(f"- <= 2.5 bits, {what}: best RBE {ours['method']} {ours[key]:.4g} vs best baseline "
                       f"{theirs['method']} {theirs[key]:.4g}: **{'met' if won else 'missed'}**")
    fp = next((r for r in lm if r["family"] == "fp32"), None)
    r3 = next((r for r in lm if r["method"] == "RBE rbe-3"), None)
    h3 = next((r for r in lm if r["method"].startswith("HQQ 3-bit")), None)
    if fp and r3:
        gap = r3["wikipedia_ppl"] / fp["wikipedia_ppl"] - 1
        out.append(f"- ~3 bits, RBE rbe-3 perplexity within 15% of fp32: {r3['wikipedia_ppl']:.4g} vs "
                   f"{fp['wikipedia_ppl']:.4g} (+{100 * gap:.0f}%): **{'met' if gap <= 0.15 else 'missed'}**")
    if h3 and r3:
        out.append(f"- ~3 bits, RBE rbe-3 ahead of {h3['method']} ({h3['bits_per_weight']:.2f} bpw): "
                   f"{r3['wikipedia_ppl']:.4g} vs {h3['wikipedia_ppl']:.4g}: "
                   f"**{'met' if r3['wikipedia_ppl'] < h3['wikipedia_ppl'] else 'missed'}**")
    c3 = next((r for r in lm if r["method"] == "RBE v2-3 calibrated"), None)
    if h3 and c3:
        out.append(f"- ~3 bits, RBE v2-3 calibrated ({c3['bits_per_weight']:.2f} bpw) ahead of {h3['method']}: "
                   f"{c3['wikipedia_ppl']:.4g} vs {h3['wikipedia_ppl']:.4g}: "
                   f"**{'met' if c3['wikipedia_ppl'] < h3['wikipedia_ppl'] else 'missed'}**")
    return out


def _held_out(row: dict) -> str:
    return f"{row[f'{HELD_OUT}_ppl']:.2f}" if f"{HELD_OUT}_ppl" in row else "-"


def _mib(row: dict) -> str:
    return "-" if row.get("bytes_on_disk") is None else f"{row['bytes_on_disk'] / 2**20:.1f}"


def _table(rows: list[dict], columns: dict[str, Callable[[dict], str]]) -> list[str]:
    """Markdown rows: a method column, then ``columns`` (header -> cell); failed rows say why."""
    lines = ["| method | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for r in rows:
        cells = [f"did not run here: {r['error']}"] + [""] * (len(columns) - 1) if "error" in r else \
            [cell(r) for cell in columns.values()]
        lines.append(f"| {r['method']} | " + " | ".join(cells) + " |")
    return lines


def _run_line(meta: dict) -> str:
    took = f" ({meta['wall_seconds'] / 60:.0f} minutes)" if "wall_seconds" in meta else ""
    return f"`{meta['command']}` on {meta['machine']}, {meta['date']}{took}"


def markdown(rows: list[dict], meta: dict) -> str:
    runs = [*meta.get("earlier", []), meta]
    if len(runs) == 1:
        lines = [_run_line(meta), ""]
    else:  # merged runs: each later one re-measured its families' rows
        lines = ["Measured by " + _run_line(runs[0]) + "; then re-measured or added:"]
        lines += [f"- {', '.join(m.get('families') or ['all'])} rows: {_run_line(m)}" for m in runs[1:]]
        lines.append("")
    bpw: Callable[[dict], str] = lambda r: f"{r['bits_per_weight']:.3f}"  # noqa: E731
    lm = [r for r in rows if r["model"] == SMOLLM2]
    if lm:
        ok = next((r for r in lm if "context" in r), {})
        lines += [f"SmolLM2-135M-Instruct, perplexity over the first {ok.get('tokens')} tokens of each corpus "
                  f"(context {ok.get('context')}, stride {ok.get('stride')}). Its weights came as a Q4_1 GGUF "
                  "(4-bit grid, blocks of 32): rows at >= 4 bits favour group sizes dividing 32.", ""]
        lines += _table(lm, {"bits/weight": bpw, "Wikipedia ppl": lambda r: f"{r['wikipedia_ppl']:.2f}",
                             "Austen ppl": lambda r: f"{r['austen_ppl']:.2f}",
                             "reviews ppl (held out)": _held_out,
                             "load+quantize s": lambda r: f"{r['load_seconds']:.1f}",
                             "peak load MiB": lambda r: f"{r['peak_load_mib']:.0f}", "MiB on disk": _mib})
    enc = [r for r in rows if r["model"] == MINILM]
    if enc:
        lines += ["", f"all-MiniLM-L6-v2 on {PROBE_TRAIN + PROBE_TEST} movie-review snippets: embedding cosine to "
                      f"fp32, and sentiment accuracy of a logistic-regression probe ({PROBE_TRAIN} train / "
                      f"{PROBE_TEST} test, fixed split).", ""]
        lines += _table(enc, {"bits/weight": bpw,
                              "cosine mean / min": lambda r: f"{r['cos_mean']:.4f} / {r['cos_min']:.4f}",
                              "probe accuracy": lambda r: f"{r['accuracy']:.3f}",
                              "load+quantize s": lambda r: f"{r['load_seconds']:.1f}", "MiB on disk": _mib})
    lines += ["", "Bits per weight: every tensor the quantized layers store; the baselines' floating-point "
                  "scales and zeros counted at 16 bits (their fp16 deployment). '-' on disk: the method has no "
                  "`save_pretrained` serialization here.", "", "Targets (issue #4):"] + targets(rows)
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], meta: dict, out: Path, heading: str = "hf-rbe compare") -> None:
    """Quality against bits per weight, one line per method family (fp32 as a dashed level;
    each family keeps its colour in every panel)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(SMOLLM2, "wikipedia_ppl", "SmolLM2-135M Wikipedia perplexity (log)", True),
              (SMOLLM2, "austen_ppl", "SmolLM2-135M Austen perplexity (log)", True),
              (MINILM, "cos_mean", "MiniLM embedding cosine to fp32", False),
              (MINILM, "accuracy", "MiniLM sentiment probe accuracy", False)]
    colors = {f: f"C{i}" for i, f in enumerate(dict.fromkeys(r["family"] for r in rows if r["family"] != "fp32"))}
    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    for ax, (model, key, title, log) in zip(axes.flat, panels):
        rs = [r for r in rows if r["model"] == model and key in r]
        for fam in dict.fromkeys(r["family"] for r in rs):
            pts = sorted((r["bits_per_weight"], r[key]) for r in rs if r["family"] == fam)
            if fam == "fp32":
                ax.axhline(pts[0][1], ls="--", c="k", lw=1, label="fp32")
            else:
                ax.plot(*zip(*pts), marker="o", label=fam, color=colors.get(fam))
        ax.set(title=title, xlabel="bits per weight", xlim=(1, 9))
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{heading}, {meta['machine']}, {meta['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def render(out: str | Path) -> None:
    """Write ``out``.md and ``out``.png from the measurements in ``out``.json (nothing re-measured)."""
    path = Path(out)
    result = json.loads(path.with_suffix(".json").read_text())
    path.with_suffix(".md").write_text(markdown(result["rows"], result["meta"]))
    plot(result["rows"], result["meta"], path.with_suffix(".png"))
