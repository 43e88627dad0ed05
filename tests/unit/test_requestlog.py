"""The request log: written owner-only with size rotation (also by several processes at once),
read from a cursor: appends, partial lines, rotations, malformed lines."""

from __future__ import annotations

import json
import multiprocessing
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from textgate.requestlog import (
    LogCursor,
    RequestLogWriter,
    backup_path,
    lock_path,
    read_window,
)

# Keeps every text of a window, in order (the reservoir only samples beyond this).
ALL = 1_000_000


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
def test_rotation_away_truncation_and_rewrites_restart_from_the_top(tmp_path, how):
    log = tmp_path / "requests.jsonl"
    append(log, [record(i) for i in range(10)])
    _, cursor = read_window(log, None, sample_size=10)
    if how == "truncated":
        log.write_text("")
        append(log, [record(100), record(101)])
    elif how == "rotated":
        # Moved out of the backups' names (or rotated out of them): its lines cannot be found.
        os.replace(log, tmp_path / "elsewhere.jsonl")
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


# Writing: permissions, rotation, several processes.


def lines(first: int, count: int) -> str:
    return "".join(json.dumps(record(i)) + "\n" for i in range(first, first + count))


def numbers(path: Path) -> list[int]:
    """The record numbers in one file of the log, in order."""
    return [int(json.loads(line)["request_id"][1:]) for line in path.read_text().splitlines()]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask() -> Iterator[None]:
    previous = os.umask(0o022)  # the usual one, under which files are created 0644
    yield
    os.umask(previous)


@pytest.mark.usefixtures("umask")
def test_the_log_its_backups_and_new_directories_are_owner_only(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    log = shared / "home" / "textgate" / "requests.jsonl"
    writer = RequestLogWriter(log, max_bytes=400, backups=2)
    for batch in range(5):
        writer.write(lines(batch * 2, 2))
    writer.close()
    assert backup_path(log, 2).exists()  # it rotated
    for path in (log, backup_path(log, 1), backup_path(log, 2), lock_path(log)):
        assert mode(path) == 0o600, path
    assert mode(log.parent) == 0o700 and mode(log.parent.parent) == 0o700
    assert mode(shared) == 0o755  # a directory that was there is left as it was


def test_a_narrow_umask_or_a_log_from_before_is_made_0600_too(tmp_path):
    log = tmp_path / "requests.jsonl"
    append(log, [record(0)])
    log.chmod(0o644)  # as the service wrote it before
    previous = os.umask(0o277)  # would create files 0400 and directories 0500
    try:
        writer = RequestLogWriter(log, max_bytes=10_000, backups=1)
        writer.write(lines(1, 1))
        writer.close()
        RequestLogWriter(tmp_path / "new" / "requests.jsonl", max_bytes=10_000, backups=1).write(
            lines(2, 1)
        )
    finally:
        os.umask(previous)
    assert mode(log) == 0o600 and numbers(log) == [0, 1]
    assert mode(tmp_path / "new") == 0o700 and mode(tmp_path / "new" / "requests.jsonl") == 0o600


def test_rotation_happens_at_the_size_limit_and_keeps_the_last_backups(tmp_path):
    log = tmp_path / "requests.jsonl"
    line_bytes = len(lines(10, 1))
    writer = RequestLogWriter(log, max_bytes=5 * line_bytes + 1, backups=3)  # 5 lines a file
    for first in range(10, 60, 2):  # 25 batches of 2 lines: 50 lines, 10 files' worth
        writer.write(lines(first, 2))
    writer.close()
    files = [backup_path(log, 3), backup_path(log, 2), backup_path(log, 1), log]
    assert not backup_path(log, 4).exists()
    assert all(path.stat().st_size <= 5 * line_bytes + 1 for path in files)
    kept = [number for path in files for number in numbers(path)]
    # The newest lines, in order, none lost in between; batches are never split.
    assert kept == list(range(60 - len(kept), 60)) and len(kept) >= 3 * 4
    assert all(len(numbers(path)) % 2 == 0 for path in files)


def test_a_writer_reopens_a_log_another_process_rotated(tmp_path):
    log = tmp_path / "requests.jsonl"
    first = RequestLogWriter(log, max_bytes=10_000, backups=2)
    first.write(lines(0, 1))
    os.replace(log, backup_path(log, 1))  # what another worker's rotation does
    first.write(lines(1, 1))
    first.close()
    assert numbers(backup_path(log, 1)) == [0] and numbers(log) == [1]


def _write_batches(path: str, worker: int, batches: int) -> None:
    writer = RequestLogWriter(Path(path), max_bytes=2_000, backups=1_000)
    for batch in range(batches):
        writer.write(lines(worker * 10_000 + batch * 3, 3))
    writer.close()


def test_processes_writing_one_log_lose_no_line_and_rotate_each_file_once(tmp_path):
    log = tmp_path / "requests.jsonl"
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_write_batches, args=(str(log), w, 60)) for w in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    files = [log, *sorted(tmp_path.glob("requests.jsonl.[0-9]*"))]
    written = sorted(w * 10_000 + n for w in range(3) for n in range(180))
    assert sorted(number for path in files for number in numbers(path)) == written
    # Rotated only when full: a file rotated twice (by two workers) would be nearly empty.
    assert all(1_000 < path.stat().st_size <= 2_000 for path in files[1:])


# Reading on through rotations.


def read_all(log: Path, cursor: LogCursor | None) -> tuple[list[int], LogCursor, int]:
    window, cursor = read_window(log, cursor, sample_size=ALL)
    assert window.malformed == 0
    return [int(text.split()[-1]) for text in window.texts], cursor, window.files


@pytest.mark.parametrize("rotations", [1, 2])
def test_the_monitor_reads_every_line_once_across_rotations(tmp_path, rotations):
    log = tmp_path / "requests.jsonl"
    line_bytes = len(lines(10, 1))
    writer = RequestLogWriter(log, max_bytes=4 * line_bytes + 1, backups=3)  # 4 lines a file
    writer.write(lines(10, 2))
    read, cursor, _ = read_all(log, None)
    assert read == [10, 11]
    # Two lines more into the file the cursor is in, then `rotations` rotations: the lines
    # after the cursor are now in a backup, the last ones in the current file.
    written = list(range(12, 14 + 4 * rotations - 2))
    for number in written:
        writer.write(lines(number, 1))
    assert backup_path(log, rotations).exists() and not backup_path(log, rotations + 1).exists()
    read, cursor, files = read_all(log, cursor)
    assert read == written and files == rotations + 1
    writer.write(lines(100, 1))
    assert read_all(log, cursor)[0] == [100]  # and nothing a second time
    writer.close()


def test_reading_while_processes_write_and_rotate_reads_every_line_once(tmp_path):
    log = tmp_path / "requests.jsonl"
    RequestLogWriter(log, max_bytes=2_000, backups=1_000).write(lines(99_999, 1))
    read, cursor, _ = read_all(log, None)  # a first read takes the current file only
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_write_batches, args=(str(log), w, 60)) for w in range(2)]
    for worker in workers:
        worker.start()
    while any(worker.is_alive() for worker in workers):
        numbers_read, cursor, _ = read_all(log, cursor)
        read += numbers_read
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    read += read_all(log, cursor)[0]
    assert sorted(read) == sorted([99_999] + [w * 10_000 + n for w in range(2) for n in range(180)])


def test_a_line_being_written_at_rotation_is_read_once_whole(tmp_path):
    log = tmp_path / "requests.jsonl"
    append(log, [record(0)])
    with log.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(record(1))[:20])  # no newline yet
    read, cursor, _ = read_all(log, None)
    assert read == [0]
    with log.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(record(1))[20:] + "\n")
    os.replace(log, backup_path(log, 1))
    append(log, [record(2)])
    assert read_all(log, cursor)[0] == [1, 2]


def test_lines_rotated_out_of_the_backups_are_missed_and_said_so(tmp_path):
    log = tmp_path / "requests.jsonl"
    line_bytes = len(lines(0, 1))
    writer = RequestLogWriter(log, max_bytes=2 * line_bytes + 1, backups=1)  # 2 lines a file
    writer.write(lines(0, 1))
    _, cursor = read_window(log, None, sample_size=ALL)
    for number in range(1, 7):
        writer.write(lines(number, 1))
    writer.close()
    window, _ = read_window(log, cursor, sample_size=ALL)
    assert window.restart == "rotated" and window.start_offset == 0
    # What the one backup and the file still hold, from the top, once each.
    assert [int(text.split()[-1]) for text in window.texts] == [4, 5, 6]


def test_an_unfinished_line_at_the_end_of_a_rotated_file_is_malformed(tmp_path):
    log = tmp_path / "requests.jsonl"
    append(log, [record(0)])
    _, cursor = read_window(log, None, sample_size=ALL)
    with log.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(record(1)) + "\n" + json.dumps(record(2))[:20])
    os.replace(log, backup_path(log, 1))
    append(log, [record(3)])
    window, _ = read_window(log, cursor, sample_size=ALL)
    assert window.n == 2 and window.malformed == 1
    assert "of requests.jsonl.1: unfinished last line" in window.malformed_examples[0]
