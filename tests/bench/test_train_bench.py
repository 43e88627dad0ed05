"""The training benchmark's pieces: the stratified subset, the time to reach an accuracy, the
scores, the targets and the report, and textgate's side on tiny synthetic data with the tiny
model (no MiniLM, no Trainer run, nothing from outside the repository)."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from bench import train as bench
from tests.conftest import make_rows, write_csv


@pytest.mark.parametrize("size", [3, 10, 37, 60, 99])
def test_stratified_subset_keeps_each_labels_share(size):
    labels = ["a"] * 50 + ["b"] * 30 + ["c"] * 15 + ["d"] * 5
    index = bench.stratified_subset(labels, size, seed=0)
    assert len(index) == size == len(set(index.tolist()))
    assert np.all(np.diff(index) > 0) and index.max() < len(labels)
    counts = Counter(labels[i] for i in index)
    if size >= 4:
        assert set(counts) == {"a", "b", "c", "d"}  # every label kept
        total = Counter(labels)
        for label, count in counts.items():  # proportional, up to the one-each floor
            share = 1 + (size - 4) * (total[label] - 1) / (len(labels) - 4)
            assert abs(count - share) < 1, (label, count, share)
    else:
        assert sum(counts.values()) == size and max(counts.values()) == 1


def test_stratified_subset_is_seeded_and_whole_when_large():
    labels = [str(i % 7) for i in range(200)]
    first = bench.stratified_subset(labels, 50, seed=1)
    assert first.tolist() == bench.stratified_subset(labels, 50, seed=1).tolist()
    assert first.tolist() != bench.stratified_subset(labels, 50, seed=2).tolist()
    assert bench.stratified_subset(labels, 500, seed=1).tolist() == list(range(200))


def test_time_to_reach_is_the_first_point_at_the_accuracy():
    points = [
        {"seconds": 30.0, "step": 3, "test_accuracy": 0.91},
        {"seconds": 10.0, "step": 1, "test_accuracy": 0.70},
        {"seconds": 20.0, "step": 2, "test_accuracy": 0.90},
        {"seconds": 40.0, "step": 4, "test_accuracy": 0.95},
    ]
    assert bench.time_to_reach(points, 0.90)["step"] == 2
    assert bench.time_to_reach(points, 0.9000000000001)["step"] == 2  # float noise
    assert bench.time_to_reach(points, 0.92)["seconds"] == 40.0
    assert bench.time_to_reach(points, 0.99) is None
    assert bench.time_to_reach([], 0.5) is None


def test_scores_leave_out_of_scope_examples_from_in_scope_accuracy():
    labels = ["book", "oos", "weather"]
    y_true = [0, 0, 2, 1, 1]
    y_pred = [0, 2, 2, 1, 0]
    scores = bench.score(y_true, y_pred, labels, "oos")
    assert scores["accuracy"] == pytest.approx(3 / 5)
    assert scores["in_scope_accuracy"] == pytest.approx(2 / 3)
    assert bench.score(y_true, y_pred, ["a", "b", "c"], "oos")["in_scope_accuracy"] is None


def side(seconds, accuracy, in_scope=None, points=(), oos_recall=None):
    return {
        "seconds": seconds,
        "hook_seconds": 1.5,
        "samples_per_second": 100.0,
        "optimizer_steps": 30,
        "epochs": 3,
        "test": {
            "accuracy": accuracy,
            "macro_f1": accuracy - 0.01,
            "in_scope_accuracy": in_scope,
            "oos_recall": oos_recall,
        },
        "points": list(points),
        "peak_memory_mb": 500.0,
    }


def test_report_has_a_table_targets_and_a_json_last_line():
    points = [
        {"seconds": 5.0, "step": 10, "epoch": 1, "test_accuracy": 0.80},
        {"seconds": 20.0, "step": 20, "epoch": 1, "test_accuracy": 0.93},
        {"seconds": 40.0, "step": 30, "epoch": 2, "test_accuracy": 0.97},
    ]
    report = bench.build_report(
        side(120.0, 0.92, in_scope=0.95),
        side(45.0, 0.97, in_scope=0.965, points=points, oos_recall=0.72),
        {},
        {},
    )
    assert report["time_to_reach_baseline_s"] == 20.0 and report["speedup"] == 6.0
    assert report["targets"]["passed"]
    assert report["targets"]["accuracy"] == {
        "value": 0.965,
        "threshold": 0.96,
        "passed": True,
        "measure": "in-scope test accuracy (as served)",
    }
    assert report["targets"]["oos_recall"] == {"value": 0.72, "threshold": 0.7, "passed": True}
    text = bench.format_report(report)
    assert "in-scope accuracy" in text and "out-of-scope recall" in text
    assert "reached the baseline's test accuracy 0.9200 after 20.0 s (step 20, epoch 1" in text
    assert "[pass] baseline time / textgate time to reach it: 6.00x (target >= 3.0x)" in text
    assert "[pass] textgate in-scope test accuracy (as served): 0.9650 (target >= 0.96)" in text
    assert "[pass] textgate out-of-scope recall (as served): 0.7200 (target >= 0.70)" in text
    assert text.endswith("all targets met: yes")
    line = json.loads(bench.json_line(report))
    assert line["speedup"] == 6.0
    assert line["textgate"]["test"]["in_scope_accuracy"] == 0.965
    assert line["textgate"]["test"]["oos_recall"] == 0.72


def test_an_out_of_scope_recall_under_its_target_fails():
    report = bench.build_report(None, side(45.0, 0.97, in_scope=0.97, oos_recall=0.6), {}, {})
    assert not report["targets"]["passed"] and "speedup" not in report["targets"]
    text = bench.format_report(report)
    assert "[FAIL] textgate out-of-scope recall (as served): 0.6000 (target >= 0.70)" in text


def test_targets_fail_when_textgate_never_reaches_the_baseline():
    points = [{"seconds": 5.0, "step": 10, "epoch": 1, "test_accuracy": 0.80}]
    report = bench.build_report(side(100.0, 0.9), side(30.0, 0.85, points=points), {}, {})
    assert report["time_to_reach_baseline_s"] is None and math.isnan(report["speedup"])
    assert not report["targets"]["passed"]
    text = bench.format_report(report)
    assert "never reached the baseline's test accuracy 0.9000" in text
    assert "[FAIL] baseline time / textgate time to reach it: n/a" in text
    assert "[FAIL] textgate test accuracy: 0.8500 (target >= 0.95)" in text
    assert "in-scope" not in text  # no out-of-scope label in this data
    assert json.loads(bench.json_line(report))["speedup"] is None  # NaN is not JSON


def test_a_run_without_the_baseline_reports_textgate_alone():
    report = bench.build_report(None, side(30.0, 0.97), {}, {})
    assert report["baseline"] is None and report["speedup"] is None
    assert report["targets"]["passed"] and set(report["targets"]) == {"accuracy", "passed"}
    text = bench.format_report(report)
    assert "never reached" not in text and "baseline time" not in text


def test_served_scores_count_unknown_answers_as_the_out_of_scope_label():
    labels = ["book", "oos", "weather"]
    y_true = [0, 1, 1, 2]
    logits = np.array([[3.0, 0, 0], [3.0, 0, 0], [0, 3.0, 0], [0, 0, 3.0]])
    unknown = np.array([False, True, False, True])  # row 2: the argmax is oos
    scores = np.array([0.1, 0.9, 0.2, 0.8])
    figures = bench.served(y_true, logits, unknown, scores, labels, "oos")
    assert figures["accuracy"] == pytest.approx(3 / 4)  # the last row answered "unknown"
    assert figures["in_scope_accuracy"] == pytest.approx(1 / 2)
    assert figures["oos_recall"] == pytest.approx(1 / 2)  # only the argmax-less one is unknown


@pytest.fixture
def tiny_data(tmp_path) -> Path:
    rows = make_rows(per_class=16)
    write_csv(tmp_path / "train.csv", rows[::2] + [(f"nothing here {i}", "oos") for i in range(4)])
    write_csv(tmp_path / "val.csv", rows[1::4] + [(f"blah {i}", "oos") for i in range(2)])
    write_csv(tmp_path / "test.csv", rows[3::4] + [(f"whatever {i}", "oos") for i in range(2)])
    return tmp_path


def test_options_round_trip_through_the_worker_command_line(tiny_data):
    options, _ = bench.parse_args(
        ["--data", str(tiny_data), "--max-train", "20", "--seed", "3", "--base-model", "x"]
        + ["--skip-baseline", "--keep-model", "/tmp/m"]
    )
    again, _ = bench.parse_args(bench.to_argv(options))
    assert again == options


def test_data_is_loaded_with_subsets_and_checked(tiny_data):
    options, _ = bench.parse_args(["--data", str(tiny_data), "--max-train", "12"])
    labels, splits = bench.load_data(options, seed=0)
    assert labels == ["login", "lost_card", "oos", "refund"]
    assert len(splits["train"].texts) == 12 and set(splits["train"].labels) == set(labels)
    write_csv(tiny_data / "test.csv", [("hello", "unheard_of")])
    with pytest.raises(bench.BenchError, match="labels the training split lacks"):
        bench.load_data(options, seed=0)
    (tiny_data / "val.csv").unlink()
    with pytest.raises(bench.BenchError, match="missing .*val.csv"):
        bench.load_data(options, seed=0)


@pytest.mark.slow  # trains the tiny model
def test_textgate_side_records_test_accuracy_at_each_validation(tiny_data, tiny_base_model):
    options, _ = bench.parse_args(
        ["--data", str(tiny_data), "--base-model", str(tiny_base_model), "--seed", "0"]
    )
    result = bench.run_textgate(options)
    points = result["points"]
    assert len(points) >= 2 and [p["step"] for p in points] == sorted(p["step"] for p in points)
    assert all(
        0 <= p["test_accuracy"] <= 1 and p["test_in_scope_accuracy"] is not None for p in points
    )
    assert points[-1]["seconds"] <= result["seconds"]
    assert result["hook_seconds"] > 0 and result["optimizer_steps"] >= points[-1]["step"]
    assert result["train_config"]["base_model"] == str(tiny_base_model)
    # Abstention as served, and every unknown-score method thresholded on val.
    assert result["served_runtime"] == "onnx-int8"
    assert set(result["test"]) >= {"in_scope_accuracy", "oos_recall", "unknown_auroc", "coverage"}
    assert set(result["methods"]) == {"msp", "energy", "mahalanobis", "mahalanobis+energy"}


@pytest.mark.slow  # trains the tiny model
def test_baseline_side_fine_tunes_with_trainer(tiny_data, tiny_base_model):
    options, _ = bench.parse_args(
        ["--data", str(tiny_data), "--base-model", str(tiny_base_model), "--seed", "0"]
    )
    result = bench.run_baseline(options)
    assert result["optimizer_steps"] == 3 * math.ceil(28 / 32)  # batch 32, 3 epochs
    assert 0 <= result["test"]["accuracy"] <= 1 and result["seconds"] > 0
    assert result["test"]["in_scope_accuracy"] is not None
    assert result["test_thresholded"]["oos_recall"] is not None  # the softmax threshold on val
