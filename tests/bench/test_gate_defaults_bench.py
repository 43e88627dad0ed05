"""bench.gate_defaults: the table of checks per model."""

from __future__ import annotations

from bench.gate_defaults import format_table


def check(name, kind, value, passed, applied=True):
    return {"name": name, "kind": kind, "value": value, "passed": passed, "applied": applied}


def test_the_table_shows_each_check_per_model_and_sums_up_recalls():
    good = {
        "checks": [
            check("accuracy_floor", "floor", 0.95, True),
            check("recall[a]", "class_recall", 0.9, True),
            check("recall[b]", "class_recall", 0.8, True),
            check("champion", "champion", None, True, applied=False),
        ],
        "passed": True,
    }
    bad = {
        "checks": [
            check("accuracy_floor", "floor", 0.5, False),
            check("recall[a]", "class_recall", 0.2, False),
            check("recall[b]", "class_recall", 0.8, True),
        ],
        "passed": False,
    }
    table = format_table({"good": {"verdict": good}, "bad": {"verdict": bad}})
    lines = table.splitlines()
    assert lines[0].split() == ["check", "good", "bad"]
    assert lines[1].split() == ["recall[*]", "floors", "0/2", "fail", "1/2", "fail"]
    assert lines[2].split() == ["accuracy_floor", "0.9500", "0.5000", "FAIL"]
    assert "champion" not in table  # not applied
    assert lines[-1].split() == ["verdict", "pass", "REFUSED"]


def test_an_untrained_model_is_evaluated_and_refused(tiny_model_dir):
    from bench.gate_defaults import evaluate_and_gate
    from tests.conftest import make_rows
    from tests.helpers import REPO_ROOT
    from textgate.config import load_params

    rows = make_rows(per_class=12)
    result = evaluate_and_gate(
        tiny_model_dir,
        [text for text, _ in rows],
        [label for _, label in rows],
        load_params(REPO_ROOT / "params.yaml"),
    )
    assert set(result["metrics"]["behaviour"]) >= {"casing", "typos", "filler"}
    assert not result["verdict"]["passed"]  # about a third right: under every floor
    failed = {c["name"] for c in result["verdict"]["checks"] if not c["passed"]}
    assert "accuracy_floor" in failed
