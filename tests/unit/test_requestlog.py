"""Reading the request log from a cursor: appends, partial lines, rotation, malformed lines."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from textgate.requestlog import LogCursor, read_window


def record(index: int, label: str = "refund", abstained: bool = False) -> dict:
    return {
        "ts": f"2026-01-01T00:00:{index % 60:02d}+00:00",
        "request_id": f"r{index}",
        "model_tag": "textgate-classifier:abc",
        "text": f"text number {index}",
        "label": "unknown" if abstained else label,
        "best_label": label,
        "score": 0.9,
        "abstained": abstained,
    }


def append(path: Path, lines: list[str | dict]) -> None:
    with path.open("a", encoding="utf-8") as handle:
        for line in lines:
            handle.write((json.dumps(line) if isinstance(line, dict) else line) + "\n")


def test_reads_everything_then_only_what_was_appended(tmp_path):
    log = tmp_path / "requests.jsonl"
    append(log, [record(i) for i in range(5)])
    window, cursor = read_window(log, None, sample_size=3)
    assert window.n == 5 and window.restart == "first read"
    assert window.label_counts == {"refund": 5}
    assert len(window.texts) == 3  # the sample is bounded
    assert cursor.offset == log.stat().st_size
    append(log, [record(5, "login", abstained=True), record(6, "login")])
    window, cursor = read_window(log, cursor, sample_size=10)
    assert window.n == 2 and window.restart is None
    assert window.label_counts == {"login": 2}
    assert window.abstained == 1 and window.abstention_rate == 0.5
    assert window.texts == ["text number 5", "text number 6"]
    window, _ = read_window(log, cursor, sample_size=10)
    assert window.n == 0


def test_a_line_being_written_is_left_for_the_next_read(tmp_path):
    log = tmp_path / "requests.jsonl"
    append(log, [record(0)])
    with log.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(record(1))[:20])  # no newline yet
    window, cursor = read_window(log, None, sample_size=10)
    assert window.n == 1 and window.malformed == 0
    with log.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(record(1))[20:] + "\n")
    window, _ = read_window(log, cursor, sample_size=10)
    assert window.n == 1 and window.malformed == 0 and window.texts == ["text number 1"]


def test_malformed_lines_are_skipped_counted_and_described(tmp_path):
    log = tmp_path / "requests.jsonl"
    bad_score = {**record(2), "score": 1.5}
    missing = {key: value for key, value in record(3).items() if key != "best_label"}
    append(log, [record(0), "{not json", "[1, 2]", bad_score, missing, "", record(1)])
    with log.open("ab") as handle:
        handle.write(b"\xff\xfe\n")
    window, _ = read_window(log, None, sample_size=10)
    assert window.n == 2
    assert window.malformed == 5
    reasons = " | ".join(window.malformed_examples)
    assert "not JSON" in reasons and "not a JSON object (list)" in reasons
    assert "score: Input should be less than or equal to 1" in reasons
    assert "best_label: Field required" in reasons
    assert window.malformed_examples[0].startswith("byte ")


def test_extra_fields_are_ignored(tmp_path):
    log = tmp_path / "requests.jsonl"
    append(log, [{**record(0), "latency_ms": 3}])
    assert read_window(log, None, sample_size=10)[0].n == 1


@pytest.mark.parametrize("how", ["truncated", "rotated", "rewritten"])
def test_rotation_truncation_and_rewrites_restart_from_the_top(tmp_path, how):
    log = tmp_path / "requests.jsonl"
    append(log, [record(i) for i in range(10)])
    _, cursor = read_window(log, None, sample_size=10)
    if how == "truncated":
        log.write_text("")
        append(log, [record(100), record(101)])
    elif how == "rotated":
        os.replace(log, tmp_path / "requests.jsonl.1")
        append(log, [record(100 + i) for i in range(20)])  # bigger than before: inode tells
    else:
        # Same size or bigger, same inode, different start: copytruncate, then refilled.
        with log.open("r+", encoding="utf-8") as handle:
            handle.truncate(0)
        append(log, [{**record(200 + i), "request_id": f"x{i}"} for i in range(12)])
    window, _ = read_window(log, cursor, sample_size=50)
    assert window.restart == how
    assert window.start_offset == 0
    assert all(int(text.split()[-1]) >= 100 for text in window.texts)


def test_a_growing_short_log_is_not_mistaken_for_a_rewrite(tmp_path):
    log = tmp_path / "requests.jsonl"
    append(log, [record(0)])  # shorter than the digest's 256 bytes
    _, cursor = read_window(log, None, sample_size=10)
    append(log, [record(i) for i in range(1, 6)])
    window, _ = read_window(log, cursor, sample_size=10)
    assert window.restart is None and window.n == 5


def test_cursor_round_trips_and_rejects_junk():
    cursor = LogCursor(path="/x", inode=3, offset=10, head_digest="ab")
    assert LogCursor.from_dict(cursor.to_dict()) == cursor
    assert LogCursor.from_dict({"path": "/x"}) is None
    assert LogCursor.from_dict("nonsense") is None


def test_a_missing_log_is_an_error_for_the_caller(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_window(tmp_path / "nope.jsonl", None, sample_size=10)
