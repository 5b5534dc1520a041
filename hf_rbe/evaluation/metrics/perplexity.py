"""Perplexity from summed negative log-likelihoods, as a local ``evaluate`` metric.

The model run stays in ``hf_rbe.eval.perplexity`` (sliding window); this metric only turns
what it scored into a number and states the conditions: add one row per window (or per
batch row) with the window's summed NLL in nats and the number of tokens it scored.
"""

import math

import datasets
import evaluate

_DESCRIPTION = "exp(sum of negative log-likelihoods / number of scored tokens), with context and stride stated."
_KWARGS = """
Args:
    predictions: summed negative log-likelihood (nats) of the tokens a window scored.
    references: number of tokens that window scored.
    context: window length in tokens (reported back).
    stride: how far the window moved (reported back).
Returns:
    perplexity, nll (mean per token), tokens_scored, context, stride.
Example:
    >>> m = load("perplexity")
    >>> m.compute(predictions=[2 * math.log(8)], references=[2], context=2, stride=2)["perplexity"]  # doctest: +SKIP
    8.0
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class Perplexity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("float64"),
                                        "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, context=None, stride=None):
        tokens = int(sum(references))
        if tokens <= 0:
            raise ValueError("no tokens were scored")
        if any(n < 0 for n in references) or not all(math.isfinite(x) for x in predictions):
            raise ValueError("token counts must be >= 0 and NLLs finite")
        nll = float(sum(predictions)) / tokens
        return {"perplexity": math.exp(nll), "nll": nll, "tokens_scored": tokens, "context": context, "stride": stride}
