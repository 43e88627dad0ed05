"""Choosing the abstention threshold, scoring selective prediction, abstaining predictions."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from textgate.abstain import AbstentionPolicy, choose_threshold, selective_scores
from textgate.errors import DataError
from textgate.model import (
    TRAINING_FILE,
    UNKNOWN_LABEL,
    Prediction,
    TextClassifier,
    make_predictions,
)


def _two_class(confidence: list[float], correct: list[bool]) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities whose top class is 0 with the given confidence; y = 0 where correct."""
    top = np.asarray(confidence)
    probabilities = np.stack([top, 1 - top], axis=1)
    return probabilities, np.where(correct, 0, 1)


# Precision of {confidence >= t}: 0.95 -> 1, 0.9 -> 1, 0.85 -> 1, 0.8 -> 3/4, 0.7 -> 4/5,
# 0.6 -> 4/6. Not monotonic: 0.8 misses a 0.8 target that the lower 0.7 reaches.
CONFIDENCE = [0.95, 0.9, 0.85, 0.8, 0.7, 0.6]
CORRECT = [True, True, True, False, True, False]


@pytest.mark.parametrize(
    ("target", "threshold", "precision", "coverage"),
    [(0.8, 0.7, 0.8, 5 / 6), (0.75, 0.7, 0.8, 5 / 6), (0.9, 0.85, 1.0, 0.5), (0.6, 0.6, 4 / 6, 1)],
)
def test_lowest_threshold_reaching_the_target(
    target: float, threshold: float, precision: float, coverage: float
) -> None:
    policy = choose_threshold(*_two_class(CONFIDENCE, CORRECT), target_precision=target)
    assert policy == AbstentionPolicy(
        threshold=pytest.approx(threshold),  # type: ignore[arg-type]
        target_precision=target,
        precision=pytest.approx(precision),  # type: ignore[arg-type]
        coverage=pytest.approx(coverage),  # type: ignore[arg-type]
        n=6,
        reached=True,
    )
    scores = selective_scores(*_two_class(CONFIDENCE, CORRECT), threshold=policy.threshold)
    assert scores["precision"] == pytest.approx(policy.precision)
    assert scores["coverage"] == pytest.approx(policy.coverage)


def test_ties_are_answered_or_abstained_together() -> None:
    # The two 0.8s (one right, one wrong) share a fate: precision at 0.8 is 2/3, not 1.
    policy = choose_threshold(*_two_class([0.9, 0.8, 0.8], [True, True, False]), 0.7)
    assert (policy.threshold, policy.coverage) == (0.9, pytest.approx(1 / 3))


def test_matches_a_brute_force_search_on_random_data() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        n, k = int(rng.integers(1, 60)), int(rng.integers(2, 5))
        probabilities = rng.dirichlet(np.ones(k), size=n).round(2)  # rounding makes ties
        y = rng.integers(0, k, size=n)
        target = float(rng.uniform(0.3, 1.0))
        confidence = probabilities.max(axis=1)
        correct = probabilities.argmax(axis=1) == y
        reaching = [t for t in confidence if correct[confidence >= t].mean() >= target]
        policy = choose_threshold(probabilities, y, target)
        assert policy.reached == bool(reaching)
        if reaching:
            assert policy.threshold == min(reaching)
            assert policy.precision >= target


def test_unreachable_target_reports_the_best_threshold() -> None:
    policy = choose_threshold(*_two_class([0.9, 0.8, 0.7], [False, True, False]), 0.9)
    assert not policy.reached
    assert (policy.threshold, policy.precision) == (0.8, 0.5)
    assert policy.to_dict() == {
        "threshold": 0.8,
        "target_precision": 0.9,
        "precision": 0.5,
        "coverage": pytest.approx(2 / 3),
        "n": 3,
        "reached": False,
    }
    json.dumps(policy.to_dict())  # plain values for training.json


def test_selective_scores_when_nothing_is_answered() -> None:
    scores = selective_scores(*_two_class([0.6, 0.7], [True, True]), threshold=0.95)
    assert scores == {"precision": 0.0, "coverage": 0.0, "abstained": 2}


@pytest.mark.parametrize(
    ("probabilities", "y_true", "target", "message"),
    [
        (np.full((2, 2), 0.5), [0, 1], 0.0, "target_precision must be in"),
        (np.full((2, 2), 0.5), [0, 1], 1.5, "target_precision must be in"),
        (np.full((2, 2), 0.5), [0], 0.9, "one label per row"),
        (np.full((2, 2), 0.5), [0, 2], 0.9, "outside"),
        (np.full((2, 2), 0.5), [0.0, 1.0], 0.9, "integer class indices"),
        (np.full(2, 0.5), [0, 1], 0.9, "2-D"),
        (np.zeros((0, 2)), [], 0.9, "no examples"),
    ],
)
def test_bad_inputs_are_refused(
    probabilities: np.ndarray, y_true: list, target: float, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        choose_threshold(probabilities, y_true, target)


def test_prediction_defaults_mean_no_abstention() -> None:
    prediction = Prediction(label="refund", score=0.7)
    assert (prediction.abstained, prediction.best_label) == (False, "refund")


@pytest.mark.parametrize(
    ("threshold", "labels"),
    [
        (None, ["a", "b"]),
        (0.0, ["a", "b"]),
        (0.6, ["a", UNKNOWN_LABEL]),
        (0.9, [UNKNOWN_LABEL] * 2),
    ],
)
def test_make_predictions_abstains_below_the_threshold(
    threshold: float | None, labels: list[str]
) -> None:
    probabilities = np.array([[0.8, 0.2], [0.45, 0.55]])
    predictions = make_predictions(probabilities, ["a", "b"], threshold)
    assert [p.label for p in predictions] == labels
    assert [p.best_label for p in predictions] == ["a", "b"]
    assert [p.score for p in predictions] == [0.8, 0.55]
    assert [p.abstained for p in predictions] == [label == UNKNOWN_LABEL for label in labels]


def _with_abstention(tiny_model_dir: Path, out: Path, abstention: object) -> Path:
    shutil.copytree(tiny_model_dir, out)
    training = json.loads((out / TRAINING_FILE).read_text(encoding="utf-8"))
    (out / TRAINING_FILE).write_text(
        json.dumps(training | {"abstention": abstention}), encoding="utf-8"
    )
    return out


def test_classifier_reads_the_threshold_from_its_metadata(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    # The untrained tiny model scores about 1/3 for every text.
    texts = ["my card was stolen", "refund please"]
    assert TextClassifier(tiny_model_dir).abstain_threshold is None
    predictions = TextClassifier(tiny_model_dir).predict(texts, batch_size=64)
    assert not any(p.abstained for p in predictions)
    model_dir = _with_abstention(tiny_model_dir, tmp_path / "model", {"threshold": 0.99})
    classifier = TextClassifier(model_dir)
    assert classifier.abstain_threshold == 0.99
    for prediction in classifier.predict(texts, batch_size=64):
        assert (prediction.label, prediction.abstained) == (UNKNOWN_LABEL, True)
        assert prediction.best_label in classifier.labels
        assert 0.3 < prediction.score < 0.99


@pytest.mark.parametrize("abstention", [{"threshold": 1.5}, {"threshold": "high"}])
def test_a_bad_threshold_in_metadata_is_a_data_error(
    tiny_model_dir: Path, tmp_path: Path, abstention: dict
) -> None:
    model_dir = _with_abstention(tiny_model_dir, tmp_path / "model", abstention)
    with pytest.raises(DataError, match="abstention.threshold must be"):
        TextClassifier(model_dir)
