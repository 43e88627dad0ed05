"""Reading labelled tables (every format and encoding `textgate init` accepts) and writing
outputs atomically."""

from __future__ import annotations

import codecs
import csv
import io
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from textgate.errors import DataError

if TYPE_CHECKING:  # pandas is imported where tables are read: serving reads none
    import pandas as pd

# Suffix -> format. Text formats (CSV, TSV, JSON lines) are decoded with a detected encoding.
FORMATS = {
    ".csv": "csv",
    ".txt": "csv",
    ".tsv": "tsv",
    ".tab": "tsv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".xlsx": "excel",
    ".xlsm": "excel",
}
SUPPORTED_SUFFIXES = tuple(FORMATS)
# Separators spreadsheet exports use: comma, semicolon (locales with a decimal comma), tab, pipe.
CSV_DELIMITERS = ",;\t|"
# Byte-order marks, longest first (UTF-32's LE mark starts with UTF-16's).
_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)
# What a detector's name for a legacy encoding is read as: the superset that decodes the same
# bytes and more (GB18030 contains GBK and GB2312; cp1252 contains Latin-1's printable range).
_SUPERSETS = {"gbk": "gb18030", "gb2312": "gb18030", "latin_1": "cp1252", "iso8859_1": "cp1252"}
# Western European single-byte code pages a detector cannot tell apart on short files: when
# cp1252 decodes the bytes as well as the detector's first guess, it is the likelier one.
_WESTERN = {"cp1252", "latin_1", "iso8859_1", "iso8859_15"}


@dataclass(frozen=True)
class TableFormat:
    """How a file was read: its format, text encoding and CSV delimiter (None where n/a)."""

    format: str
    encoding: str | None = None
    delimiter: str | None = None


def sniff_delimiter(text: str) -> str:
    """The CSV delimiter of a file's text, judged on its header line; a comma when unclear.

    Only the header is read: it holds column names, while texts may contain any separator.
    """
    header = text.lstrip("\ufeff").split("\n", 1)[0].rstrip("\r")
    try:
        return csv.Sniffer().sniff(header, delimiters=CSV_DELIMITERS).delimiter
    except csv.Error:
        return ","


def detect_encoding(raw: bytes) -> str:
    """The text encoding of `raw`: a byte-order mark, else UTF-8 if it decodes, else the
    guess of charset-normalizer (GBK read as GB18030, Western code pages as cp1252)."""
    for bom, name in _BOMS:
        if raw.startswith(bom):
            return name
    try:
        raw.decode("utf-8")
        return "utf-8"
    except UnicodeDecodeError:
        pass
    from charset_normalizer import from_bytes

    matches = list(from_bytes(raw))
    if not matches:
        return "utf-8"  # nothing decodes it: the strict UTF-8 error then names the byte
    best = matches[0]
    tied = [m for m in matches if m.chaos == best.chaos and m.coherence == best.coherence]
    if any(_WESTERN & set(m.could_be_from_charset) for m in tied):
        return "cp1252"
    return _SUPERSETS.get(best.encoding, best.encoding)


def decode(raw: bytes, path: Path, encoding: str | None) -> tuple[str, str]:
    """The text of a file and the encoding used (`encoding`, or detected when None).

    Raises:
        DataError: the bytes are not valid in that encoding; names the byte, its line, and
            `data.encoding`, the param that sets the encoding.
    """
    used = encoding or detect_encoding(raw)
    try:
        codecs.lookup(used)
    except LookupError:
        raise DataError(
            f"unknown encoding {used!r}: set data.encoding to a Python codec name"
        ) from None
    try:
        return raw.decode(used), used
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise DataError(
            f"{path}: not valid {used} at byte {error.start} (line {line}); set "
            "data.encoding to the file's encoding (null detects it), or re-save the file as UTF-8"
        ) from None


def _read_text_table(text: str, fmt: str) -> tuple[pd.DataFrame, str | None]:
    """A decoded CSV/TSV/JSON table, every value as a string; and the CSV delimiter."""
    import pandas as pd

    if fmt in ("jsonl", "json"):
        frame = pd.read_json(
            io.StringIO(text), lines=fmt == "jsonl", dtype=False, convert_dates=False
        )
        frame.columns = [str(column) for column in frame.columns]
        return frame, None
    delimiter = "\t" if fmt == "tsv" else sniff_delimiter(text)
    frame = pd.read_csv(io.StringIO(text), sep=delimiter, dtype=str, keep_default_na=False)
    return frame, delimiter


def read_table_format(
    path: str | Path, encoding: str | None = None
) -> tuple[pd.DataFrame, TableFormat]:
    """Read a table and say how: CSV/TSV (delimiter judged from the header), JSON lines or a
    JSON array of objects, Parquet, or the first sheet of an Excel workbook.

    Args:
        encoding: the text encoding of CSV, TSV and JSON files (`data.encoding`); None
            detects it (byte-order mark, UTF-8, else charset-normalizer's guess).

    Raises:
        DataError: the file is missing, has an unsupported suffix, cannot be decoded or is
            malformed.
    """
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(
            f"{path}: unsupported file type {path.suffix.lower()!r}; use one of "
            f"{', '.join(SUPPORTED_SUFFIXES)} (save an old .xls workbook as .xlsx)"
        )
    try:
        if fmt == "parquet":
            return pd.read_parquet(path), TableFormat(fmt)
        if fmt == "excel":
            frame = pd.read_excel(path, sheet_name=0, dtype=str, keep_default_na=False)
            return frame, TableFormat(fmt)
        raw = path.read_bytes()
        if not raw.strip():
            raise pd.errors.EmptyDataError
        text, used = decode(raw, path, encoding)
        frame, delimiter = _read_text_table(text, fmt)
        return frame, TableFormat(fmt, used, delimiter)
    except DataError:
        raise
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: the file is empty (no header, no rows)") from None
    except (pd.errors.ParserError, ValueError, OSError, KeyError) as error:
        raise DataError(f"{path}: cannot be read as {fmt}: {error}") from None


def read_table(path: str | Path, encoding: str | None = None) -> pd.DataFrame:
    """Read a table in any supported format (see `read_table_format`); values kept as given."""
    return read_table_format(path, encoding)[0]


def read_labelled(
    path: str | Path, text_column: str, label_column: str, encoding: str | None = None
) -> pd.DataFrame:
    """Read a table and return exactly two string columns, `text` and `label`.

    Raises:
        DataError: a required column is missing or the table has no rows.
    """
    return select_labelled(read_table(path, encoding), path, text_column, label_column)


def select_labelled(
    frame: pd.DataFrame, path: str | Path, text_column: str, label_column: str
) -> pd.DataFrame:
    """The `text` and `label` columns of a table read from `path`, as `read_labelled`."""
    import pandas as pd

    missing = [column for column in (text_column, label_column) if column not in frame.columns]
    if missing:
        raise DataError(
            f"{path}: missing required column(s) {missing}; found {list(frame.columns)}. "
            "Set data.text_column / data.label_column in params.yaml to match "
            "(`textgate init --data FILE` finds them)."
        )
    if frame.empty:
        raise DataError(f"{path}: the dataset has no rows")
    out = pd.DataFrame({"text": frame[text_column], "label": frame[label_column]})
    # Nulls stay nulls (validation reports them); every other value becomes a string.
    return out.astype(object).where(out.notna(), None).map(lambda v: v if v is None else str(v))


def read_cases(path: str | Path) -> pd.DataFrame:
    """A hand-kept `text,label` file (the must-pass cases), where lines starting with `#`
    are comments; it may have no rows. Same formats and encodings as `read_table`.

    Returns:
        Columns `text` and `label`; in a CSV or TSV file, the index is each case's line number
        (the header is line 1), else 2, 3, ...

    Raises:
        DataError: the file is missing or malformed, or lacks a `text` or `label` column.
    """
    import pandas as pd

    path = Path(path)
    fmt = FORMATS.get(path.suffix.lower())
    if path.is_file() and fmt in ("csv", "tsv"):
        text, _ = decode(path.read_bytes(), path, None)
        kept = [
            (number, line)
            for number, line in enumerate(text.splitlines(), 1)
            if not line.lstrip().startswith("#")
        ]
        try:
            frame, _ = _read_text_table("\n".join(line for _, line in kept) + "\n", fmt)
        except (pd.errors.ParserError, pd.errors.EmptyDataError) as error:
            raise DataError(f"{path}: cannot be read: {error}") from None
        numbers = [number for number, _ in kept[1:]]
        # A quoted text over several lines shifts the count: number the cases plainly then.
        index = numbers if len(numbers) == len(frame) else range(2, len(frame) + 2)
    else:
        frame = read_table(path)
        index = range(2, len(frame) + 2)
    missing = [column for column in ("text", "label") if column not in frame.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; expected a header `text,label`")
    out = frame[["text", "label"]].set_axis(list(index))
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
        frame = read_labelled(path, data.text_column, data.label_column, data.encoding)
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
