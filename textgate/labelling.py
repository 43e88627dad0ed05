"""The labelling loop's logic: which logged requests go to review, the formats they travel in,
the checks an import of labels passes, and the live-accuracy estimate.

Pure functions on plain data; `tasks/label.py` reads the request log and writes the files.

Selection (`select_for_review`): requests are de-duplicated by their normalised text
(`review_key`) and by what earlier exports already sent. A uniform random sample comes first
and is kept apart (its labels estimate live accuracy, so it must not be chosen by the model);
then abstentions, low-margin answers and the texts farthest from the training data
("novel"), each up to its quota, a text counted once under its first reason.

Formats: Label Studio's task import format (a JSON list of `{data, predictions}`), with a
CSV beside it (`text,label,suggested,reason,...`) for a spreadsheet; imports read Label
Studio's JSON export (`annotations[].result[].value.choices`) or a CSV with `text,label`.
"""

from __future__ import annotations

import csv
import io
import json
import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from xml.sax.saxutils import quoteattr

from textgate.errors import DataError
from textgate.text import normalise_text, text_fingerprint

Reason = Literal["random", "abstained", "low_margin", "novel"]
REASONS: tuple[Reason, ...] = ("random", "abstained", "low_margin", "novel")
# Label Studio's names of the choices control and the text object of `label_config`.
FROM_NAME = "intent"
TO_NAME = "text"
CSV_COLUMNS = ["text", "label", "suggested", "reason", "score", "model_tag", "request_id"]


def review_key(text: str) -> str:
    """What makes two texts the same for review: NFKC, collapsed whitespace, no case."""
    return text_fingerprint(normalise_text(text).casefold())


def margin_of(probabilities: Sequence[float]) -> float:
    """Top-1 minus top-2 probability (1.0 with a single class)."""
    top = sorted(probabilities, reverse=True)[:2]
    return float(top[0] - (top[1] if len(top) > 1 else 0.0))


@dataclass(frozen=True)
class Candidate:
    """One logged answer, as the review queue sees it."""

    text: str
    label: str  # as served ("unknown" when abstained)
    best_label: str
    score: float
    abstained: bool
    margin: float | None
    model_tag: str
    request_id: str | None = None
    novelty: float | None = None  # distance to the nearest training text (embedding space)

    @property
    def key(self) -> str:
        return review_key(self.text)


@dataclass(frozen=True)
class ReviewItem:
    candidate: Candidate
    reason: Reason


@dataclass(frozen=True)
class Quotas:
    """How many texts of each reason one export may hold."""

    random: int
    abstained: int
    low_margin: int
    novel: int
    low_margin_below: float = 0.2
    novelty_above: float | None = None  # None: no "novel" texts (no embedding available)

    @classmethod
    def from_shares(cls, total: int, shares: dict[str, float], **limits: Any) -> Quotas:
        counts = {reason: int(math.floor(total * shares[reason] + 1e-9)) for reason in REASONS}
        return cls(**counts, **limits)


def dedupe(candidates: Iterable[Candidate], seen: set[str]) -> list[Candidate]:
    """The candidates whose text is new (not in `seen`, not earlier in the list); the last
    answer of a text wins, as the freshest."""
    latest: dict[str, Candidate] = {}
    for candidate in candidates:
        key = candidate.key
        if key not in seen and normalise_text(candidate.text):
            latest.pop(key, None)
            latest[key] = candidate
    return list(latest.values())


def select_for_review(
    candidates: Sequence[Candidate], quotas: Quotas, seed: int
) -> list[ReviewItem]:
    """The review queue from de-duplicated candidates (see the module docstring)."""
    rng = random.Random(seed)
    pool = list(candidates)
    chosen: list[ReviewItem] = []
    taken: set[str] = set()

    def take(reason: Reason, ranked: Iterable[Candidate], limit: int) -> None:
        count = 0
        for candidate in ranked:
            if count >= limit:
                return
            if candidate.key not in taken:
                taken.add(candidate.key)
                chosen.append(ReviewItem(candidate, reason))
                count += 1

    take("random", rng.sample(pool, min(quotas.random, len(pool))), quotas.random)
    take(
        "abstained",
        sorted((c for c in pool if c.abstained), key=lambda c: c.score),
        quotas.abstained,
    )
    low = [
        c
        for c in pool
        if not c.abstained and c.margin is not None and c.margin < quotas.low_margin_below
    ]
    take("low_margin", sorted(low, key=lambda c: c.margin or 0.0), quotas.low_margin)
    if quotas.novelty_above is not None:
        far = [c for c in pool if c.novelty is not None and c.novelty > quotas.novelty_above]
        take("novel", sorted(far, key=lambda c: -(c.novelty or 0.0)), quotas.novel)
    return chosen


def label_config(labels: Sequence[str]) -> str:
    """Label Studio's labelling interface for single-choice intent labels."""
    choices = "\n".join(f"    <Choice value={quoteattr(label)}/>" for label in labels)
    return (
        "<View>\n"
        f'  <Text name="{TO_NAME}" value="$text"/>\n'
        f'  <Choices name="{FROM_NAME}" toName="{TO_NAME}" choice="single" showInline="false">\n'
        f"{choices}\n"
        "  </Choices>\n"
        "</View>\n"
    )


def to_tasks(items: Sequence[ReviewItem]) -> list[dict[str, Any]]:
    """Label Studio tasks: the text (and why it is there) under `data`, the model's answer as
    a prediction to accept or correct."""
    tasks = []
    for item in items:
        c = item.candidate
        prediction = {
            "model_version": c.model_tag,
            "score": round(c.score, 6),
            "result": [
                {
                    "from_name": FROM_NAME,
                    "to_name": TO_NAME,
                    "type": "choices",
                    "value": {"choices": [c.best_label]},
                }
            ],
        }
        data = {"text": c.text, "reason": item.reason, "served": c.label, "model_tag": c.model_tag}
        if c.request_id:
            data["request_id"] = c.request_id
        tasks.append({"data": data, "predictions": [prediction]})
    return tasks


def to_csv(items: Sequence[ReviewItem]) -> str:
    """The same queue as a CSV to fill in (`label` empty; `suggested` is the model's answer)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for item in items:
        c = item.candidate
        writer.writerow(
            [
                c.text,
                "",
                c.best_label,
                item.reason,
                f"{c.score:.4f}",
                c.model_tag,
                c.request_id or "",
            ]
        )
    return out.getvalue()


@dataclass(frozen=True)
class LabelledRow:
    """One labelled text as imported; `reason` and `served` come back from the export."""

    text: str
    label: str
    reason: str | None = None
    served: str | None = None
    model_tag: str | None = None
    where: str = ""  # "task 12" / "row 3", for messages


def _choice(annotation: dict[str, Any]) -> str | None:
    for result in annotation.get("result") or []:
        choices = (result.get("value") or {}).get("choices") or []
        if result.get("from_name", FROM_NAME) == FROM_NAME and choices:
            return str(choices[0])
    return None


def read_label_studio_export(payload: Any, source: str) -> tuple[list[LabelledRow], int]:
    """Rows from a Label Studio JSON export, and how many tasks had no usable annotation
    (skipped or cancelled: not labelled yet). The latest non-cancelled annotation wins.

    Raises:
        DataError: not a Label Studio export (a list of tasks with `data.text`).
    """
    if not isinstance(payload, list):
        raise DataError(f"{source}: not a Label Studio JSON export (expected a list of tasks)")
    rows, unlabelled = [], 0
    for index, task in enumerate(payload):
        data = task.get("data") if isinstance(task, dict) else None
        if not isinstance(data, dict) or not isinstance(data.get("text"), str):
            raise DataError(f"{source}: task {index} has no data.text: not a Label Studio export")
        annotations = [a for a in task.get("annotations") or [] if not a.get("was_cancelled")]
        labels = [label for label in map(_choice, annotations) if label]
        if not labels:
            unlabelled += 1
            continue
        rows.append(
            LabelledRow(
                text=data["text"],
                label=labels[-1],
                reason=data.get("reason"),
                served=data.get("served"),
                model_tag=data.get("model_tag"),
                where=f"task {task.get('id', index)}",
            )
        )
    return rows, unlabelled


def rows_from_table(frame: Any, source: str) -> tuple[list[LabelledRow], int]:
    """Rows from a table with `text` and `label` columns (a CSV filled in from the export's);
    rows with an empty label are not labelled yet and are counted, not imported.

    Raises:
        DataError: the `text` or `label` column is missing.
    """
    missing = [column for column in ("text", "label") if column not in frame.columns]
    if missing:
        raise DataError(
            f"{source}: missing column(s) {missing}; found {list(frame.columns)}. A CSV import "
            "needs `text` and `label` columns (as `textgate label export` writes them)"
        )
    rows, unlabelled = [], 0
    for index, record in enumerate(frame.to_dict("records")):
        text, label = record.get("text"), record.get("label")
        if not isinstance(label, str) or not label.strip():
            unlabelled += 1
            continue
        rows.append(
            LabelledRow(
                text=text if isinstance(text, str) else "",
                label=label,
                reason=record.get("reason") or None,
                served=record.get("suggested") or None,
                model_tag=record.get("model_tag") or None,
                where=f"row {index + 2}",  # the file's line (its header is line 1)
            )
        )
    return rows, unlabelled


@dataclass
class ImportReport:
    """What an import found; `rows` are those to write, the rest is reported."""

    rows: list[LabelledRow] = field(default_factory=list)
    unlabelled: int = 0
    empty: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)
    already_imported: list[str] = field(default_factory=list)
    unknown_labels: dict[str, list[str]] = field(default_factory=dict)
    new_labels: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        def some(items: list[str]) -> str:
            return ", ".join(items[:5]) + (" ..." if len(items) > 5 else "")

        out = [f"{len(self.rows)} labelled row(s) to import"]
        for name, items in (
            ("without a label (not labelled yet), skipped", self.unlabelled),
            ("with an empty text, skipped", self.empty),
            ("repeating an earlier row of this file, skipped", self.duplicates),
            ("with the same text labelled differently in this file, all skipped", self.conflicts),
            ("already imported in an earlier batch, skipped", self.already_imported),
        ):
            count = items if isinstance(items, int) else len(items)
            if count:
                out.append(
                    f"{count} row(s) {name}"
                    + ("" if isinstance(items, int) else f": {some(items)}")
                )
        if self.new_labels:
            out.append(f"new label(s) added: {self.new_labels}")
        return out


def check_import(
    rows: Sequence[LabelledRow],
    labels: Sequence[str],
    *,
    allow_new_labels: bool,
    already_imported: set[str],
) -> ImportReport:
    """Sort imported rows into those to write and those to report (see `ImportReport`).

    Raises:
        DataError: labels outside the label set without `allow_new_labels` (naming each and
            where it is), or nothing left to import.
    """
    report = ImportReport()
    known = set(labels)
    by_key: dict[str, list[LabelledRow]] = {}
    for row in rows:
        label = row.label.strip()
        row = LabelledRow(row.text, label, row.reason, row.served, row.model_tag, row.where)
        if not normalise_text(row.text):
            report.empty.append(row.where)
            continue
        if label not in known:
            report.unknown_labels.setdefault(label, []).append(row.where)
        by_key.setdefault(review_key(row.text), []).append(row)
    if report.unknown_labels and not allow_new_labels:
        detail = "; ".join(
            f"{label!r} ({', '.join(where[:3])})" for label, where in report.unknown_labels.items()
        )
        raise DataError(
            f"labels not in the model's label set: {detail}. Fix them, or pass "
            "--allow-new-labels to add new intents. Nothing was written."
        )
    report.new_labels = sorted(report.unknown_labels)
    for key, group in by_key.items():
        if len({row.label for row in group}) > 1:
            report.conflicts += [row.where for row in group]
        elif key in already_imported:
            report.already_imported.append(group[0].where)
        else:
            report.rows.append(group[0])
            report.duplicates += [row.where for row in group[1:]]
    if not report.rows:
        raise DataError("nothing to import: " + "; ".join(report.lines()[1:] or ["no rows"]))
    return report


@dataclass(frozen=True)
class LiveAccuracy:
    """Production accuracy estimated on the labelled random sample (Wilson interval)."""

    correct: int
    n: int
    low: float
    high: float
    confidence: float
    model_tag: str | None

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else float("nan")

    def line(self) -> str:
        return (
            f"live accuracy {self.accuracy:.3f} ({self.correct}/{self.n} labelled random "
            f"requests; {self.confidence:.0%} CI {self.low:.3f}-{self.high:.3f})"
        )


def wilson_interval(correct: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of a proportion: honest at small n and near 0 or 1."""
    from scipy.stats import norm

    if n == 0:
        return 0.0, 1.0
    z = float(norm.ppf(0.5 + confidence / 2))
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def live_accuracy(
    rows: Iterable[dict[str, Any]], model_tag: str | None, confidence: float = 0.95
) -> LiveAccuracy | None:
    """Accuracy of the answers as served (`served` vs the human `label`) on labelled random
    requests; only those served by `model_tag` when it is given. None when there are none."""
    pairs = [
        (str(row["served"]), str(row["label"]))
        for row in rows
        if row.get("served")
        and row.get("label")
        and (model_tag is None or row.get("model_tag") == model_tag)
    ]
    if not pairs:
        return None
    correct = sum(served == label for served, label in pairs)
    low, high = wilson_interval(correct, len(pairs), confidence)
    return LiveAccuracy(correct, len(pairs), low, high, confidence, model_tag)


def write_text_atomic(path: Path, text: str) -> None:
    from textgate.io import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def tasks_json(items: Sequence[ReviewItem]) -> str:
    return json.dumps(to_tasks(items), ensure_ascii=False, indent=1) + "\n"


def read_tasks(path: Path) -> list[dict[str, Any]]:
    """Tasks written by `tasks_json` (a JSON list)."""
    from textgate.io import read_json

    tasks = read_json(path)
    if not isinstance(tasks, list):
        raise DataError(f"{path}: not a list of Label Studio tasks")
    return tasks
