"""Cosine similarity between sentence embeddings of a quantized model and its reference."""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Mean and minimum cosine similarity between paired embeddings (predictions vs references)."
_KWARGS = """
Args:
    predictions: embeddings from the model under test, one vector per sentence.
    references: embeddings of the same sentences from the reference model.
Returns:
    cos_mean, cos_min, sentences.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class EmbeddingCosine(evaluate.Metric):
    def _info(self):
        vec = datasets.Sequence(datasets.Value("float32"))
        return evaluate.MetricInfo(description=_DESCRIPTION, citation="", inputs_description=_KWARGS,
                                   features=datasets.Features({"predictions": vec, "references": vec}))

    def _compute(self, predictions, references):
        a = np.asarray(predictions, dtype=np.float64)
        b = np.asarray(references, dtype=np.float64)
        if a.shape != b.shape or a.ndim != 2:
            raise ValueError(f"need two [n, d] arrays of one shape, got {a.shape} and {b.shape}")
        norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
        if (norms == 0).any():
            raise ValueError("an embedding is all zeros: its cosine is undefined")
        cos = (a * b).sum(1) / norms
        return {"cos_mean": float(cos.mean()), "cos_min": float(cos.min()), "sentences": int(len(cos))}
