"""Accuracy of a logistic-regression probe trained on frozen embeddings.

A fixed split (``is_train``) and a fixed solver make the number depend only on the
embeddings: a quantized encoder that keeps the information the labels need scores like the
unquantized one.
"""

import datasets
import evaluate
import numpy as np
from sklearn.linear_model import LogisticRegression

_DESCRIPTION = "Test accuracy of an L2-regularised logistic regression fitted on the training rows."
_KWARGS = """
Args:
    predictions: embedding vectors, one per example.
    references: integer class labels.
    is_train: one bool per example; True rows fit the probe, False rows score it.
    C: inverse regularisation strength (default 1.0).
Returns:
    accuracy, train_examples, test_examples.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class ProbeAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation="", inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Sequence(datasets.Value("float32")),
                                        "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, is_train=None, C=1.0):
        x = np.asarray(predictions, dtype=np.float64)
        y = np.asarray(references)
        if is_train is None or len(is_train) != len(y):
            raise ValueError("is_train must give one bool per example")
        train = np.asarray(is_train, dtype=bool)
        if train.all() or not train.any():
            raise ValueError("need both training and test rows")
        if len(np.unique(y[train])) < 2:
            raise ValueError("the training rows hold a single class")
        probe = LogisticRegression(C=C, max_iter=2000)
        probe.fit(x[train], y[train])
        acc = float((probe.predict(x[~train]) == y[~train]).mean())
        return {"accuracy": acc, "train_examples": int(train.sum()), "test_examples": int((~train).sum())}
