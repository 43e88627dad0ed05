"""textgate.artifacts: each stage's output paths come from params; its files keep their shape."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from tests.helpers import make_params
from textgate import artifacts
from textgate.errors import DataError
from textgate.io import write_json

# One payload per model, as its stage writes it (extras where the stage adds open-ended keys).
PAYLOADS: list[tuple[type[BaseModel], Any]] = [
    (
        artifacts.ValidationReport,
        {
            "success": True,
            "n_rows": 3,
            "n_test_rows": None,
            "labels": ["a", "b"],
            "label_source": "inferred",
            "class_counts": {"a": 2, "b": 1},
            "checks": [
                {"name": "texts_not_null", "success": True, "summary": "ok", "examples": []}
            ],
            "repairs": {"duplicates_dropped": 1},
        },
    ),
    (artifacts.LabelMap, {"labels": ["a", "b"]}),
    (
        artifacts.PrepareStats,
        {"splits": {"train": 2, "val": 1, "test": 1}, "train_file": {"pii_redacted": {}}},
    ),
    (
        artifacts.TrainMetrics,
        {"val_accuracy": 0.9, "val_macro_f1": 0.8, "best_epoch": 2, "temperature": 1.25},
    ),
    (
        artifacts.EvaluateMetrics,
        {
            "accuracy": 0.9,
            "macro_f1": 0.85,
            "n_test": 20,
            "ece": 0.02,
            "ece_uncalibrated": 0.05,
            "temperature": 1.25,
            "behaviour": {"casing": 1.0, "must_pass": None},
            "accuracy_fp32": 0.91,
        },
    ),
    (
        artifacts.PerClass,
        {"a": {"precision": 1.0, "recall": 0.5, "f1": 0.6667, "support": 2}},
    ),
    (
        artifacts.Behaviour,
        {"invariance": {"casing": {"rate": 1.0}}, "must_pass": {"rate": 1.0, "failures": []}},
    ),
]


@pytest.mark.parametrize(("model", "payload"), PAYLOADS, ids=[m.__name__ for m, _ in PAYLOADS])
def test_each_model_round_trips_its_file_byte_for_byte(
    tmp_path: Path, model: type[BaseModel], payload: Any
) -> None:
    path = tmp_path / "out.json"
    artifacts.write_artifact(model, path, payload)
    reference = tmp_path / "reference.json"
    write_json(reference, payload)
    assert path.read_bytes() == reference.read_bytes()  # what dvc.lock hashes is unchanged
    read = artifacts.read_artifact(model, path)
    assert read.model_dump(mode="json") == payload


def test_a_file_missing_a_required_field_names_the_file_and_the_field(tmp_path: Path) -> None:
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps({"accuracy": 0.9, "n_test": 3}), encoding="utf-8")
    with pytest.raises(DataError) as error:
        artifacts.read_artifact(artifacts.EvaluateMetrics, path)
    assert str(path) in str(error.value)
    assert "macro_f1: Field required" in str(error.value)


def test_a_bad_payload_is_not_written(tmp_path: Path) -> None:
    path = tmp_path / "per_class.json"
    with pytest.raises(DataError, match=r"a\.support"):
        artifacts.write_artifact(artifacts.PerClass, path, {"a": {"precision": 1.0}})
    assert not path.exists()


def test_paths_come_from_params(tmp_path: Path) -> None:
    params = make_params(
        {
            "validate": {"output_dir": str(tmp_path / "v")},
            "prepare": {"output_dir": str(tmp_path / "p")},
            "train": {"output_dir": str(tmp_path / "t")},
            "evaluate": {"output_dir": str(tmp_path / "e")},
        }
    )
    assert artifacts.validate_outputs(params).report == tmp_path / "v" / "report.json"
    assert artifacts.prepare_outputs(params).split("test") == tmp_path / "p" / "test.parquet"
    assert artifacts.prepare_outputs(params).label_map == tmp_path / "p" / "label_map.json"
    assert artifacts.train_outputs(params).model_dir == tmp_path / "t" / "model"
    assert artifacts.evaluate_outputs(params).golden == tmp_path / "e" / "golden.json"
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        artifacts.prepare_outputs(params).split("dev")


def test_verdicts_sit_next_to_the_registry_unless_placed_elsewhere(tmp_path: Path) -> None:
    registry = make_params({"registry": {"path": str(tmp_path / "r" / "registry.json")}}).registry
    assert artifacts.verdict_outputs(registry).latest == tmp_path / "r" / "verdicts" / "latest.json"
    moved = registry.model_copy(update={"verdicts_dir": tmp_path / "v"})
    outputs = artifacts.verdict_outputs(moved)
    when = datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=UTC)
    latest = artifacts.write_verdict(outputs, when, {"passed": True})
    assert latest == tmp_path / "v" / "latest.json"
    assert json.loads((tmp_path / "v" / "20260102T030405000006Z.json").read_text()) == {
        "passed": True
    }


def test_the_service_s_record_is_what_the_monitor_reads() -> None:
    record = artifacts.request_record(
        ts="2026-01-31T12:00:00.123+00:00",
        request_id="r-1",
        model_tag="textgate-classifier:v1",
        text="hello",
        label="unknown",
        best_label="refund",
        score=0.4,
        abstained=True,
    )
    assert list(record) == list(artifacts.RequestRecord.model_fields)
    assert artifacts.RequestRecord.model_validate(record).model_dump() == record
