"""Dataset facts that Great Expectations cannot express directly, and the validation report.

The validate stage (tasks/validate.py) turns a labelled table into the frames built here and
runs expectations on their columns; this module stays free of Great Expectations itself.
"""

from __future__ import annotations

import html
import json
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import pandas as pd

from textgate.io import FILE, FILE_ROW
from textgate.text import normalise_text

# Columns of the per-row frame (`row_features`).
TEXT = "text"
LABEL = "label"
TEXT_KEY = "text_key"  # normalised text used to match texts across rows and files; null if blank
TEXT_CHARS = "text_chars"  # characters of the normalised text; null where null or blank
TEXT_BLANK = "text_blank"  # a string that normalising empties (whitespace, invisible characters)
LABELS_PER_TEXT = "labels_per_text"  # distinct labels seen with this row's (normalised) text
IS_DUPLICATE = "is_duplicate"  # same text and label as an earlier row
IN_TEST = "in_test"  # the (normalised) text also appears in the test file
IS_HEADER = "is_header"  # text and label are the column names: a header repeated as data
LABEL_VARIANT = "label_variant"  # the label differs from another only by case or whitespace
TRUNCATED = "truncated"  # longer than train.max_length tokens of the base model (set by validate)

# Columns of the per-class frame (`class_counts`) and the per-text frame (`text_conflicts`).
N_EXAMPLES = "n_examples"
N_DISTINCT_TEXTS = "n_distinct_texts"  # distinct normalised texts: what survives de-duplication
SHARE = "share"  # the class's fraction of all labelled rows
N_LABELS = "n_labels"
CONFLICTING = "conflicting"

LabelSource = Literal["declared", "inferred"]


def text_key(value: object) -> str | None:
    """Normalised text (NFKC, collapsed whitespace) for matching; None when null or blank."""
    if not isinstance(value, str):
        return None
    return normalise_text(value) or None


def text_chars(texts: pd.Series) -> pd.Series:
    """Length of each normalised text in characters; NaN where null or blank."""
    lengths = texts.map(lambda t: float(len(text_key(t) or "")) if isinstance(t, str) else 0.0)
    return lengths.where(lengths > 0).astype("float64")


def is_blank(texts: pd.Series) -> pd.Series:
    """True where the value is a string that normalising empties, as cleaning in prepare does.

    Whitespace and invisible characters (zero-width spaces, soft hyphens, a BOM) both count.
    """
    return texts.map(lambda t: isinstance(t, str) and text_key(t) is None).astype(bool)


def normalise_labels(labels: pd.Series) -> pd.Series:
    """Labels as given, with null and blank labels both turned into None (missing)."""
    values = [v if isinstance(v, str) and v.strip() else None for v in labels]
    return pd.Series(values, index=labels.index, dtype=object)


def token_lengths(tokenizer: Any, texts: Sequence[str]) -> list[int]:
    """Tokens of each text under `tokenizer` (a transformers tokenizer), special ones included."""
    lengths: list[int] = []
    for start in range(0, len(texts), 1024):
        encoded = tokenizer(list(texts[start : start + 1024]), add_special_tokens=True)
        lengths += [len(ids) for ids in encoded["input_ids"]]
    return lengths


def infer_labels(labels: pd.Series) -> list[str]:
    """The sorted distinct non-missing labels."""
    return sorted({str(v) for v in normalise_labels(labels) if v is not None})


def label_variants(labels: Iterable[object]) -> dict[str, list[str]]:
    """Labels that differ only by case or surrounding whitespace, grouped by the label the
    group most likely means (see `suggest_label_aliases`); groups of one are left out."""
    counts = Counter(label for label in labels if isinstance(label, str) and label.strip())
    groups: dict[str, list[str]] = {}
    for label in counts:
        groups.setdefault(label.strip().casefold(), []).append(label)
    variants = {}
    for members in groups.values():
        if len(members) > 1:
            # The most frequent spelling without surrounding whitespace; ties: sorted first.
            clean = [m for m in members if m == m.strip()] or [m.strip() for m in members]
            target = min(clean, key=lambda m: (-counts.get(m, 0), m))
            variants[target] = sorted(members)
    return variants


def suggest_label_aliases(labels: Iterable[object]) -> dict[str, str]:
    """A `data.label_aliases` map merging each group of `label_variants` into one label."""
    return {
        member: target
        for target, members in label_variants(labels).items()
        for member in members
        if member != target
    }


def row_features(
    frame: pd.DataFrame,
    test_texts: Iterable[object] = (),
    header: tuple[str, str] | None = None,
) -> pd.DataFrame:
    """Per-row frame: `text`, `label` (blank -> None) and the derived columns listed above.

    Args:
        frame: a table with `text` and `label` columns, as `textgate.io.read_labelled` returns.
        test_texts: texts of the test file; `in_test` marks train rows whose text is among them.
        header: the file's (text, label) column names; `is_header` marks rows that repeat them
            (compared without case or surrounding whitespace).

    Returns:
        One row per input row, same index, columns `TEXT, LABEL, TEXT_KEY, TEXT_CHARS,
        TEXT_BLANK, LABELS_PER_TEXT, IS_DUPLICATE, IN_TEST, IS_HEADER, LABEL_VARIANT`.
    """
    rows = pd.DataFrame(index=frame.index)
    rows[TEXT] = frame[TEXT].astype(object)
    rows[LABEL] = normalise_labels(frame[LABEL])
    rows[TEXT_KEY] = pd.Series([text_key(t) for t in rows[TEXT]], index=rows.index, dtype=object)
    rows[TEXT_CHARS] = text_chars(rows[TEXT])
    rows[TEXT_BLANK] = is_blank(rows[TEXT])
    per_text = rows.groupby(TEXT_KEY, dropna=True)[LABEL].transform("nunique")
    rows[LABELS_PER_TEXT] = per_text.reindex(rows.index).fillna(0).astype(int)
    rows[IS_DUPLICATE] = rows.duplicated([TEXT, LABEL], keep="first")
    test_keys = {key for key in map(text_key, test_texts) if key is not None}
    rows[IN_TEST] = rows[TEXT_KEY].isin(test_keys).astype(bool)
    rows[IS_HEADER] = _repeats_header(rows, header)
    for column in (FILE, FILE_ROW):  # several training files: where each row comes from
        if column in frame.columns:
            rows[column] = frame[column]
    variants = {label for group in label_variants(rows[LABEL]).values() for label in group}
    rows[LABEL_VARIANT] = rows[LABEL].isin(variants).astype(bool)
    return rows


def _repeats_header(rows: pd.DataFrame, header: tuple[str, str] | None) -> pd.Series:
    if header is None:
        return pd.Series(False, index=rows.index, dtype=bool)
    names = tuple(name.strip().casefold() for name in header)
    pairs = zip(rows[TEXT], rows[LABEL], strict=True)
    marks = [
        isinstance(t, str)
        and isinstance(lab, str)
        and (t.strip().casefold(), lab.strip().casefold()) == names
        for t, lab in pairs
    ]
    return pd.Series(marks, index=rows.index, dtype=bool)


def class_counts(labels: pd.Series, declared: Sequence[str] | None = None) -> pd.DataFrame:
    """Rows per class: declared classes first (zero when absent), then other labels sorted.

    Returns:
        A frame with columns `label` and `n_examples` and a 0-based RangeIndex; missing
        labels (null or blank) are not counted.
    """
    counts = normalise_labels(labels).dropna().value_counts()
    order = list(declared or [])
    order += sorted(str(label) for label in counts.index if label not in set(order))
    return pd.DataFrame(
        {LABEL: order, N_EXAMPLES: [int(counts.get(label, 0)) for label in order]},
    ).astype({LABEL: object, N_EXAMPLES: int})


def class_features(rows: pd.DataFrame, declared: Sequence[str] | None = None) -> pd.DataFrame:
    """`class_counts` of the rows' labels, plus each class's distinct texts and share of rows.

    Args:
        rows: a frame from `row_features`.
        declared: the declared label set, as for `class_counts`.

    Returns:
        Columns `label`, `n_examples`, `n_distinct_texts` (distinct non-blank normalised texts,
        what prepare keeps after de-duplication) and `share` (of all labelled rows; 0 when
        there are none).
    """
    classes = class_counts(rows[LABEL], declared)
    distinct = rows.dropna(subset=[TEXT_KEY, LABEL]).groupby(LABEL)[TEXT_KEY].nunique()
    total = int(classes[N_EXAMPLES].sum())
    classes[N_DISTINCT_TEXTS] = [int(distinct.get(label, 0)) for label in classes[LABEL]]
    classes[SHARE] = classes[N_EXAMPLES] / total if total else 0.0
    return classes.astype({N_DISTINCT_TEXTS: int, SHARE: "float64"})


def text_conflicts(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per distinct normalised text: how many labels it has and whether it conflicts.

    Args:
        rows: a frame from `row_features`.

    Returns:
        Columns `text_key`, `n_labels` and `conflicting` (int 0/1, so its sum counts
        the texts that appear with more than one label).
    """
    grouped = rows.dropna(subset=[TEXT_KEY]).groupby(TEXT_KEY, sort=False)[LABEL].nunique()
    return pd.DataFrame(
        {
            TEXT_KEY: grouped.index.astype(object),
            N_LABELS: grouped.to_numpy(dtype=int),
            CONFLICTING: (grouped.to_numpy() > 1).astype(int),
        }
    )


def conflicting_rows(rows: pd.DataFrame) -> pd.DataFrame:
    """Rows whose text appears with more than one label, grouped by text in order of appearance."""
    conflicting = rows[rows[LABELS_PER_TEXT] > 1]
    first_seen = conflicting.groupby(TEXT_KEY, sort=False).ngroup()
    return (
        conflicting.assign(_group=first_seen)
        .sort_values("_group", kind="stable")
        .drop(columns="_group")
    )


def _json_value(value: object) -> str | None:
    return None if value is None or (isinstance(value, float) and pd.isna(value)) else str(value)


def row_examples(rows: pd.DataFrame, index: Iterable[Any], limit: int = 5) -> list[dict[str, Any]]:
    """Up to `limit` rows as `{"row", "text", "label"}`; `row` is the 0-based data row index.

    With several training files, `row` is the row in its file and `file` names the file.
    """
    examples = []
    for i in list(index)[:limit]:
        example: dict[str, Any] = {"row": int(i)}
        if FILE in rows.columns:
            example = {"file": str(rows.at[i, FILE]), "row": int(rows.at[i, FILE_ROW])}
        example["text"] = _json_value(rows.at[i, TEXT])
        example["label"] = _json_value(rows.at[i, LABEL])
        examples.append(example)
    return examples


def class_examples(
    classes: pd.DataFrame, index: Iterable[Any], limit: int = 5
) -> list[dict[str, Any]]:
    """Up to `limit` classes as `{"label", "n_examples"}`."""
    return [
        {"label": str(classes.at[i, LABEL]), "n_examples": int(classes.at[i, N_EXAMPLES])}
        for i in list(index)[:limit]
    ]


@dataclass(frozen=True)
class CheckResult:
    """One named check: whether it passed, a one-sentence summary and offending examples."""

    name: str
    success: bool
    summary: str
    examples: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class ValidationReport:
    """Everything the validate stage found, in the shape written to report.json."""

    n_rows: int
    n_test_rows: int | None
    labels: list[str]
    label_source: LabelSource
    class_counts: dict[str, int]
    checks: list[CheckResult]
    # Rows each declared repair changed (textgate.repair.Repairs); prepare applies the same.
    repairs: dict[str, int] = field(default_factory=dict)

    @property
    def success(self) -> bool:
        """True when every check passed."""
        return all(check.success for check in self.checks)

    @property
    def failed(self) -> list[CheckResult]:
        """The checks that did not pass, in report order."""
        return [check for check in self.checks if not check.success]

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready report: `success` first, then the fields in declaration order."""
        return {"success": self.success, **asdict(self)}


def clip(text: str, max_chars: int = 80) -> str:
    """The text cut to at most `max_chars` characters, ending in an ellipsis when cut."""
    return text if len(text) <= max_chars else text[: max_chars - 1] + "…"


def describe_example(example: dict[str, Any], max_chars: int = 80) -> str:
    """One line for an offending row, class or character, quoting texts clipped to `max_chars`."""
    if "character" in example:  # unknown to the base model's tokenizer
        return f"character {example['character']!r}: {example['count']} time(s)"
    if "row" in example:
        text = example["text"]
        quoted = "<null>" if text is None else json.dumps(clip(text, max_chars), ensure_ascii=False)
        where = f"row {example['row']}" + (f" of {example['file']}" if "file" in example else "")
        return f"{where} [label {example['label']!r}]: {quoted}"
    return f"class {example['label']!r}: {example['n_examples']} example(s)"


def format_failures(report: ValidationReport, rows_per_check: int = 3) -> str:
    """A multi-line message naming each failed check, its summary and a few offending examples."""
    failed = report.failed
    lines = [f"{len(failed)} of {len(report.checks)} data checks failed (rows are 0-based):"]
    for check in failed:
        lines.append(f"- {check.name}: {check.summary}")
        lines += [f"    {describe_example(e)}" for e in check.examples[:rows_per_check]]
    return "\n".join(lines)


# The report page is one file with its style inline and no script: it opens offline, from disk
# or a CI artifact, exactly as written.
_PAGE_STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 2rem auto; max-width: 70rem; color: #222; }
table { border-collapse: collapse; width: 100%; margin: 0.5rem 0 1.5rem; }
th, td { border: 1px solid #ccc; padding: 0.35rem 0.6rem; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
.passed { color: #116b2b; font-weight: 600; }
.failed { color: #b00020; font-weight: 600; }
ul { margin: 0.3rem 0 0; padding-left: 1.2rem; }
"""


def _verdict(success: bool) -> str:
    return '<span class="passed">passed</span>' if success else '<span class="failed">failed</span>'


def _check_row(check: CheckResult) -> str:
    examples = "".join(
        f"<li>{html.escape(describe_example(example))}</li>" for example in check.examples
    )
    detail = html.escape(check.summary) + (f"<ul>{examples}</ul>" if examples else "")
    return (
        f"<tr><td>{html.escape(check.name)}</td><td>{_verdict(check.success)}</td>"
        f"<td>{detail}</td></tr>"
    )


def describe_repairs(repairs: dict[str, int]) -> str:
    """One sentence counting each repair the params declared, or saying there were none."""
    done = [f"{name.replace('_', ' ')}: {count}" for name, count in repairs.items() if count]
    if not done:
        return "Repairs: none."
    return (
        f"Repairs (data.label_aliases, data.on_duplicates, data.on_test_overlap): "
        f"{'; '.join(done)}."
    )


def _repairs_paragraph(repairs: dict[str, int]) -> str:
    return f'<p id="repairs">{html.escape(describe_repairs(repairs))}</p>'


def render_html(report: ValidationReport) -> str:
    """The report as a self-contained HTML page: verdict, every check, and the class counts."""
    test_rows = "no test file" if report.n_test_rows is None else f"{report.n_test_rows} test rows"
    classes = "".join(
        f"<tr><td>{html.escape(label)}</td><td>{count}</td></tr>"
        for label, count in report.class_counts.items()
    )
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>textgate data validation: {"passed" if report.success else "failed"}</title>
<style>{_PAGE_STYLE}</style>
</head>
<body>
<h1>Data validation: {_verdict(report.success)}</h1>
<p>{len(report.checks) - len(report.failed)} of {len(report.checks)} checks passed on
{report.n_rows} train rows ({test_rows}); {len(report.labels)} labels
({html.escape(report.label_source)}). Rows are 0-based data rows.</p>
{_repairs_paragraph(report.repairs)}
<h2>Checks</h2>
<table id="checks">
<tr><th>check</th><th>result</th><th>detail</th></tr>
{"".join(map(_check_row, report.checks))}
</table>
<h2>Examples per class (train)</h2>
<table id="classes">
<tr><th>label</th><th>examples</th></tr>
{classes}
</table>
</body>
</html>
"""
