"""Local ``evaluate`` metric modules, loaded by path so they work with no Hub access.

    perplexity          sliding-window perplexity of a causal LM
    embedding_cosine    cosine of sentence embeddings to a reference model's
    probe_accuracy      accuracy of a logistic-regression probe on embeddings

    from hf_rbe.evaluation.metrics import load
    ppl = load("perplexity")          # an evaluate.EvaluationModule

Each module file imports one name per line: evaluate's dependency scanner misreads
``import a, b``.
"""

from __future__ import annotations

from pathlib import Path

NAMES = ("perplexity", "embedding_cosine", "probe_accuracy")


def path(name: str) -> str:
    """File of the metric module ``name`` (for ``evaluate.load``)."""
    if name not in NAMES:
        raise ValueError(f"unknown metric {name!r}; choose from {NAMES}")
    return str(Path(__file__).parent / f"{name}.py")


def load(name: str):  # type: ignore[no-untyped-def]
    """``evaluate.load`` of a local metric module, in memory (no cache files, no Hub)."""
    import evaluate

    return evaluate.load(path(name), keep_in_memory=True)
