"""``hf-rbe compare``: RBE next to the quantizers users already know, same models, same data.

For each method the model is loaded and quantized from the same fp32 checkpoint, then
measured with the local ``evaluate`` metrics (``hf_rbe.metrics``):

- SmolLM2-135M: perplexity on the first ``tokens`` tokens of the Wikipedia articles and of
  Jane Austen's novels (sliding window; context and stride in the output);
- all-MiniLM-L6-v2: embedding cosine to fp32 and the accuracy of a logistic-regression probe
  (sentiment of the movie-review snippets, fixed shuffled split: 2,000 train, 1,000 test);
- compression: bits per weight over the layers each method quantizes (every stored tensor
  counted; floating-point scales and zeros of the baselines counted at 16 bits, as in their
  fp16 deployments, although this CPU run keeps them in fp32), bytes on disk where the
  method can ``save_pretrained``, peak resident memory added while loading, load+quantize time.

Baselines: HQQ (the ``hqq`` library's own ``HQQLinear``: transformers 5.23 has no HQQ
loader), optimum-quanto and bitsandbytes (through their transformers configs). Results go
to ``<out>.json``, ``<out>.md`` and ``<out>.png`` (quality against bits per weight, one
line per method family).
"""

from __future__ import annotations

import json
import logging
import random
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import RBEConfig
from .eval import mean_pooled_embeddings, perplexity, quantized_size, run_meta

logger = logging.getLogger(__name__)

SMOLLM2, MINILM = "SmolLM2-135M", "all-MiniLM-L6-v2"
PROBE_TRAIN, PROBE_TEST = 2000, 1000
BASELINES = ("HQQ", "quanto", "bitsandbytes")
RBE_SETTINGS = ("rbe-1.5", "rbe-2", "rbe-2.5", "rbe-3", "rbe-4", "rbe-4.5")


@dataclass
class Method:
    """One row of the comparison: how to get the quantized model from the fp32 checkpoint."""

    name: str
    family: str  # one line in the plot
    load: Callable[[str, type], nn.Module]  # (checkpoint path, Auto class) -> quantized model


def _fp32(path: str, auto: type) -> nn.Module:
    return auto.from_pretrained(path, dtype=torch.float32)


def _with_config(config: Any) -> Callable[[str, type], nn.Module]:
    def load(path: str, auto: type) -> nn.Module:
        return auto.from_pretrained(path, dtype=torch.float32, quantization_config=config, device_map="cpu")

    return load


def _hqq(nbits: int, group: int) -> Callable[[str, type], nn.Module]:
    def load(path: str, auto: type) -> nn.Module:
        from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

        model = auto.from_pretrained(path, dtype=torch.float32)
        cfg = BaseQuantizeConfig(nbits=nbits, group_size=group)
        for name, module in list(model.named_modules()):
            if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] != "lm_head":
                model.set_submodule(name, HQQLinear(module, cfg, compute_dtype=torch.float32, device="cpu"))
        return model

    return load


def methods(families: list[str] | None = None) -> list[Method]:
    """Every row, in table order; ``families`` keeps only those families."""
    from transformers import BitsAndBytesConfig, QuantoConfig

    rows = [Method("fp32 (unquantized)", "fp32", _fp32)]
    rows += [Method(f"RBE {p}", "RBE", _with_config(RBEConfig.from_preset(p))) for p in RBE_SETTINGS]
    rows += [Method("seed64 + scale + rbe-2.5 residual", "seed64",
                    _with_config(RBEConfig.from_preset("rbe-2.5", codec="seed64", tile=32, residual="rbe")))]
    rows += [Method(f"HQQ {b}-bit g64", "HQQ", _hqq(b, 64)) for b in (2, 3, 4)]
    rows += [Method(f"quanto {w}", "quanto", _with_config(QuantoConfig(weights=w))) for w in ("int2", "int4", "int8")]
    rows += [Method("bitsandbytes NF4", "bitsandbytes",
                    _with_config(BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"))),
             Method("bitsandbytes int8", "bitsandbytes", _with_config(BitsAndBytesConfig(load_in_8bit=True)))]
    return [m for m in rows if families is None or m.family in families]


# ----------------------------------------------------------------------------- size


def _disk_bytes(model: nn.Module) -> int | None:
    with tempfile.TemporaryDirectory() as tmp:
        try:
            model.save_pretrained(tmp)
        except Exception as e:  # the method has no transformers serialization: reported, not fatal
            logger.info("save_pretrained failed (%s): bytes on disk not measured", e)
            return None
        return sum(f.stat().st_size for f in Path(tmp).glob("*.safetensors")) or None


class _PeakRSS:
    """Peak resident memory above the starting level, sampled every 10 ms in a thread."""

    def __enter__(self) -> "_PeakRSS":
        import psutil

        self._proc = psutil.Process()
        self.base = self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)

    @property
    def added_mib(self) -> float:
        return (self.peak - self.base) / 2**20


def _load(method: Method, path: str, auto: type) -> tuple[nn.Module, dict[str, Any]]:
    with _PeakRSS() as rss:
        t0 = time.perf_counter()
        model = method.load(path, auto).eval()
        secs = time.perf_counter() - t0
    if method.family == "fp32":
        weights, bpw = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear)), 32.0
    else:
        weights, bits = quantized_size(model)
        bpw = bits / weights
    return model, {"method": method.name, "family": method.family, "bits_per_weight": bpw,
                   "quantized_weights": weights, "load_seconds": secs, "peak_load_mib": rss.added_mib,
                   "bytes_on_disk": _disk_bytes(model)}


# ----------------------------------------------------------------------------- the two models


def _token_stream(tokenizer: Any, corpus: str, n_tokens: int) -> torch.Tensor:
    from .data import text_dataset

    ids = tokenizer("\n\n".join(text_dataset(corpus)["text"]), return_tensors="pt").input_ids[0]
    if ids.numel() < n_tokens:
        raise ValueError(f"{corpus} has only {ids.numel()} tokens, {n_tokens} asked")
    return ids[:n_tokens]


def compare_smollm2(ms: list[Method], tokens: int, context: int, stride: int) -> list[dict]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .data import smollm2_path

    path = smollm2_path()
    tok = AutoTokenizer.from_pretrained(path)
    streams = {c: _token_stream(tok, c, tokens) for c in ("wikipedia", "austen")}
    rows = []
    for m in ms:
        logger.info("SmolLM2-135M: %s", m.name)
        model = None
        try:
            model, row = _load(m, path, AutoModelForCausalLM)
            for corpus, ids in streams.items():
                p = perplexity(model, ids, context, stride, progress=False)
                row[f"{corpus}_ppl"] = p.perplexity
                row.update(tokens=p.tokens_total, tokens_scored=p.tokens_scored, context=p.context, stride=p.stride)
        except Exception as e:  # one method that cannot run here must not sink the table
            logger.warning("%s failed on SmolLM2: %s", m.name, e)
            row = {"method": m.name, "family": m.family, "error": f"{type(e).__name__}: {e}"[:300]}
        rows.append({"model": SMOLLM2, **row})
        logger.info("%s", _short(rows[-1]))
        del model
    return rows


def probe_split(n_rows: int) -> tuple[list[int], list[int]]:
    """Fixed shuffled split of the movie-review snippets (seed 0): train and test indices."""
    order = random.Random(0).sample(range(n_rows), PROBE_TRAIN + PROBE_TEST)
    return order[:PROBE_TRAIN], order[PROBE_TRAIN:]


def compare_minilm(ms: list[Method]) -> list[dict]:
    from transformers import AutoModel, AutoTokenizer

    from .data import minilm_path, text_dataset
    from .metrics import load as load_metric

    path = minilm_path()
    tok = AutoTokenizer.from_pretrained(path)
    reviews = text_dataset("movie_reviews")
    train, test = probe_split(len(reviews))
    picked = reviews.select(train + test)
    sentences, labels = picked["text"], picked["label"]
    is_train = [True] * len(train) + [False] * len(test)
    cosine, probe = load_metric("embedding_cosine"), load_metric("probe_accuracy")
    ref = None
    rows = []
    for m in ms:
        logger.info("all-MiniLM-L6-v2: %s", m.name)
        try:
            model, row = _load(m, path, AutoModel)
            emb = mean_pooled_embeddings(model, tok, sentences)
            if ref is None:
                ref = mean_pooled_embeddings(AutoModel.from_pretrained(path).eval(), tok, sentences)
            row.update(cosine.compute(predictions=emb.tolist(), references=ref.tolist()))
            row.update(probe.compute(predictions=emb.tolist(), references=labels, is_train=is_train))
        except Exception as e:
            logger.warning("%s failed on MiniLM: %s", m.name, e)
            row = {"method": m.name, "family": m.family, "error": f"{type(e).__name__}: {e}"[:300]}
        rows.append({"model": MINILM, **row})
        logger.info("%s", _short(rows[-1]))
    return rows


def _short(row: dict) -> str:
    keys = ("bits_per_weight", "wikipedia_ppl", "austen_ppl", "cos_mean", "accuracy", "load_seconds", "error")
    return f"{row['method']}: " + ", ".join(f"{k}={row[k]:.4g}" if isinstance(row[k], float) else f"{k}={row[k]}"
                                           for k in keys if k in row)


# ----------------------------------------------------------------------------- report


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
    return out


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


def markdown(rows: list[dict], meta: dict) -> str:
    took = f" ({meta['wall_seconds'] / 60:.0f} minutes)" if "wall_seconds" in meta else ""
    lines = [f"`{meta['command']}` on {meta['machine']}, {meta['date']}{took}", ""]
    bpw: Callable[[dict], str] = lambda r: f"{r['bits_per_weight']:.3f}"  # noqa: E731
    lm = [r for r in rows if r["model"] == SMOLLM2]
    if lm:
        ok = next((r for r in lm if "context" in r), {})
        lines += [f"SmolLM2-135M-Instruct, perplexity over the first {ok.get('tokens')} tokens of each corpus "
                  f"(context {ok.get('context')}, stride {ok.get('stride')}). Its weights came as a Q4_1 GGUF "
                  "(4-bit grid, blocks of 32): rows at >= 4 bits favour group sizes dividing 32.", ""]
        lines += _table(lm, {"bits/weight": bpw, "Wikipedia ppl": lambda r: f"{r['wikipedia_ppl']:.2f}",
                             "Austen ppl": lambda r: f"{r['austen_ppl']:.2f}",
                             "load+quantize s": lambda r: f"{r['load_seconds']:.1f}",
                             "peak load MiB": lambda r: f"{r['peak_load_mib']:.0f}", "MiB on disk": _mib})
    enc = [r for r in rows if r["model"] == MINILM]
    if enc:
        lines += ["", f"all-MiniLM-L6-v2 on {PROBE_TRAIN + PROBE_TEST} movie-review snippets: embedding cosine to "
                      f"fp32, and sentiment accuracy of a logistic-regression probe ({PROBE_TRAIN} train / "
                      f"{PROBE_TEST} test, fixed split).", ""]
        lines += _table(enc, {"bits/weight": bpw, "cosine mean / min": lambda r: f"{r['cos_mean']:.4f} / {r['cos_min']:.4f}",
                              "probe accuracy": lambda r: f"{r['accuracy']:.3f}",
                              "load+quantize s": lambda r: f"{r['load_seconds']:.1f}", "MiB on disk": _mib})
    lines += ["", "Bits per weight: every tensor the quantized layers store; the baselines' floating-point "
                  "scales and zeros counted at 16 bits (their fp16 deployment). '-' on disk: the method has no "
                  "`save_pretrained` serialization here.", "", "Targets (issue #4):"] + targets(rows)
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], meta: dict, out: Path) -> None:
    """Quality against bits per weight, one line per method family (fp32 as a dashed level)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(SMOLLM2, "wikipedia_ppl", "SmolLM2-135M Wikipedia perplexity (log)", True),
              (SMOLLM2, "austen_ppl", "SmolLM2-135M Austen perplexity (log)", True),
              (MINILM, "cos_mean", "MiniLM embedding cosine to fp32", False),
              (MINILM, "accuracy", "MiniLM sentiment probe accuracy", False)]
    colors = {"RBE": "C0", "seed64": "C1", "HQQ": "C2", "quanto": "C3", "bitsandbytes": "C4"}
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
    fig.suptitle(f"hf-rbe compare, {meta['machine']}, {meta['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def run(models: list[str], families: list[str] | None, tokens: int, context: int, stride: int,
        out: str) -> dict[str, Any]:
    """Measure, then write ``out``.json/.md/.png; returns the JSON content."""
    ms = methods(families)
    t0 = time.perf_counter()
    rows: list[dict] = []
    if "smollm2" in models:
        # seed64's tile search takes ~2 min for MiniLM's 10.8M weights, ~25 min for SmolLM2's 106M:
        # its SmolLM2 row runs only when asked for by name (--families seed64)
        lm = [m for m in ms if m.family != "seed64" or (families and "seed64" in families)]
        rows += compare_smollm2(lm, tokens, context, stride)
    if "minilm" in models:
        rows += compare_minilm(ms)
    result = {"meta": {**run_meta(), "wall_seconds": round(time.perf_counter() - t0)}, "rows": rows,
              "targets": targets(rows)}
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".json").write_text(json.dumps(result, indent=2))
    render(path)
    return result


def render(out: str | Path) -> None:
    """Write ``out``.md and ``out``.png from the measurements in ``out``.json (nothing re-measured)."""
    path = Path(out)
    result = json.loads(path.with_suffix(".json").read_text())
    path.with_suffix(".md").write_text(markdown(result["rows"], result["meta"]))
    plot(result["rows"], result["meta"], path.with_suffix(".png"))
