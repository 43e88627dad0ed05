"""What `textgate init` finds in a user's data file: its columns, classes, lengths, repairs to
declare and scripts; and the `data:` section of params.yaml that reads it."""

from __future__ import annotations

import re
import statistics
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import yaml

from textgate.errors import DataError
from textgate.repair import in_texts
from textgate.validation import suggest_label_aliases, text_key, token_lengths

# Column names that usually hold the text and the label, in order of preference.
TEXT_NAMES = ("text", "message", "utterance", "query", "sentence", "body", "content", "question")
LABEL_NAMES = ("label", "intent", "category", "class", "target", "topic", "queue", "tag")
# A label column has few distinct values: at most this share of the rows.
MAX_LABEL_DISTINCT_SHARE = 0.5
MAX_TOKENIZED_TEXTS = 20_000  # token lengths are measured on a sample this size at most


def _values(frame: pd.DataFrame, column: str) -> pd.Series:
    return frame[column].dropna().astype(str)


def _by_name(columns: Sequence[str], names: Sequence[str], taken: str | None) -> str | None:
    lowered = {str(column).strip().casefold(): column for column in columns if column != taken}
    return next((lowered[name] for name in names if name in lowered), None)


def guess_columns(
    frame: pd.DataFrame, text_column: str | None = None, label_column: str | None = None
) -> tuple[str, str, str]:
    """The text and label columns (given ones checked, else guessed) and why they were chosen.

    A column named like a text (`text`, `message`, ...) or a label (`label`, `intent`, ...)
    wins; else the text is the column with the longest values and the label the one with the
    fewest distinct values (at least 2, at most half the rows).

    Raises:
        DataError: a given column is missing, or no column looks like a text or a label.
    """
    columns = [str(column) for column in frame.columns]
    for given, option in ((text_column, "--text-column"), (label_column, "--label-column")):
        if given is not None and given not in columns:
            raise DataError(f"{option} {given!r} is not a column; found {columns}")
    reasons = []
    text = text_column or _by_name(columns, TEXT_NAMES, label_column)
    if text is None:
        lengths = {c: _values(frame, c).str.len().mean() for c in columns if c != label_column}
        text = max(lengths, key=lambda c: lengths[c] or 0, default=None)
        reasons.append(f"text: {text!r} has the longest values")
    else:
        reasons.append(f"text: {text!r} ({'given' if text_column else 'by its name'})")
    label = label_column or _by_name(columns, LABEL_NAMES, text)
    if label is None:
        distinct = {c: _values(frame, c).nunique() for c in columns if c != text}
        fits = {
            c: n for c, n in distinct.items() if 2 <= n <= MAX_LABEL_DISTINCT_SHARE * len(frame)
        }
        label = min(fits, key=lambda c: fits[c], default=None)
        reasons.append(f"label: {label!r} has the fewest distinct values")
    else:
        reasons.append(f"label: {label!r} ({'given' if label_column else 'by its name'})")
    if text is None or label is None:
        raise DataError(
            f"cannot tell which columns hold the text and the label among {columns}: "
            "pass --text-column and --label-column"
        )
    return text, label, "; ".join(reasons)


def script_of(char: str) -> str | None:
    """The Unicode script of a letter, by the first word of its name (LATIN, CJK -> Han)."""
    if not char.isalpha():
        return None
    name = unicodedata.name(char, "")
    first = name.split(" ", 1)[0]
    return {"CJK": "Han", "HIRAGANA": "Kana", "KATAKANA": "Kana"}.get(first, first.title())


def script_shares(texts: Sequence[str]) -> dict[str, float]:
    """Each script's share of the letters in `texts`, largest first (over 0.1% only)."""
    counts = Counter(script for text in texts for script in map(script_of, text) if script)
    total = sum(counts.values()) or 1
    return {script: n / total for script, n in counts.most_common() if n / total >= 0.001}


@dataclass(frozen=True)
class DataFacts:
    """What init found in the train file (and the test file), for the user to check."""

    rows: int
    class_sizes: dict[str, int]  # largest first
    duplicates: int  # rows with the same text and label as an earlier row
    conflicting_texts: int  # distinct texts seen with more than one label
    label_aliases: dict[str, str]  # suggested: variants by case or whitespace -> one label
    scripts: dict[str, float]
    token_lengths: list[int] = field(default_factory=list)  # of a sample; empty: not measured
    test_rows: int | None = None
    test_overlap: int = 0  # train rows whose text is in the test file
    test_only_labels: list[str] = field(default_factory=list)


def gather_facts(
    train: pd.DataFrame, test: pd.DataFrame | None, tokenizer: Any | None
) -> DataFacts:
    """Facts of `text`/`label` frames (as `textgate.io.read_labelled` returns them)."""
    keys = [k for k in map(text_key, train["text"]) if k is not None]
    labels = train["label"].dropna().astype(str)
    per_text = train.assign(key=train["text"].map(text_key)).groupby("key")["label"].nunique()
    lengths: list[int] = []
    if tokenizer is not None and keys:
        sample = pd.Series(keys).sample(min(len(keys), MAX_TOKENIZED_TEXTS), random_state=0)
        lengths = token_lengths(tokenizer, sample.tolist())
    facts = DataFacts(
        rows=len(train),
        class_sizes=dict(labels.value_counts().items()),
        duplicates=int(train.duplicated(["text", "label"]).sum()),
        conflicting_texts=int((per_text > 1).sum()),
        # Over both files: a variant may be spelt only in the test file.
        label_aliases=suggest_label_aliases(
            [*labels, *([] if test is None else test["label"].dropna().astype(str))]
        ),
        scripts=script_shares(keys),
        token_lengths=lengths,
    )
    if test is None:
        return facts
    return _with_test(facts, train, test)


def _with_test(facts: DataFacts, train: pd.DataFrame, test: pd.DataFrame) -> DataFacts:
    """`facts` with the test file's rows, its overlap with train and its unknown labels."""
    aliases = facts.label_aliases
    known = {aliases.get(label, label) for label in facts.class_sizes}
    found = {aliases.get(label, label) for label in test["label"].dropna().astype(str)}
    values = {**facts.__dict__, "test_rows": len(test), "test_only_labels": sorted(found - known)}
    values["test_overlap"] = int(in_texts(train["text"], test["text"]).sum())
    return DataFacts(**values)


@dataclass(frozen=True)
class Limits:
    """The params the facts are judged against (from params.yaml)."""

    min_examples_per_class: int
    max_duplicate_fraction: float
    max_truncated_fraction: float
    max_length: int
    base_model: str
    min_accuracy: float


def _sizes(sizes: dict[str, int], shown: int = 5) -> str:
    items = list(sizes.items())
    if len(set(sizes.values())) == 1:
        return f"each {items[0][1]} rows"
    head = ", ".join(f"{label} {n}" for label, n in items[:shown])
    tail = ", ".join(f"{label} {n}" for label, n in items[-shown:])
    return head if len(items) <= 2 * shown else f"largest {head}; smallest {tail}"


def _lengths(facts: DataFacts, limits: Limits) -> list[str]:
    lengths = sorted(facts.token_lengths)
    if not lengths:
        return [f"text lengths: not measured (train.base_model {limits.base_model} not loaded)"]
    cut = sum(n > limits.max_length for n in lengths) / len(lengths)
    line = (
        f"text lengths in tokens of {limits.base_model}: median "
        f"{statistics.median(lengths):.0f}, 95th percentile "
        f"{lengths[int(0.95 * (len(lengths) - 1))]}, max {lengths[-1]}; {cut:.1%} over "
        f"train.max_length={limits.max_length}"
    )
    if cut > limits.max_truncated_fraction:
        line += f" (over validate.max_truncated_fraction={limits.max_truncated_fraction})"
    return [line]


def describe_facts(facts: DataFacts, limits: Limits) -> list[str]:
    """The lines init prints about the data."""
    sizes = facts.class_sizes
    small = [label for label, n in sizes.items() if n < limits.min_examples_per_class]
    top = max(sizes.values(), default=0) / max(sum(sizes.values()), 1)
    scripts = ", ".join(f"{name} {share:.0%}" for name, share in facts.scripts.items())
    lines = [
        f"rows: {facts.rows}",
        f"classes: {len(sizes)} ({_sizes(sizes)})",
        f"largest class share: {top:.1%} (gate.min_accuracy {limits.min_accuracy:.0%})",
        *_lengths(facts, limits),
        f"exact duplicates: {facts.duplicates} rows ({facts.duplicates / max(facts.rows, 1):.1%}"
        f"); texts with more than one label: {facts.conflicting_texts}",
        f"scripts (share of letters): {scripts or 'no letters'}",
    ]
    if small:
        lines.append(
            f"classes under validate.min_examples_per_class={limits.min_examples_per_class}: "
            f"{', '.join(small[:10])}{' …' if len(small) > 10 else ''}"
        )
    if facts.label_aliases:
        lines.append(f"labels that differ only by case or spaces: {facts.label_aliases}")
    if facts.test_rows is not None:
        lines.append(
            f"test file: {facts.test_rows} rows; {facts.test_overlap} train rows have a text "
            f"that is also in it; labels not in the train file: {facts.test_only_labels or 'none'}"
        )
    return lines


# The comment each key of the `data:` section is written with.
DATA_COMMENTS = {
    "raw_dir": "immutable input; a DVC dependency of `validate` and `prepare`",
    "train_file": "CSV, TSV, JSON lines, Parquet or Excel inside raw_dir; + label batches",
    "test_file": "optional fixed test file inside raw_dir; null = split one off",
    "text_column": None,
    "label_column": None,
    "labels": "the declared label set; null = inferred and recorded",
    "out_of_scope_label": 'out-of-scope examples (e.g. oos), served as "unknown"; null = none',
    "encoding": "of CSV/TSV/JSON files, e.g. gb18030; null = detected per file",
    "label_aliases": "labels as written -> the label meant (variants by case or spaces)",
    "on_duplicates": "exact duplicate train rows: fail (over validate.max_duplicate_fraction)"
    " | drop",
    "on_test_overlap": "train rows whose text is in test_file: fail | drop (from training)",
}
_COMMENT_COLUMN = 39  # where params.yaml's end-of-line comments start


def _flow(value: Any) -> str:
    """`value` as one line of YAML (a scalar, or a flow-style list or mapping)."""
    text = yaml.safe_dump(value, default_flow_style=True, allow_unicode=True, width=1 << 20)
    return text.removesuffix("\n").removesuffix("\n...").strip()


def data_section(values: dict[str, Any], header: str) -> str:
    """The `data:` section of params.yaml holding `values`, each key with its comment.

    Args:
        values: every key of `DATA_COMMENTS`.
        header: comment lines (without `#`) written above the section.
    """
    lines = [f"# {line}".rstrip() for line in header.splitlines()] + ["data:"]
    for key, comment in DATA_COMMENTS.items():
        value = values[key]
        if isinstance(value, dict) and value:
            lines.append(f"  {key}:".ljust(_COMMENT_COLUMN) + f"# {comment}")
            lines += [f"    {_flow(k)}: {_flow(v)}" for k, v in value.items()]
            continue
        line = f"  {key}: {_flow(value)}"
        lines.append(line if comment is None else line.ljust(_COMMENT_COLUMN - 1) + f" # {comment}")
    return "\n".join(lines) + "\n"


INIT_MARK = "# textgate init"  # how the header comment init writes above `data:` starts
_TOP_LEVEL_KEY = re.compile(r"^[A-Za-z_][\w-]*\s*:")


def replace_section(text: str, name: str, section: str) -> str:
    """`text` (a params file) with its top-level section `name` (and a header init wrote
    above it) replaced by `section`; the rest of the file is kept byte for byte.

    Raises:
        DataError: the file has no such section.
    """
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if re.match(rf"{name}\s*:", line)), None)
    if start is None:
        raise DataError(f"the params file has no top-level `{name}:` section")
    end = next(
        (i for i in range(start + 1, len(lines)) if _TOP_LEVEL_KEY.match(lines[i])), len(lines)
    )
    # Comments and blank lines right above the next section belong to it.
    while end > start + 1 and (lines[end - 1].startswith("#") or not lines[end - 1].strip()):
        end -= 1
    while start > 0 and lines[start - 1].startswith(INIT_MARK):  # init's own header
        start -= 1
    return "".join(lines[:start]) + section + "".join(lines[end:])
