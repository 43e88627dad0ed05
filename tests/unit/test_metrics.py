"""compute_metrics against a reference computed with numpy from the confusion counts."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from textgate.metrics import Metrics, compute_metrics

LABELS = ["lost_card", "login", "refund"]


def reference(y_true: list[int], y_pred: list[int], n_labels: int) -> dict:
    """Accuracy, confusion, per-class scores and macro-F1 from first principles."""
    confusion = np.zeros((n_labels, n_labels), dtype=int)
    np.add.at(confusion, (y_true, y_pred), 1)  # rows = actual, columns = predicted
    hits = np.diag(confusion).astype(float)
    predicted, actual = confusion.sum(axis=0), confusion.sum(axis=1)
    precision = np.divide(hits, predicted, out=np.zeros(n_labels), where=predicted > 0)
    recall = np.divide(hits, actual, out=np.zeros(n_labels), where=actual > 0)
    both = precision + recall
    f1 = np.divide(2 * precision * recall, both, out=np.zeros(n_labels), where=both > 0)
    return {
        "accuracy": hits.sum() / len(y_true),
        "confusion": confusion.tolist(),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "support": actual,
        "macro_f1": f1.mean(),  # over every label, those never seen included
    }


CASES = {
    "perfect": ([0, 1, 2, 2], [0, 1, 2, 2]),
    "all_wrong": ([0, 1, 2], [1, 2, 0]),
    "mixed": ([0, 0, 1, 1, 2, 2, 2], [0, 1, 1, 1, 2, 0, 2]),
    "a_class_never_predicted": ([0, 1, 2, 2], [0, 1, 1, 0]),
    "a_class_never_seen": ([0, 0, 1], [0, 1, 1]),
    "one_example": ([2], [2]),
}


@pytest.mark.parametrize(("y_true", "y_pred"), list(CASES.values()), ids=list(CASES))
@pytest.mark.parametrize("as_array", [False, True], ids=["lists", "arrays"])
def test_metrics_match_the_reference(y_true, y_pred, as_array):
    expected = reference(y_true, y_pred, len(LABELS))
    if as_array:
        y_true, y_pred = np.array(y_true), np.array(y_pred)
    metrics = compute_metrics(y_true, y_pred, LABELS)
    assert metrics.n == len(y_true)
    assert metrics.labels == LABELS
    assert metrics.accuracy == pytest.approx(expected["accuracy"])
    assert metrics.macro_f1 == pytest.approx(expected["macro_f1"])
    assert metrics.confusion == expected["confusion"]
    assert list(metrics.per_class) == LABELS  # in label order
    for i, label in enumerate(LABELS):
        scores = metrics.per_class[label]
        assert scores.precision == pytest.approx(expected["precision"][i]), label
        assert scores.recall == pytest.approx(expected["recall"][i]), label
        assert scores.f1 == pytest.approx(expected["f1"][i]), label
        assert scores.support == expected["support"][i], label


def test_an_unseen_class_scores_zero_and_pulls_the_macro_f1_down():
    metrics = compute_metrics([0, 1], [0, 1], LABELS)
    assert metrics.accuracy == 1.0
    assert metrics.per_class["refund"].model_dump() == {
        "precision": 0.0,
        "recall": 0.0,
        "f1": 0.0,
        "support": 0,
    }
    assert metrics.macro_f1 == pytest.approx(2 / 3)
    assert metrics.confusion[2] == [0, 0, 0] and [row[2] for row in metrics.confusion] == [0, 0, 0]


def test_metrics_are_plain_json_and_frozen():
    metrics = compute_metrics(np.array([0, 1, 2]), np.array([0, 2, 2]), LABELS)
    dumped = metrics.model_dump(mode="json")
    assert Metrics.model_validate(dumped) == metrics  # round-trips through JSON types
    assert all(type(value) is int for row in dumped["confusion"] for value in row)
    with pytest.raises(ValidationError):
        metrics.accuracy = 1.0  # type: ignore[misc]


@pytest.mark.parametrize(
    ("y_true", "y_pred", "message"),
    [
        ([], [], "empty"),
        ([0, 1], [0], "inconsistent numbers of samples"),
    ],
    ids=["empty", "lengths_differ"],
)
def test_bad_inputs_raise_a_value_error(y_true, y_pred, message):
    with pytest.raises(ValueError, match=message):
        compute_metrics(y_true, y_pred, LABELS)
