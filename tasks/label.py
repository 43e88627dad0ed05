"""The labelling loop's steps on a workspace: export a review queue from the request log,
import labels as a new batch of training data, and estimate live accuracy.

State lives in `label.state_dir`: `state.json` (the cursor into the request log, where the
last export ended) and `exported.txt` (the review keys of every text exported, so a text is
sent to review once). Batches are written under `data.raw_dir`: `label.batch_dir/<time>.csv`
(read by `data.train_file`'s glob, so the next pipeline run retrains) and, for the labelled
random sample, `label.live_dir/<time>.csv` (held out of training for `label.holdout_days`,
then moved into the batches). Imports take an exclusive lock, so two at once never
interleave; a batch file is written whole (atomically) or not at all.
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tasks.monitor import production_model_dir, request_log_path
from textgate import labelling as lab
from textgate.artifacts import RequestRecord, ValidatedLabels, read_artifact, validate_outputs
from textgate.config import Params
from textgate.errors import DataError, TextgateError
from textgate.io import atomic_path, read_json, read_table, read_training, write_json
from textgate.requestlog import LogCursor, read_window

STATE_FILE = "state.json"
EXPORTED_FILE = "exported.txt"
LOCK_FILE = "import.lock"
STAMP = "%Y%m%dT%H%M%S%fZ"
# At most this many candidates are embedded to find novel texts (a random subset beyond).
MAX_EMBEDDED = 2000
LIVE_COLUMNS = ["text", "label", "served", "model_tag", "imported_at"]


class NothingToReview(TextgateError):
    """The request log holds no new text to review (a normal outcome, not a failure)."""


@dataclass
class ExportResult:
    tasks_path: Path
    csv_path: Path
    counts: dict[str, int]
    requests_read: int
    candidates: int
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def line(self) -> str:
        mix = ", ".join(f"{reason} {count}" for reason, count in self.counts.items())
        return (
            f"exported {self.total} text(s) for review ({mix}) from {self.requests_read} "
            f"request(s) ({self.candidates} new distinct text(s)) to {self.tasks_path} "
            f"and {self.csv_path}"
        )


def _state_path(params: Params) -> Path:
    return params.label.state_dir / STATE_FILE


def _load_state(params: Params) -> dict[str, Any]:
    path = _state_path(params)
    try:
        state = read_json(path) if path.is_file() else {}
    except DataError:
        state = {}  # unreadable: exported.txt still keeps texts from being sent twice
    return state if isinstance(state, dict) else {}


def _exported_keys(params: Params) -> set[str]:
    path = params.label.state_dir / EXPORTED_FILE
    if not path.is_file():
        return set()
    return set(path.read_text(encoding="utf-8").split())


def _read_candidates(params: Params, state: dict[str, Any]) -> tuple[list[lab.Candidate], Any, Any]:
    """Every record logged since the export cursor, as candidates; the window and new cursor.

    Raises:
        NothingToReview: no request log, or nothing readable in it since the last export.
    """
    log = request_log_path(params)
    if not log.is_file():
        raise NothingToReview(f"nothing to review: no request log at {log} (serve traffic first)")
    records: list[RequestRecord] = []
    cursor = LogCursor.from_dict(state.get("cursor")) if state.get("cursor") else None
    window, new_cursor = read_window(log, cursor, sample_size=1, on_record=records.append)
    if not records:
        bad = f" ({window.malformed} malformed line(s) skipped)" if window.malformed else ""
        raise NothingToReview(
            f"nothing to review: no new request in {log} since the last export{bad}"
        )
    candidates = [
        lab.Candidate(
            text=r.text,
            label=r.label,
            best_label=r.best_label,
            score=r.score,
            abstained=r.abstained,
            margin=r.margin,
            model_tag=r.model_tag,
            request_id=r.request_id,
        )
        for r in records
    ]
    return candidates, window, new_cursor


def knn_novelty(
    candidates: list[lab.Candidate],
    reference: np.ndarray,
    embed: Callable[[list[str]], np.ndarray],
    quantile: float,
    seed: int,
) -> tuple[list[lab.Candidate], float]:
    """Each candidate with its distance to the nearest training text (cosine, embeddings are
    L2-normalised), and the threshold: the `quantile` of the training texts' own distance to
    their nearest other training text. Beyond it, a text is in a region training did not cover.
    """
    rng = np.random.default_rng(seed)
    chosen = np.arange(len(candidates))
    if len(chosen) > MAX_EMBEDDED:
        chosen = np.sort(rng.choice(len(candidates), MAX_EMBEDDED, replace=False))
    vectors = embed([candidates[i].text for i in chosen])
    distances = 1.0 - (vectors @ reference.T).max(axis=1)
    own = 1.0 - reference @ reference.T
    np.fill_diagonal(own, np.inf)
    threshold = float(np.quantile(own.min(axis=1), quantile))
    out = list(candidates)
    for i, distance in zip(chosen, distances, strict=True):
        out[i] = lab.Candidate(**{**candidates[i].__dict__, "novelty": float(distance)})
    return out, threshold


def _with_novelty(
    params: Params, candidates: list[lab.Candidate], notes: list[str]
) -> tuple[list[lab.Candidate], float | None]:
    """Novelty scores from the production model's encoder; (candidates, None) without one."""
    from tasks.monitor import reference_and_encoder
    from textgate.registry import Registry

    production = Registry(params.registry.path).production()
    if production is None or params.label.novel_share == 0:
        return candidates, None
    try:
        reference, embed = reference_and_encoder(
            params, production.model_tag, production_model_dir(production.model_tag)
        )
    except TextgateError as error:
        notes.append(f"no novel texts selected: {error}")
        return candidates, None
    return knn_novelty(
        candidates, reference.embeddings, embed, params.label.novelty_quantile, params.label.seed
    )


def export_for_review(params: Params, out: Path) -> ExportResult:
    """Write the review queue (Label Studio tasks at `out`, a CSV beside it) from the requests
    logged since the last export, and move the cursor past them.

    Raises:
        NothingToReview: no new request, or every new text was exported before.
    """
    release_expired_live(params)
    state = _load_state(params)
    candidates, window, new_cursor = _read_candidates(params, state)
    exported = _exported_keys(params)
    pool = lab.dedupe(candidates, exported)
    notes = [f"{window.malformed} malformed line(s) skipped"] if window.malformed else []
    if not pool:
        _save_cursor(params, state, new_cursor)
        raise NothingToReview(
            f"nothing to review: the {len(candidates)} new request(s) repeat texts already exported"
        )
    pool, novelty_above = _with_novelty(params, pool, notes)
    shares = {r: getattr(params.label, f"{r}_share") for r in lab.REASONS}
    quotas = lab.Quotas.from_shares(
        params.label.max_tasks,
        shares,
        low_margin_below=params.label.low_margin,
        novelty_above=novelty_above,
    )
    # The random sample is its share of what there is: a small window is not all "random".
    random_quota = int(min(params.label.max_tasks, len(pool)) * params.label.random_share)
    quotas = dataclasses.replace(quotas, random=random_quota)
    items = lab.select_for_review(pool, quotas, params.label.seed)
    if not items:
        _save_cursor(params, state, new_cursor)
        raise NothingToReview(
            f"nothing to review: none of {len(pool)} new text(s) matched a reason"
        )
    csv_path = (
        out.with_suffix(".csv") if out.suffix != ".csv" else out.with_name(out.stem + ".tasks.csv")
    )
    lab.write_text_atomic(out, lab.tasks_json(items))
    lab.write_text_atomic(csv_path, lab.to_csv(items))
    keys = "".join(f"{item.candidate.key}\n" for item in items)
    params.label.state_dir.mkdir(parents=True, exist_ok=True)
    with (params.label.state_dir / EXPORTED_FILE).open("a", encoding="utf-8") as handle:
        handle.write(keys)
    _save_cursor(params, state, new_cursor)
    counts = {reason: sum(item.reason == reason for item in items) for reason in lab.REASONS}
    return ExportResult(out, csv_path, counts, window.n, len(pool), notes)


def _save_cursor(params: Params, state: dict[str, Any], cursor: LogCursor) -> None:
    state.update(cursor=cursor.to_dict(), exported_at=datetime.now(UTC).isoformat())
    write_json(_state_path(params), state)


@contextmanager
def import_lock(params: Params) -> Iterator[None]:
    """One import at a time per workspace (an exclusive flock, released by the kernel on exit)."""
    params.label.state_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(params.label.state_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def read_labels_file(path: Path) -> tuple[list[lab.LabelledRow], int]:
    """Labelled rows of a Label Studio JSON export or a CSV/Parquet table with text,label."""
    if path.suffix.lower() == ".json":
        return lab.read_label_studio_export(read_json(path), str(path))
    return lab.rows_from_table(read_table(path), str(path))


def label_set(params: Params) -> list[str]:
    """The labels imports are checked against: declared, else the last validated set, else
    the labels of the training files."""
    if params.data.labels is not None:
        return list(params.data.labels)
    report = validate_outputs(params).report
    if report.is_file():
        try:
            return read_artifact(ValidatedLabels, report).labels
        except (DataError, ValueError):
            pass
    return sorted({str(v).strip() for v in read_training(params.data)["label"].dropna()})


def _known_keys(params: Params) -> set[str]:
    """Review keys of every text already in the training files, batches and live sample."""
    keys = {lab.review_key(str(t)) for t in read_training(params.data)["text"].dropna()}
    for folder in (params.label.live_dir, params.label.batch_dir):
        for path in sorted((params.data.raw_dir / folder).glob("*.csv")):
            frame = read_table(path)
            column = "text" if "text" in frame.columns else params.data.text_column
            keys |= {lab.review_key(str(t)) for t in frame[column].dropna()}
    return keys


@dataclass
class ImportResult:
    report: lab.ImportReport
    batch: Path | None
    live: Path | None

    def lines(self) -> list[str]:
        out = self.report.lines()
        if self.batch:
            out.append(f"wrote training batch {self.batch}")
        if self.live:
            out.append(f"wrote live-accuracy sample {self.live} (held out of training)")
        return out


def _fresh(directory: Path, now: datetime) -> Path:
    """A new file name in `directory` that no earlier import used."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{now:{STAMP}}.csv"
    index = 1
    while path.exists():
        path = directory / f"{now:{STAMP}}-{index}.csv"
        index += 1
    return path


def import_labels(
    params: Params, rows: list[lab.LabelledRow], unlabelled: int, *, allow_new_labels: bool
) -> ImportResult:
    """Check labelled rows and write them as a new batch (and live sample); all or nothing.

    Raises:
        DataError: unknown labels (without `allow_new_labels`) or nothing new to import.
    """
    with import_lock(params):
        now = datetime.now(UTC)
        release_expired_live(params, now)
        report = lab.check_import(
            rows,
            label_set(params),
            allow_new_labels=allow_new_labels,
            already_imported=_known_keys(params),
        )
        report.unlabelled = unlabelled
        data = params.data
        live = [row for row in report.rows if row.reason == "random" and row.served]
        train = [row for row in report.rows if not (row.reason == "random" and row.served)]
        batch_path = live_path = None
        if train:
            frame = pd.DataFrame(
                {
                    data.text_column: [r.text for r in train],
                    data.label_column: [r.label for r in train],
                }
            )
            batch_path = _fresh(data.raw_dir / params.label.batch_dir, now)
            with atomic_path(batch_path) as tmp:
                frame.to_csv(tmp, index=False)
        if live:
            frame = pd.DataFrame(
                [[r.text, r.label, r.served, r.model_tag or "", now.isoformat()] for r in live],
                columns=LIVE_COLUMNS,
            )
            live_path = _fresh(data.raw_dir / params.label.live_dir, now)
            with atomic_path(live_path) as tmp:
                frame.to_csv(tmp, index=False)
        return ImportResult(report, batch_path, live_path)


def _stamp_of(path: Path) -> datetime | None:
    try:
        return datetime.strptime(path.stem.split("-")[0], STAMP).replace(tzinfo=UTC)
    except ValueError:
        return None


def release_expired_live(params: Params, now: datetime | None = None) -> list[Path]:
    """Move live samples older than `label.holdout_days` into the training batches."""
    now = now or datetime.now(UTC)
    live_dir = params.data.raw_dir / params.label.live_dir
    released = []
    for path in sorted(live_dir.glob("*.csv")):
        stamp = _stamp_of(path)
        if stamp is None or now - stamp < timedelta(days=params.label.holdout_days):
            continue
        frame = read_table(path)
        data = params.data
        batch = params.data.raw_dir / params.label.batch_dir / f"live-{path.name}"
        batch.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(batch) as tmp:
            pd.DataFrame(
                {data.text_column: frame["text"], data.label_column: frame["label"]}
            ).to_csv(tmp, index=False)
        path.unlink()
        released.append(batch)
    return released


def live_rows(params: Params) -> list[dict[str, Any]]:
    """Every labelled random request still held out (the live-accuracy sample)."""
    rows: list[dict[str, Any]] = []
    for path in sorted((params.data.raw_dir / params.label.live_dir).glob("*.csv")):
        try:
            rows += read_table(path).to_dict("records")
        except DataError:
            continue
    return rows


def production_live_accuracy(params: Params) -> tuple[lab.LiveAccuracy | None, str]:
    """Live accuracy of the production model, and a sentence for status and reports."""
    from textgate.registry import Registry

    production = Registry(params.registry.path).production()
    rows = live_rows(params)
    if production is None:
        return None, "live accuracy: no production model"
    estimate = lab.live_accuracy(rows, production.model_tag, params.gate.confidence)
    if estimate is None:
        others = len(rows)
        return None, (
            f"live accuracy: no labelled random request served by {production.model_tag} yet"
            + (f" ({others} for earlier models)" if others else "")
            + " (`textgate label export`, label the `random` ones, `textgate label import`)"
        )
    return estimate, estimate.line()
