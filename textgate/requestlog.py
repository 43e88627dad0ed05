"""The serving request log: written with size rotation, read incrementally from a cursor.

The log is JSON Lines written by bentos/service.py, one object per classified text:
`{ts, request_id, model_tag, text, label, best_label, score, abstained}`.

Writing (`RequestLogWriter`): the file and its backups are owner-only (0600, in a 0700
directory when the writer creates it), whatever the umask, since the lines hold request
texts. The file is rotated by size with the standard library's `RotatingFileHandler`
(`requests.jsonl` -> `requests.jsonl.1` -> ... -> `.<backups>`, the oldest deleted). Several
BentoML worker processes append to the same file, and that handler is safe only within one
process: every batch is written, and a rotation made, under an exclusive `flock` of a lock
file beside the log (`requests.jsonl.lock`), and a worker whose open file was rotated away by
another reopens the path first. So lines never interleave, no worker writes into a rotated
file, and two workers never rotate the same file twice.

Reading (`read_window`): a reader keeps a `LogCursor` (inode, byte offset, a digest of the
file's first bytes) and reads only what was appended since. When the log was rotated (the
file has another inode), the cursor's file is looked for among the backups by inode: the
rest of it is read, then every newer backup, then the current file, so no line is lost or
read twice across any number of rotations while the backups keep it. When it is no longer
there (rotated out, or moved elsewhere), the backups and the file are read from the top
(restart "rotated"); a truncated or rewritten file (its first bytes differ from those already
read) is read from the top. A last line without its newline is being written: it is left
for the next read. Malformed lines are skipped and counted, with a few examples, never fatal.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import random
import stat
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from logging.handlers import RotatingFileHandler
from pathlib import Path
from typing import Any, BinaryIO, TextIO

from pydantic import ValidationError

from textgate.artifacts import RequestRecord, default_request_log

# The first bytes of the file identify it across checks (a digest, not the text itself).
HEAD_BYTES = 256
MALFORMED_EXAMPLES = 5
# Where the service writes the log, when set; else `request_log_path` puts it under BentoML's home.
REQUEST_LOG_ENV = "TEXTGATE_REQUEST_LOG"
# How `textgate serve` passes serve.request_log_max_bytes and serve.request_log_backups
# (params.yaml) to the service's workers, as it passes serve.port on the command line.
MAX_BYTES_ENV = "TEXTGATE_REQUEST_LOG_MAX_BYTES"
BACKUPS_ENV = "TEXTGATE_REQUEST_LOG_BACKUPS"
# Request texts are personal data: only the service's user may read them.
FILE_MODE = 0o600
DIR_MODE = 0o700


def request_log_path(bentoml_home: Path) -> Path:
    """Where the service writes the log: `TEXTGATE_REQUEST_LOG`, else in `bentoml_home`."""
    configured = os.environ.get(REQUEST_LOG_ENV, "").strip()
    if configured:
        return Path(configured).expanduser()
    return default_request_log(bentoml_home)


def backup_path(path: Path, index: int) -> Path:
    """The log's `index`-th backup (1 = the most recent), named as RotatingFileHandler does."""
    return path.with_name(f"{path.name}.{index}")


def lock_path(path: Path) -> Path:
    """The file whose `flock` the writers (exclusive) and readers (shared) take."""
    return path.with_name(f"{path.name}.lock")


def _open_private(path: Path, flags: int) -> int:
    """A descriptor on `path`, created 0600; an existing file is made 0600 too."""
    fd = os.open(path, flags | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
    try:
        # The umask may have narrowed the mode; a log from before may be 0644.
        if stat.S_IMODE(os.fstat(fd).st_mode) != FILE_MODE:
            os.fchmod(fd, FILE_MODE)
    except OSError:
        os.close(fd)
        raise
    return fd


def _make_private_dirs(directory: Path) -> None:
    """Create `directory` and its missing parents 0700 (existing ones are left as they are)."""
    missing = []
    while not directory.exists():
        missing.append(directory)
        directory = directory.parent
    for created in reversed(missing):
        try:
            created.mkdir(mode=DIR_MODE)
        except FileExistsError:
            continue  # another worker made it in between (and makes it private)
        os.chmod(created, DIR_MODE)  # mkdir's mode is narrowed by the umask


@contextmanager
def _flocked(path: Path, operation: int, *, create: bool) -> Iterator[None]:
    """Hold `flock(operation)` on `path`; without `create`, no lock when it does not exist."""
    try:
        fd = _open_private(path, os.O_RDWR) if create else os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        if create:
            raise
        fd = None
    if fd is None:
        yield  # no writer has written this log yet: nothing rotates it
        return
    try:
        fcntl.flock(fd, operation)
        yield
    finally:
        os.close(fd)  # releases the lock


class _PrivateRotatingFileHandler(RotatingFileHandler):
    """The standard rotating handler, with owner-only files and errors raised to the caller."""

    def _open(self) -> TextIO:
        fd = _open_private(Path(self.baseFilename), os.O_WRONLY | os.O_APPEND)
        return open(fd, "a", encoding="utf-8")

    def handleError(self, record: logging.LogRecord) -> None:
        # logging would print the traceback to stderr and go on; the writer's caller decides.
        error = sys.exc_info()[1]
        if error is not None:
            raise error


class RequestLogWriter:
    """Appends batches of lines to the request log and rotates it by size, across processes.

    `RotatingFileHandler` rotates (`<path>.1` ... `<path>.<backups>`) before a batch that would
    take the file to `max_bytes` (counted in characters, so a file of non-ASCII text may end
    a little over). It is safe only within one process, and BentoML runs several workers on
    the one file, so each batch is written under an exclusive `flock` of `lock_path(path)`,
    after reopening the path if another worker rotated (or anyone moved) the file this one
    has open. A batch is written whole under the lock, so lines of different workers never
    interleave, and a rotated file is never written again, so readers can finish it.
    """

    def __init__(self, path: Path, *, max_bytes: int, backups: int) -> None:
        if max_bytes < 1:
            raise ValueError(f"request log max_bytes must be at least 1, got {max_bytes}")
        if backups < 1:
            # RotatingFileHandler with no backups reopens the same file: it would never shrink.
            raise ValueError(f"request log backups must be at least 1, got {backups}")
        self.path = Path(path)
        self._handler = _PrivateRotatingFileHandler(
            self.path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8", delay=True
        )
        self._lock = threading.Lock()

    def write(self, lines: str) -> None:
        """Append `lines` (whole lines, the last one ending in a newline), rotating first if due.

        Raises:
            OSError: the log cannot be written (the caller decides what a failure means).
            ValueError: `lines` does not end with a newline.
        """
        if not lines:
            return
        if not lines.endswith("\n"):
            raise ValueError("request log lines must end with a newline")
        # One record per batch: the handler writes its message and the final newline.
        record = logging.makeLogRecord({"msg": lines[:-1]})
        with self._lock:
            _make_private_dirs(self.path.parent)
            with _flocked(lock_path(self.path), fcntl.LOCK_EX, create=True):
                self._reopen_if_moved()
                self._handler.emit(record)

    def close(self) -> None:
        with self._lock:
            self._handler.close()

    def _reopen_if_moved(self) -> None:
        """Drop the open file when the path is another file now (the handler opens the path)."""
        stream = self._handler.stream
        if stream is None:
            return
        held = os.fstat(stream.fileno())
        try:
            on_disk = os.stat(self._handler.baseFilename)
        except FileNotFoundError:
            on_disk = None
        if on_disk is None or (on_disk.st_dev, on_disk.st_ino) != (held.st_dev, held.st_ino):
            self._handler.stream = None
            stream.close()


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
    `restart` says why reading started from the top ("first read"; "rotated": the cursor's
    file is no longer among the backups, so lines may have been missed; "truncated",
    "rewritten"), or is None when it continued from the cursor. `files` is how many files
    were read: more than 1 when the log was rotated since the cursor. `start_offset` is in
    the first of them, `end_offset` in the current file.
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
    files: int = 1

    @property
    def abstention_rate(self) -> float:
        return self.abstained / self.n if self.n else 0.0


def _head_digest(handle: BinaryIO, offset: int) -> str:
    """A digest of the first min(offset, HEAD_BYTES) bytes: what was already read of them."""
    handle.seek(0)
    return hashlib.blake2b(handle.read(min(offset, HEAD_BYTES)), digest_size=8).hexdigest()


@dataclass(frozen=True)
class _LogFile:
    """One file of the log, opened: a backup, or the current file (the last one)."""

    name: str
    handle: BinaryIO
    inode: int
    size: int  # when opened; only the current file grows


def _open_log_files(path: Path, stack: ExitStack) -> list[_LogFile]:
    """The oldest backup first, the current file last, opened under the writers' lock (shared)
    so that no rotation moves a file between two opens.

    Raises:
        FileNotFoundError: there is no log at `path`.
    """
    handles = []
    with _flocked(lock_path(path), fcntl.LOCK_SH, create=False):
        handles.append((path.name, stack.enter_context(path.open("rb"))))
        index = 1
        while True:
            try:
                backup = stack.enter_context(backup_path(path, index).open("rb"))
            except FileNotFoundError:
                break
            handles.append((backup_path(path, index).name, backup))
            index += 1
    files = []
    for name, handle in reversed(handles):
        stats = os.fstat(handle.fileno())
        files.append(_LogFile(name, handle, stats.st_ino, stats.st_size))
    return files


def _start(
    files: list[_LogFile], path: Path, cursor: LogCursor | None
) -> tuple[int, int, str | None]:
    """The file (index into `files`) and offset to start from, and why from the top if so."""
    last = len(files) - 1
    if cursor is None or cursor.path != str(path):
        return last, 0, "first read"
    for index, log_file in enumerate(files):
        if log_file.inode != cursor.inode:
            continue
        if log_file.size < cursor.offset:
            restart = "truncated"
        elif _head_digest(log_file.handle, cursor.offset) != cursor.head_digest:
            restart = "rewritten"
        else:
            return index, cursor.offset, None  # where the last read ended, rotated or not
        if index == last:
            return last, 0, restart
        break  # a backup that reuses the inode of a deleted file: the cursor's file is gone
    # The cursor's file was rotated out of the backups (or moved elsewhere): all that is left.
    return 0, 0, "rotated"


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


def _malformed(window: LogWindow, where: str, reason: str) -> None:
    window.malformed += 1
    if len(window.malformed_examples) < MALFORMED_EXAMPLES:
        window.malformed_examples.append(f"{where}: {reason}")


def _add(window: LogWindow, record: RequestRecord, sample_size: int, rng: random.Random) -> None:
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


def _read_file(
    window: LogWindow,
    log_file: _LogFile,
    start: int,
    *,
    current: bool,
    sample_size: int,
    rng: random.Random,
    on_record: Callable[[RequestRecord], None] | None = None,
) -> int:
    """Add the file's records from `start` to the window; the offset after its last line."""
    offset = start
    log_file.handle.seek(start)
    for line in log_file.handle:
        where = f"byte {offset}" + ("" if current else f" of {log_file.name}")
        if not line.endswith(b"\n"):
            if current:
                break  # being written: read it next time, whole
            _malformed(window, where, "unfinished last line of a rotated file")
            offset += len(line)
            break
        offset += len(line)
        if not line.strip():
            continue
        record = _parse(line)
        if isinstance(record, str):
            _malformed(window, where, record)
        else:
            _add(window, record, sample_size, rng)
            if on_record is not None:
                on_record(record)
    return offset


def read_window(
    path: str | Path,
    cursor: LogCursor | None,
    *,
    sample_size: int,
    seed: int = 0,
    on_record: Callable[[RequestRecord], None] | None = None,
) -> tuple[LogWindow, LogCursor]:
    """Summarise the records appended to the log at `path` since `cursor`.

    When the log was rotated since, the rest of the cursor's file (found among the backups
    by its inode) and every newer file are read too. Returns the window and the cursor after
    the current file's last complete line. The caller decides whether to keep the new
    cursor (e.g. not when the window is too small to judge). `on_record`, when given, is
    called with every record read, in log order (the window itself keeps only a summary).

    Raises:
        FileNotFoundError: there is no log at `path`.
    """
    path = Path(path)
    rng = random.Random(seed)
    with ExitStack() as stack:
        files = _open_log_files(path, stack)
        first, start, restart = _start(files, path, cursor)
        window = LogWindow(start_offset=start, restart=restart, files=len(files) - first)
        offset = start
        for index in range(first, len(files)):
            current = index == len(files) - 1
            offset = _read_file(
                window,
                files[index],
                start if index == first else 0,
                current=current,
                sample_size=sample_size,
                rng=rng,
                on_record=on_record,
            )
        last = files[-1]
        head_digest = _head_digest(last.handle, offset)
    window.end_offset = offset
    new_cursor = LogCursor(path=str(path), inode=last.inode, offset=offset, head_digest=head_digest)
    return window, new_cursor
