"""Selective prediction: answer only when the calibrated confidence reaches a threshold.

The threshold is chosen on validation data so that the answered examples reach a target
precision; below it the classifier abstains (label `textgate.model.UNKNOWN_LABEL`). Feed these
functions calibrated probabilities (softmax of logits / temperature), the ones served.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class AbstentionPolicy:
    """The confidence threshold below which to abstain, and what it achieved where it was fitted.

    `precision` and `coverage` are measured on the data the threshold was chosen on: the
    precision of the answered examples (confidence >= threshold) and their share of all `n`.
    `reached` says whether `precision >= target_precision`.
    """

    threshold: float
    target_precision: float
    precision: float
    coverage: float
    n: int
    reached: bool

    def to_dict(self) -> dict[str, Any]:
        """Plain values for `training.json["abstention"]`."""
        return asdict(self)


def choose_threshold(
    probabilities: np.ndarray, y_true: Sequence[int] | np.ndarray, target_precision: float
) -> AbstentionPolicy:
    """The lowest confidence threshold whose answered examples reach `target_precision`.

    The candidates are the observed top-class confidences, so every candidate answers at least
    one example; the lowest one that qualifies answers the most. Precision is not monotonic in
    the threshold, so a higher threshold may fall below the target again: the lowest qualifying
    one is still returned. When no candidate reaches the target, the policy has
    `reached=False` and the threshold with the best precision (the lowest among equals), the
    closest the data allows; callers decide whether to use it.

    Args:
        probabilities: (n, n_classes) calibrated class probabilities.
        y_true: n true class indices.
        target_precision: in (0, 1].
    """
    if not 0 < target_precision <= 1:
        raise ValueError(f"target_precision must be in (0, 1], got {target_precision}")
    confidence, correct = _confidence_and_correct(probabilities, y_true)
    n = len(confidence)
    if n == 0:
        raise ValueError("cannot choose an abstention threshold: no examples")
    # Answered set for threshold t: the examples with confidence >= t. Sorting by descending
    # confidence makes each candidate's answered set a prefix; ties end at their last index.
    order = np.argsort(-confidence, kind="stable")
    sorted_confidence = confidence[order]
    answered = np.arange(1, n + 1)
    precision = np.cumsum(correct[order]) / answered
    last_of_ties = np.r_[sorted_confidence[1:] != sorted_confidence[:-1], True]
    candidates = np.flatnonzero(last_of_ties)  # descending thresholds
    qualifying = candidates[precision[candidates] >= target_precision]
    if len(qualifying):
        pick, reached = int(qualifying[-1]), True
    else:
        best = precision[candidates].max()
        pick, reached = int(candidates[precision[candidates] == best][-1]), False
    return AbstentionPolicy(
        threshold=float(sorted_confidence[pick]),
        target_precision=float(target_precision),
        precision=float(precision[pick]),
        coverage=float(answered[pick] / n),
        n=n,
        reached=reached,
    )


def selective_scores(
    probabilities: np.ndarray, y_true: Sequence[int] | np.ndarray, threshold: float
) -> dict[str, float | int]:
    """Precision and coverage of answering only when the top confidence is >= `threshold`.

    Returns:
        `precision` of the answered examples (0.0 when none is answered), `coverage` (their
        share of all examples) and `abstained` (the number of examples not answered).
    """
    confidence, correct = _confidence_and_correct(probabilities, y_true)
    if len(confidence) == 0:
        raise ValueError("cannot score selective prediction: no examples")
    answered = confidence >= threshold
    n_answered = int(answered.sum())
    precision = float(correct[answered].mean()) if n_answered else 0.0
    return {
        "precision": precision,
        "coverage": n_answered / len(confidence),
        "abstained": len(confidence) - n_answered,
    }


def _confidence_and_correct(
    probabilities: np.ndarray, y_true: Sequence[int] | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Top-class confidence and whether the top class is the true one, per example."""
    probs = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(y_true)
    if probs.ndim != 2:
        raise ValueError(f"probabilities must be 2-D (n, n_classes), got shape {probs.shape}")
    if labels.ndim != 1 or len(labels) != len(probs):
        raise ValueError(
            f"y_true must be 1-D with one label per row: got shape {labels.shape} "
            f"for {len(probs)} rows of probabilities"
        )
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"y_true must hold integer class indices, got dtype {labels.dtype}")
    if labels.size and not (labels.min() >= 0 and labels.max() < probs.shape[1]):
        raise ValueError(f"y_true has class indices outside [0, {probs.shape[1]})")
    if probs.shape[0] == 0:
        return np.zeros(0), np.zeros(0, dtype=bool)
    return probs.max(axis=1), probs.argmax(axis=1) == labels
