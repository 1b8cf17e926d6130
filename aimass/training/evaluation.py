"""A head's quality on held-out examples (training.proto's Evaluation), and its change from the previous version.

Predictions are the head's most probable label. Per-class precision, recall, F1 and support and the confusion
matrix cover every label of the head, in the head's order (a label without held-out examples has support 0 and,
where a ratio has no denominator, 0). Macro-F1 is the unweighted mean F1 over the labels that occur among the
held-out labels or the predictions (scikit-learn's default), so a class that was never held out nor predicted does
not count as a failure.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
from sklearn.metrics import (  # type: ignore[import-untyped]
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
)

from aimass.runtime.errors import InvalidArgument
from aimass.training.artifact import HeadArtifact
from aimass.v1 import training_pb2


def predict(head: HeadArtifact, features: npt.NDArray[np.float32]) -> list[str]:
    """The head's most probable label for each row of features (the first label in the head's order on a tie)."""
    best = np.argmax(head.logits(features), axis=1)
    return [head.labels[i] for i in best]


def evaluate(
    head: HeadArtifact, features: npt.NDArray[np.float32], labels: Sequence[str], *, train_rows: int
) -> training_pb2.Evaluation:
    """Accuracy, macro-F1, per-class metrics and the confusion matrix of ``head`` on held-out ``features`` whose true
    labels are ``labels``; ``train_rows`` is recorded beside the number of held-out rows."""
    features = np.asarray(features, dtype=np.float32)
    if features.ndim != 2 or features.shape[0] != len(labels):
        raise InvalidArgument(f"features of shape {features.shape} do not fit {len(labels)} held-out labels")
    if not labels:
        raise InvalidArgument("evaluation needs at least one held-out example")
    unknown = sorted(set(labels) - set(head.labels))
    if unknown:
        raise InvalidArgument(
            f"held-out labels {', '.join(map(repr, unknown[:5]))} are not among the head's labels "
            f"({', '.join(head.labels[:10])}{'...' if len(head.labels) > 10 else ''})"
        )
    truth = list(labels)
    predicted = predict(head, features)
    order = list(head.labels)
    precision, recall, f1, support = precision_recall_fscore_support(truth, predicted, labels=order, zero_division=0.0)
    matrix = confusion_matrix(truth, predicted, labels=order)
    return training_pb2.Evaluation(
        accuracy=float(accuracy_score(truth, predicted)),
        macro_f1=float(f1_score(truth, predicted, average="macro", zero_division=0.0)),
        per_class=[
            training_pb2.ClassMetrics(label=label, precision=float(p), recall=float(r), f1=float(f), support=int(s))
            for label, p, r, f, s in zip(order, precision, recall, f1, support, strict=True)
        ],
        labels=order,
        confusion=[int(count) for count in matrix.reshape(-1)],
        train_rows=train_rows,
        eval_rows=len(truth),
    )


def compare(
    evaluation: training_pb2.Evaluation, previous: training_pb2.Evaluation | None, previous_version: str
) -> None:
    """Records, in place, the previous version and this evaluation's gains over it (negative: worse); without a
    previous evaluation, clears them."""
    if previous is None:
        evaluation.previous_version = ""
        evaluation.accuracy_delta = 0.0
        evaluation.macro_f1_delta = 0.0
        return
    evaluation.previous_version = previous_version
    evaluation.accuracy_delta = evaluation.accuracy - previous.accuracy
    evaluation.macro_f1_delta = evaluation.macro_f1 - previous.macro_f1
