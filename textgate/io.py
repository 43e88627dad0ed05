"""Reading labelled tables and writing outputs atomically."""

from __future__ import annotations

import csv
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from textgate.errors import DataError

if TYPE_CHECKING:  # pandas is imported where tables are read: serving reads none
    import pandas as pd

SUPPORTED_SUFFIXES = (".csv", ".parquet", ".pq")
# Separators spreadsheet exports use: comma, semicolon (locales with a decimal comma), tab, pipe.
CSV_DELIMITERS = ",;\t|"


def sniff_delimiter(text: str) -> str:
    """The CSV delimiter of a file's text, judged on its header line; a comma when unclear.

    Only the header is read: it holds column names, while texts may contain any separator.
    """
    header = text.lstrip("\ufeff").split("\n", 1)[0]
    try:
        return csv.Sniffer().sniff(header, delimiters=CSV_DELIMITERS).delimiter
    except csv.Error:
        return ","


def read_table(path: str | Path) -> pd.DataFrame:
    """Read a CSV (strict UTF-8; comma, semicolon, tab or pipe separated) or Parquet file.

    Every column is kept as given (CSV values as strings).

    Raises:
        DataError: the file is missing, has an unsupported suffix, is not UTF-8 or is malformed.
    """
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise DataError(f"{path}: unsupported file type {suffix!r}; use CSV or Parquet")
    try:
        if suffix == ".csv":
            raw = path.read_bytes()
            try:
                delimiter = sniff_delimiter(raw.decode("utf-8"))
            except UnicodeDecodeError as error:
                line = raw[: error.start].count(b"\n") + 1
                raise DataError(
                    f"{path}: not valid UTF-8 at byte {error.start} (line {line}); "
                    "re-save the file as UTF-8"
                ) from None
            return pd.read_csv(
                path, sep=delimiter, dtype=str, keep_default_na=False, encoding="utf-8"
            )
        return pd.read_parquet(path)
    except DataError:
        raise
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: the file is empty (no header, no rows)") from None
    except (pd.errors.ParserError, ValueError, OSError) as error:
        raise DataError(f"{path}: cannot be read: {error}") from None


def read_labelled(path: str | Path, text_column: str, label_column: str) -> pd.DataFrame:
    """Read a table and return exactly two string columns, `text` and `label`.

    Raises:
        DataError: a required column is missing or the table has no rows.
    """
    import pandas as pd

    frame = read_table(path)
    missing = [column for column in (text_column, label_column) if column not in frame.columns]
    if missing:
        raise DataError(
            f"{path}: missing required column(s) {missing}; found {list(frame.columns)}. "
            "Set data.text_column / data.label_column in params.yaml to match."
        )
    if frame.empty:
        raise DataError(f"{path}: the dataset has no rows")
    out = pd.DataFrame({"text": frame[text_column], "label": frame[label_column]})
    # Nulls stay nulls (validation reports them); every other value becomes a string.
    return out.astype(object).where(out.notna(), None).map(lambda v: v if v is None else str(v))


FILE = "file"  # read_training's provenance columns, with several training files
FILE_ROW = "file_row"


def read_training(data: Any) -> pd.DataFrame:
    """The training table `data.train_file` names (a `DataConfig`): one file, or several
    files and globs read as one, with `text` and `label` columns.

    With several files the frame also has `file` (the path inside raw_dir) and `file_row`
    (the row's 0-based data row in that file, as validation numbers rows), so that validation
    can name the batch of each offending row. A glob that matches nothing adds nothing; a
    named file that is missing fails.

    Raises:
        DataError: a file is missing or unreadable, or no file matched at all.
    """
    import pandas as pd

    paths = data.train_paths()
    if not paths:
        raise DataError(f"data.train_file {data.train_patterns} matches no file in {data.raw_dir}")
    frames = []
    for path in paths:
        frame = read_labelled(path, data.text_column, data.label_column)
        if len(paths) > 1:
            frame[FILE] = _inside(path, data.raw_dir)
            frame[FILE_ROW] = range(len(frame))
        frames.append(frame)
    return frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True)


def _inside(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path that replaces `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_json(path: str | Path, payload: Any) -> None:
    """Write JSON atomically (readers never see a half-written file)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def read_json(path: str | Path) -> Any:
    """Read a JSON file, raising DataError with the path if it is missing or corrupt."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"file not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"{path} is corrupt (not valid JSON): {error}") from None
