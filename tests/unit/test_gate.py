import pytest

from textgate.config import GateConfig
from textgate.gate import evaluate_gate

FLOORS = GateConfig(min_accuracy=0.8, min_macro_f1=0.75)


def test_gate_passes_when_every_metric_meets_its_floor():
    verdict = evaluate_gate({"accuracy": 0.8, "macro_f1": 0.9}, FLOORS)
    assert verdict.passed
    assert [(c.name, c.value, c.threshold, c.passed) for c in verdict.checks] == [
        ("accuracy_floor", 0.8, 0.8, True),
        ("macro_f1_floor", 0.9, 0.75, True),
    ]
    assert verdict.summary().startswith("gate PASSED")


@pytest.mark.parametrize(
    ("metrics", "failing"),
    [
        ({"accuracy": 0.79, "macro_f1": 0.9}, ["accuracy_floor"]),
        ({"accuracy": 0.9, "macro_f1": 0.7}, ["macro_f1_floor"]),
        ({"accuracy": 0.1, "macro_f1": 0.1}, ["accuracy_floor", "macro_f1_floor"]),
        ({"accuracy": 0.9}, ["macro_f1_floor"]),
        ({"accuracy": float("nan"), "macro_f1": 0.9}, ["accuracy_floor"]),
        ({"accuracy": "0.9", "macro_f1": 0.9}, ["accuracy_floor"]),
    ],
)
def test_gate_fails_and_names_each_failed_check(metrics, failing):
    verdict = evaluate_gate(metrics, FLOORS)
    assert not verdict.passed
    assert [check.name for check in verdict.failed] == failing
    summary = verdict.summary()
    assert summary.startswith(f"gate FAILED ({len(failing)} check(s))")
    assert len(summary.splitlines()) == 3  # every check is listed, passed or not
    markdown = verdict.to_markdown()
    assert markdown.count("**FAIL**") == len(failing)


def test_failed_check_reason_gives_value_and_threshold():
    verdict = evaluate_gate({"accuracy": 0.5, "macro_f1": 0.9}, FLOORS)
    assert verdict.failed[0].reason == "accuracy 0.5000 < floor 0.8000"
