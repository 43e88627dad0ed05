"""Classification metrics computed the same way for validation, evaluation and gating."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
)


class ClassScores(BaseModel):
    model_config = ConfigDict(frozen=True)

    precision: float
    recall: float
    f1: float
    support: int


class Metrics(BaseModel):
    """Accuracy, macro-F1, per-class scores and the confusion matrix (rows = actual)."""

    model_config = ConfigDict(frozen=True)

    accuracy: float
    macro_f1: float
    n: int
    per_class: dict[str, ClassScores]
    labels: list[str]
    confusion: list[list[int]]


def compute_metrics(
    y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray, labels: Sequence[str]
) -> Metrics:
    """Score predicted class indices against true ones over the full label set."""
    index = list(range(len(labels)))
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=index, zero_division=0
    )
    return Metrics(
        accuracy=float(accuracy_score(y_true, y_pred)),
        macro_f1=float(f1_score(y_true, y_pred, labels=index, average="macro", zero_division=0)),
        n=len(y_true),
        per_class={
            label: ClassScores(
                precision=float(precision[i]),
                recall=float(recall[i]),
                f1=float(f1[i]),
                support=int(support[i]),
            )
            for i, label in enumerate(labels)
        },
        labels=list(labels),
        confusion=confusion_matrix(y_true, y_pred, labels=index).tolist(),
    )
