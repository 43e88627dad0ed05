"""tasks.gate against a production model: new data, per-intent and behaviour non-regression."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from tasks import gate as gate_task
from textgate import artifacts
from textgate.registry import Release

LABELS = ["a", "b"]


def inputs(predicted: list[str]) -> gate_task.GateInputs:
    truth = ["a"] * 20 + ["b"] * 20
    scores = {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 20}
    return gate_task.GateInputs(
        metrics=artifacts.EvaluateMetrics(
            accuracy=0.9,
            macro_f1=0.9,
            n_test=40,
            ece=0.01,
            ece_uncalibrated=0.02,
            temperature=1.0,
            behaviour={"typos": 0.9},
        ),
        per_class=artifacts.PerClass({label: scores for label in LABELS}),
        texts=[f"text {i}" for i in range(40)],
        labels=truth,
        predicted=predicted,
    )


def production() -> Release:
    return Release(
        bento_tag="textgate:1",
        model_tag="textgate-classifier:1",
        promoted_at=datetime.now(UTC),
        promoted_by="test",
        reason="test",
        metrics={"behaviour": {"typos": 0.95}},
        lineage={"model_md5": "old"},
    )


def patch_production(monkeypatch, labels: list[str], known: list[str]) -> None:
    scores = gate_task.ChampionScores(labels=labels, seen=set(), known=known)
    monkeypatch.setattr(gate_task, "score_production", lambda *args: scores)


def test_production_trained_on_other_labels_makes_a_first_release_on_new_data(monkeypatch):
    patch_production(monkeypatch, ["a"] * 40, known=["a", "c"])
    comparison = gate_task.compare_with_production(
        inputs(["a"] * 40), production(), "new", 64, lambda _: None
    )
    assert comparison.champion is None and comparison.error is None
    assert (
        "trained on other labels" in comparison.new_data and "1 new, 1 gone" in comparison.new_data
    )


def test_production_on_the_same_labels_is_compared_with_its_behaviour(monkeypatch):
    truth = ["a"] * 20 + ["b"] * 20
    patch_production(monkeypatch, truth, known=LABELS)
    comparison = gate_task.compare_with_production(
        inputs(truth), production(), "new", 64, lambda _: None
    )
    assert comparison.champion == truth and comparison.new_data is None
    assert comparison.behaviour == {"typos": 0.95}


@pytest.mark.parametrize(("candidate_b", "passed"), [(20, True), (15, False)])
def test_the_decision_judges_intent_recall_and_behaviour_against_production(
    monkeypatch, tmp_path, candidate_b, passed
):
    from tests.helpers import make_params, tiny_overrides

    truth = ["a"] * 20 + ["b"] * 20
    patch_production(monkeypatch, truth, known=LABELS)
    monkeypatch.setattr(gate_task.Registry, "production", lambda self: production(), raising=True)
    predicted = ["a"] * 20 + ["b"] * candidate_b + ["a"] * (20 - candidate_b)
    params = make_params(tiny_overrides(tmp_path, tmp_path))
    verdict = gate_task.decide(params, inputs(predicted), "new", lambda _: None)
    by_name = {c.name: c for c in verdict.checks}
    assert by_name["recall_vs_production[b]"].passed is passed
    typos = by_name["behaviour[typos]"]  # 0.90 against production's 0.95 - 0.03
    assert not typos.passed and typos.threshold == pytest.approx(0.92)
