"""Reading the serving request log incrementally, from a cursor, tolerant of rotation.

The log is JSON Lines written by bentos/service.py, one object per classified text:
`{ts, request_id, model_tag, text, label, best_label, score, abstained}`. A reader keeps a
`LogCursor` (byte offset, inode, a digest of the file's first bytes) and reads only what was
appended since. When the file was rotated (new inode), truncated (shorter than the offset)
or rewritten (its first bytes differ from those already read), it starts again from the top.
A last line without its newline is being written: it is left for the next read. Malformed
lines are skipped and counted, with a few examples, never fatal.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from pydantic import BaseModel, ConfigDict, Field, ValidationError

# The first bytes of the file identify it across checks (a digest, not the text itself).
HEAD_BYTES = 256
MALFORMED_EXAMPLES = 5


class RequestRecord(BaseModel):
    """One line of the request log (fields added later are ignored)."""

    model_config = ConfigDict(frozen=True, extra="ignore", strict=True)

    ts: str
    request_id: str
    model_tag: str
    text: str
    label: str
    best_label: str = Field(min_length=1)
    score: float = Field(ge=0, le=1)
    abstained: bool


@dataclass(frozen=True)
class LogCursor:
    """Where the last complete read of a log ended."""

    path: str
    inode: int
    offset: int
    head_digest: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "inode": self.inode,
            "offset": self.offset,
            "head_digest": self.head_digest,
        }

    @classmethod
    def from_dict(cls, raw: Any) -> LogCursor | None:
        """The cursor saved by `to_dict`, or None if `raw` is not one."""
        try:
            return cls(
                path=str(raw["path"]),
                inode=int(raw["inode"]),
                offset=int(raw["offset"]),
                head_digest=str(raw["head_digest"]),
            )
        except (KeyError, TypeError, ValueError):
            return None


@dataclass
class LogWindow:
    """What the log holds between two offsets, summarised in bounded memory.

    `texts` is a uniform random sample (reservoir) of at most `sample_size` texts.
    `restart` says why reading started from the top ("first read", "rotated", "truncated",
    "rewritten"), or is None when it continued from the cursor.
    """

    n: int = 0
    label_counts: Counter[str] = field(default_factory=Counter)
    lengths: list[int] = field(default_factory=list)
    abstained: int = 0
    model_tags: Counter[str] = field(default_factory=Counter)
    texts: list[str] = field(default_factory=list)
    malformed: int = 0
    malformed_examples: list[str] = field(default_factory=list)
    first_ts: str | None = None
    last_ts: str | None = None
    start_offset: int = 0
    end_offset: int = 0
    restart: str | None = None

    @property
    def abstention_rate(self) -> float:
        return self.abstained / self.n if self.n else 0.0


def _head_digest(handle: BinaryIO, offset: int) -> str:
    """A digest of the first min(offset, HEAD_BYTES) bytes: what was already read of them."""
    handle.seek(0)
    return hashlib.blake2b(handle.read(min(offset, HEAD_BYTES)), digest_size=8).hexdigest()


def _start(path: Path, cursor: LogCursor | None) -> tuple[int, str | None]:
    """Where to start reading, and why from the top when it is not the cursor."""
    if cursor is None or cursor.path != str(path):
        return 0, "first read"
    stat = path.stat()
    if stat.st_ino != cursor.inode:
        return 0, "rotated"
    if stat.st_size < cursor.offset:
        return 0, "truncated"
    with path.open("rb") as handle:
        rewritten = _head_digest(handle, cursor.offset) != cursor.head_digest
    if rewritten:
        return 0, "rewritten"
    return cursor.offset, None


def _parse(line: bytes) -> RequestRecord | str:
    """The record on one line, or why it is not one."""
    try:
        payload = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        return "not UTF-8"
    except json.JSONDecodeError as error:
        return f"not JSON ({error.msg})"
    if not isinstance(payload, dict):
        return f"not a JSON object ({type(payload).__name__})"
    try:
        return RequestRecord.model_validate(payload)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "(record)"
        return f"{where}: {first['msg']}"


def read_window(
    path: str | Path, cursor: LogCursor | None, *, sample_size: int, seed: int = 0
) -> tuple[LogWindow, LogCursor]:
    """Summarise the records appended to the log at `path` since `cursor`.

    Returns the window and the cursor after its last complete line. The caller decides
    whether to keep the new cursor (e.g. not when the window is too small to judge).

    Raises:
        FileNotFoundError: there is no log at `path`.
    """
    path = Path(path)
    start, restart = _start(path, cursor)
    window = LogWindow(start_offset=start, end_offset=start, restart=restart)
    rng = random.Random(seed)
    offset = start
    with path.open("rb") as handle:
        inode = os.fstat(handle.fileno()).st_ino
        handle.seek(start)
        for line in handle:
            if not line.endswith(b"\n"):
                break  # being written: read it next time, whole
            line_start = offset
            offset += len(line)
            if not line.strip():
                continue
            record = _parse(line)
            if isinstance(record, str):
                window.malformed += 1
                if len(window.malformed_examples) < MALFORMED_EXAMPLES:
                    window.malformed_examples.append(f"byte {line_start}: {record}")
                continue
            window.n += 1
            window.label_counts[record.best_label] += 1
            window.lengths.append(len(record.text))
            window.abstained += record.abstained
            window.model_tags[record.model_tag] += 1
            window.first_ts = window.first_ts or record.ts
            window.last_ts = record.ts
            # Reservoir sampling (algorithm R): every text has the same chance to be kept.
            if len(window.texts) < sample_size:
                window.texts.append(record.text)
            else:
                slot = rng.randrange(window.n)
                if slot < sample_size:
                    window.texts[slot] = record.text
        head_digest = _head_digest(handle, offset)
    window.end_offset = offset
    new_cursor = LogCursor(path=str(path), inode=inode, offset=offset, head_digest=head_digest)
    return window, new_cursor
