"""Repairs of the raw data that params declare: label aliases, dropped duplicates and dropped
train rows that overlap the test file. validate counts them and prepare applies them, both
through `repair_data`, so the two stages cannot disagree."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass

import pandas as pd

from textgate.config import DataConfig
from textgate.validation import text_key


@dataclass(frozen=True)
class Repairs:
    """Rows each declared repair changed (0: nothing to repair, or the policy is `fail`)."""

    train_relabelled: int = 0  # train rows whose label data.label_aliases mapped
    test_relabelled: int = 0  # the same in the test file
    duplicates_dropped: int = 0  # exact duplicate train rows (data.on_duplicates: drop)
    test_overlap_dropped: int = 0  # train rows whose text is in the test file (on_test_overlap)

    def as_dict(self) -> dict[str, int]:
        """The counts by name, as the validation report and prepare's stats record them."""
        return asdict(self)

    @property
    def total(self) -> int:
        return sum(self.as_dict().values())


def apply_label_aliases(
    frame: pd.DataFrame, aliases: Mapping[str, str]
) -> tuple[pd.DataFrame, int]:
    """The frame with each label found in `aliases` replaced, and how many rows changed."""
    if not aliases:
        return frame, 0
    mapped = frame["label"].map(lambda label: aliases.get(label, label) if label else label)
    changed = int((mapped != frame["label"]).sum())
    return frame.assign(label=mapped), changed


def in_texts(texts: pd.Series, others: Iterable[object]) -> pd.Series:
    """True where a text, normalised, is among `others` (normalised)."""
    keys = {key for key in map(text_key, others) if key is not None}
    return texts.map(lambda text: text_key(text) in keys).astype(bool)


def repair_data(
    train: pd.DataFrame, test: pd.DataFrame | None, data: DataConfig
) -> tuple[pd.DataFrame, pd.DataFrame | None, Repairs]:
    """Apply the repairs `data` declares to `text`/`label` frames, keeping the row index.

    Aliases first (in both files), then train rows in the test file, then exact duplicates
    (same text and label as an earlier row), so each dropped row is counted once.
    """
    train, train_relabelled = apply_label_aliases(train, data.label_aliases)
    test_relabelled = 0
    if test is not None:
        test, test_relabelled = apply_label_aliases(test, data.label_aliases)
    overlap_dropped = 0
    if test is not None and data.on_test_overlap == "drop":
        overlap = in_texts(train["text"], test["text"])
        overlap_dropped = int(overlap.sum())
        train = train[~overlap]
    duplicates_dropped = 0
    if data.on_duplicates == "drop":
        duplicate = train.duplicated(["text", "label"], keep="first")
        duplicates_dropped = int(duplicate.sum())
        train = train[~duplicate]
    repairs = Repairs(train_relabelled, test_relabelled, duplicates_dropped, overlap_dropped)
    return train, test, repairs
