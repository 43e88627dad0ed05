"""The drift check's notes about how the request log was read (rotations, restarts)."""

from __future__ import annotations

import pytest

from tasks.monitor import _describe_window
from textgate.requestlog import LogWindow


@pytest.mark.parametrize(
    ("window", "expected"),
    [
        (LogWindow(restart="first read"), []),
        (LogWindow(restart=None), []),
        (LogWindow(restart=None, files=3), ["rotated since the last check: read on through"]),
        (LogWindow(restart="rotated", files=6), ["lines may have been missed"]),
        (LogWindow(restart="truncated"), ["truncated since the last check: read from the top"]),
    ],
)
def test_notes_say_how_the_log_was_read(window, expected):
    notes = _describe_window(window)
    assert len(notes) == len(expected)
    assert all(part in note for part, note in zip(expected, notes, strict=True))
