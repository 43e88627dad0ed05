"""textgate.shadow: the shadow checks over mirrored requests, each made to fail."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import make_params
from textgate.shadow import ShadowRecord, read_shadow_log, shadow_checks, summarise

CONFIG = make_params({}).shadow.model_copy(update={"min_requests": 10, "max_hours": 1.0})


def record(
    labels: list[str],
    theirs: list[str] | None = None,
    *,
    abstained: list[bool] | None = None,
    ms: float = 10.0,
    their_ms: float = 12.0,
    error: str | None = None,
) -> ShadowRecord:
    return ShadowRecord(
        ts="2026-01-01T00:00:00+00:00",
        production="textgate:a",
        candidate="textgate:b",
        production_ms=ms,
        candidate_ms=None if error else their_ms,
        production_labels=labels,
        production_abstained=[False] * len(labels),
        candidate_labels=None if error else (theirs or labels),
        candidate_abstained=None if error else (abstained or [False] * len(labels)),
        candidate_error=error,
    )


def failed(records: list[ShadowRecord], waited_hours: float = 0.0) -> set[str]:
    checks = shadow_checks(summarise(records), CONFIG, waited_hours)
    assert [check.kind for check in checks] == ["shadow"] * 5
    return {check.name for check in checks if not check.passed}


def test_a_twin_passes_every_shadow_check() -> None:
    assert failed([record(["refund", "login"]) for _ in range(10)]) == set()


def test_a_model_with_shuffled_labels_fails_agreement() -> None:
    records = [record(["refund", "login"], ["login", "refund"]) for _ in range(10)]
    assert failed(records) == {"shadow_agreement"}


def test_too_few_requests_is_not_enough_evidence_until_max_hours() -> None:
    records = [record(["refund"]) for _ in range(3)]
    assert failed(records) == {"shadow"}
    assert failed(records, waited_hours=CONFIG.max_hours) == set()
    assert "shadow" in failed([], waited_hours=CONFIG.max_hours)  # nothing: never enough


def test_more_abstentions_slower_answers_and_errors_each_fail() -> None:
    abstaining = [record(["refund"], ["unknown"], abstained=[True]) for _ in range(10)]
    assert "shadow_abstention" in failed(abstaining)
    slow = [record(["refund"], their_ms=10 * CONFIG.max_p95_latency_ratio + 1) for _ in range(10)]
    assert failed(slow) == {"shadow_p95_latency"}
    erring = [record(["refund"]) for _ in range(9)] + [record(["refund"], error="HTTP 500")]
    assert failed(erring) == {"shadow_errors"}


def test_the_log_keeps_only_the_candidate_and_skips_a_torn_line(tmp_path: Path) -> None:
    path = tmp_path / "shadow.jsonl"
    ours, other = record(["refund"]), record(["login"]).model_copy(update={"candidate": "x:1"})
    lines = [ours.model_dump_json(), other.model_dump_json(), json.dumps({"ts": "cut"})[:8]]
    path.write_text("\n".join(lines) + "\n")
    assert read_shadow_log(path, "textgate:b") == [ours]
    assert read_shadow_log(tmp_path / "none.jsonl", "textgate:b") == []


@pytest.mark.parametrize("field", ["min_agreement", "max_error_rate"])
def test_rates_outside_0_1_are_refused(field: str) -> None:
    from textgate.config import ShadowConfig

    with pytest.raises(ValueError, match=field):
        ShadowConfig.model_validate({**CONFIG.model_dump(), field: 1.5})
