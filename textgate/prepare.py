"""Cleaning, de-duplication and stratified splitting of a labelled text table."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import pandas as pd
from sklearn.model_selection import train_test_split

from textgate.errors import DataError
from textgate.pii import PII_KINDS
from textgate.text import TextCleaning


@dataclass(frozen=True)
class CleanStats:
    """What cleaning changed: rows in and out, and PII replacements per kind."""

    rows_in: int
    rows_out: int
    duplicates_dropped: int
    empty_dropped: int
    pii_redacted: dict[str, int] = field(default_factory=dict)


def clean_frame(frame: pd.DataFrame, cleaning: TextCleaning) -> tuple[pd.DataFrame, CleanStats]:
    """Clean every text as `cleaning` says, then drop empty rows and exact duplicates.

    Args:
        frame: columns `text` and `label`.
        cleaning: normalisation, Chinese script and PII redaction (textgate.text).
    """
    pii: Counter[str] = Counter()
    texts = []
    for text in frame["text"].astype(str):
        text, counts = cleaning.clean(text)
        pii.update(counts)
        texts.append(text)
    cleaned = pd.DataFrame({"text": texts, "label": frame["label"].astype(str).to_numpy()})
    non_empty = cleaned[cleaned["text"] != ""]
    deduplicated = non_empty.drop_duplicates(subset=["text", "label"]).reset_index(drop=True)
    stats = CleanStats(
        rows_in=len(frame),
        rows_out=len(deduplicated),
        duplicates_dropped=len(non_empty) - len(deduplicated),
        empty_dropped=len(cleaned) - len(non_empty),
        pii_redacted={kind: pii.get(kind, 0) for kind in PII_KINDS},
    )
    return deduplicated, stats


def stratified_split(
    frame: pd.DataFrame, fractions: dict[str, float], seed: int
) -> dict[str, pd.DataFrame]:
    """Split rows into named parts with the label distribution kept in each part.

    Args:
        frame: columns `text` and `label`.
        fractions: e.g. {"val": 0.1, "test": 0.15}; the rest becomes "train".
        seed: makes the split reproducible.

    Raises:
        DataError: a class has too few rows to appear in every part.
    """
    counts = frame["label"].value_counts()
    needed = len(fractions) + 1
    too_small = counts[counts < needed]
    if not too_small.empty:
        raise DataError(
            f"cannot split: classes with fewer than {needed} examples: {too_small.to_dict()}"
        )
    parts: dict[str, pd.DataFrame] = {}
    rest = frame
    remaining = 1.0
    for name, fraction in fractions.items():
        share = fraction / remaining
        try:
            rest, part = train_test_split(
                rest, test_size=share, stratify=rest["label"], random_state=seed
            )
        except ValueError:
            # Too few rows per class for an exactly stratified cut: fall back to one row of
            # each class in the part, then a random share of the remainder.
            part = rest.groupby("label", group_keys=False).sample(n=1, random_state=seed)
            rest = rest.drop(part.index)
        parts[name] = part.sort_index().reset_index(drop=True)
        remaining -= fraction
    parts["train"] = rest.sort_index().reset_index(drop=True)
    return {"train": parts["train"], **{name: parts[name] for name in fractions}}
