"""Drift check: the serving request log since the last check vs production's training data.

Reads the log from the cursor saved in `<monitor.state_dir>/state.json`, reduces the new
records to a window, and compares it with the reference: the prepared train split
(`<prepare.output_dir>/train.parquet`), restricted to the texts the production model was
trained on (its `seen_texts.txt`), so a split re-prepared for a later candidate still gives
production's own data. The reference (label counts, lengths, embeddings of a seeded sample) is
cached per production model in `<monitor.state_dir>/reference/`.

The cursor only moves when a window was judged: with fewer than `monitor.min_requests` new
requests the window keeps growing until there are enough.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from textgate.artifacts import TRAINING_FILE, prepare_outputs
from textgate.config import Params
from textgate.drift import DriftReport, Profile, assess_drift
from textgate.errors import DataError, TextgateError
from textgate.io import read_json, write_json
from textgate.model import read_seen
from textgate.requestlog import REQUEST_LOG_ENV, LogCursor, LogWindow, read_window
from textgate.requestlog import request_log_path as service_request_log
from textgate.text import text_fingerprint

STATE_FILE = "state.json"
REFERENCE_DIR = "reference"
# Fewer training texts of the production model than this in the prepared split: no reference.
MIN_REFERENCE_TEXTS = 20

Status = Literal["no_production", "no_log", "not_enough_data", "no_drift", "drift"]


class MonitorError(TextgateError):
    """The drift check cannot be made: no model to load, or no reference to compare with."""


@dataclass(frozen=True)
class Reference:
    """Production's training data reduced for drift checks, and where it came from."""

    model_tag: str
    profile: Profile
    embeddings: np.ndarray  # (sample, hidden)
    source: str


@dataclass
class MonitorResult:
    """The outcome of one check; `message` says it in a sentence."""

    status: Status
    message: str
    log_path: Path
    min_requests: int
    model_tag: str | None = None
    window: LogWindow | None = None
    report: DriftReport | None = None
    reference: Reference | None = None
    notes: list[str] = field(default_factory=list)
    checked_at: datetime = field(default_factory=lambda: datetime.now(UTC))


def request_log_path(params: Params) -> Path:
    """`monitor.request_log`, else where the service writes it: `TEXTGATE_REQUEST_LOG`, else
    `$BENTOML_HOME/textgate/requests.jsonl` (BentoML's home defaults to ~/bentoml)."""
    if params.monitor.request_log is not None:
        return params.monitor.request_log
    home = os.environ.get("BENTOML_HOME", "").strip() or "~/bentoml"
    return service_request_log(Path(home).expanduser())


def load_state(params: Params) -> tuple[dict[str, Any], str | None]:
    """The monitor's saved state, and a note if it had to be discarded (unreadable)."""
    path = params.monitor.state_dir / STATE_FILE
    if not path.is_file():
        return {}, None
    try:
        state = read_json(path)
    except DataError as error:
        return {}, f"state file discarded, reading the log from the top: {error}"
    if not isinstance(state, dict):
        return {}, f"state file {path} is not a JSON object: discarded, reading from the top"
    return state, None


def _save_state(params: Params, state: dict[str, Any]) -> None:
    write_json(params.monitor.state_dir / STATE_FILE, state)


def production_model_dir(model_tag: str) -> Path:
    """The directory of `model_tag` in the BentoML model store.

    Raises:
        MonitorError: the model is not in the store (e.g. another BENTOML_HOME).
    """
    import bentoml
    from bentoml.exceptions import NotFound

    try:
        return Path(bentoml.models.get(model_tag).path)
    except NotFound:
        raise MonitorError(
            f"production model {model_tag} is not in the BentoML model store "
            f"(BENTOML_HOME={os.environ.get('BENTOML_HOME', '~/bentoml')}): cannot embed texts"
        ) from None


def _validation_abstention_rate(model_dir: Path) -> float | None:
    """1 - coverage on the validation split, from training.json; None without abstention."""
    abstention = read_json(model_dir / TRAINING_FILE).get("abstention") or {}
    if abstention.get("threshold") is None or abstention.get("coverage") is None:
        return None
    return 1.0 - float(abstention["coverage"])


def _reference_cache(params: Params, model_tag: str) -> Path:
    safe = model_tag.replace(":", "-").replace("/", "-")
    name = f"{safe}-n{params.monitor.sample_size}-seed{params.monitor.seed}.npz"
    return params.monitor.state_dir / REFERENCE_DIR / name


def _load_reference(path: Path, model_tag: str) -> Reference | None:
    try:
        with np.load(path, allow_pickle=False) as stored:
            meta = json.loads(str(stored["meta"]))
            rate = float(stored["abstention_rate"])
            profile = Profile(
                n=int(meta["n"]),
                label_counts=dict(zip(meta["labels"], meta["counts"], strict=True)),
                lengths=stored["lengths"],
                abstention_rate=None if np.isnan(rate) else rate,
            )
            return Reference(model_tag, profile, stored["embeddings"], meta["source"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # unreadable cache: rebuilt


def _save_reference(path: Path, reference: Reference) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    profile = reference.profile
    meta = {
        "n": profile.n,
        "labels": list(profile.label_counts),
        "counts": [int(count) for count in profile.label_counts.values()],
        "source": reference.source,
    }
    tmp = path.with_name(f".{path.name}.tmp.npz")
    rate = np.nan if profile.abstention_rate is None else profile.abstention_rate
    np.savez(
        tmp,
        meta=np.array(json.dumps(meta)),
        lengths=np.asarray(profile.lengths),
        embeddings=reference.embeddings,
        abstention_rate=np.array(rate),
    )
    os.replace(tmp, path)


def build_reference(
    params: Params, model_tag: str, model_dir: Path, embed: Callable[[list[str]], np.ndarray]
) -> Reference:
    """Production's training texts from the prepared split: counts, lengths, embedded sample.

    Raises:
        MonitorError: no prepared split, or too few of its texts trained the production model.
    """
    split = prepare_outputs(params).split("train")
    if not split.is_file():
        raise MonitorError(f"no reference: the prepared train split {split} is missing (dvc pull?)")
    frame = pd.read_parquet(split, columns=["text", "label"])
    seen = read_seen(model_dir)  # None or empty: the model did not record them
    source = f"{split} ({len(frame)} texts)"
    if seen:
        keep = frame["text"].map(lambda text: text_fingerprint(text) in seen)
        left_out = int((~keep).sum())
        frame = frame[keep]
        if left_out:
            source = (
                f"{split}: the {len(frame)} texts production model {model_tag} was trained on "
                f"({left_out} newer ones left out)"
            )
    if len(frame) < MIN_REFERENCE_TEXTS:
        raise MonitorError(
            f"no reference: only {len(frame)} texts of {split} trained production model "
            f"{model_tag} (at least {MIN_REFERENCE_TEXTS} needed); check out the data it was "
            "trained on (git checkout <its commit> && dvc checkout) and run the monitor again"
        )
    rng = np.random.default_rng(params.monitor.seed)
    size = min(params.monitor.sample_size, len(frame))
    sample = frame["text"].to_numpy()[rng.choice(len(frame), size=size, replace=False)]
    profile = Profile(
        n=len(frame),
        label_counts={str(k): int(v) for k, v in frame["label"].value_counts().items()},
        lengths=frame["text"].str.len().to_numpy(),
        abstention_rate=_validation_abstention_rate(model_dir),
    )
    return Reference(model_tag, profile, embed([str(text) for text in sample]), source)


def window_profile(window: LogWindow) -> Profile:
    return Profile(
        n=window.n,
        label_counts=dict(window.label_counts),
        lengths=np.asarray(window.lengths),
        abstention_rate=window.abstention_rate,
    )


def _describe_window(window: LogWindow) -> list[str]:
    notes = []
    if window.restart == "rotated":
        notes.append(
            "the log was rotated past its backups since the last check: read what they hold "
            "from the top; lines may have been missed (keep more serve.request_log_backups, "
            "or check more often)"
        )
    elif window.restart in ("truncated", "rewritten"):
        notes.append(f"the log was {window.restart} since the last check: read from the top")
    elif window.restart is None and window.files > 1:
        notes.append(
            f"the log was rotated since the last check: read on through its backups "
            f"({window.files} files)"
        )
    if window.malformed:
        examples = "; ".join(window.malformed_examples)
        notes.append(f"{window.malformed} malformed line(s) skipped ({examples})")
    return notes


def check_drift(
    params: Params,
    *,
    model_dir_for: Callable[[str], Path] = production_model_dir,
) -> MonitorResult:
    """Judge the requests logged since the last check; save the cursor once judged.

    Args:
        params: with paths resolved (see textgate.config.resolve_paths).
        model_dir_for: where a model tag's directory is (the BentoML store by default).

    Raises:
        MonitorError: the production model or the reference cannot be loaded.
    """
    from textgate.registry import Registry

    log_path = request_log_path(params)
    result = MonitorResult("no_production", "", log_path, params.monitor.min_requests)
    production = Registry(params.registry.path).production()
    if production is None:
        result.message = "no production model to monitor: run `textgate run` first"
        return result
    result.model_tag = production.model_tag
    state, note = load_state(params)
    if note:
        result.notes.append(note)
    new_cursor = _read_new_requests(params, state, result)
    if new_cursor is None:
        return result
    _judge_window(params, production.model_tag, model_dir_for(production.model_tag), result)
    state.update(
        cursor=new_cursor.to_dict(),
        checked_at=result.checked_at.isoformat(),
        status=result.status,
        model_tag=production.model_tag,
        requests=result.window.n,
    )
    _save_state(params, state)
    return result


def _read_new_requests(
    params: Params, state: dict[str, Any], result: MonitorResult
) -> LogCursor | None:
    """Read the log since the saved cursor into `result.window`; None when too little to judge.

    When it returns None, `result` already says why (no log, or not enough requests).
    """
    log_path, minimum = result.log_path, result.min_requests
    if not log_path.is_file():
        result.status = "no_log"
        result.message = (
            f"not enough data: no request log at {log_path} yet (0 requests < {minimum}); "
            f"the service writes it where {REQUEST_LOG_ENV} says"
        )
        return None
    cursor = LogCursor.from_dict(state.get("cursor")) if state.get("cursor") else None
    window, new_cursor = read_window(
        log_path, cursor, sample_size=params.monitor.sample_size, seed=params.monitor.seed
    )
    result.window = window
    result.notes += _describe_window(window)
    if window.n < minimum:
        result.status = "not_enough_data"
        skipped = f"; {window.malformed} malformed line(s) skipped" if window.malformed else ""
        result.message = (
            f"not enough data: {window.n} requests < {minimum} (monitor.min_requests) since "
            f"the last check{skipped}"
        )
        return None
    return new_cursor


def reference_and_encoder(
    params: Params, model_tag: str, model_dir: Path
) -> tuple[Reference, Callable[[list[str]], np.ndarray]]:
    """Production's reference (cached per model) and a function that embeds texts with its
    encoder (loaded once, on first use).

    Raises:
        MonitorError: no reference can be built.
    """
    from textgate.embeddings import SentenceEncoder

    encoder: SentenceEncoder | None = None

    def embed(texts: list[str]) -> np.ndarray:
        nonlocal encoder  # loaded once, and only when something needs embedding
        encoder = encoder or SentenceEncoder(model_dir)
        return encoder.encode(texts, params.monitor.batch_size)

    cache = _reference_cache(params, model_tag)
    reference = _load_reference(cache, model_tag) if cache.is_file() else None
    if reference is None:
        reference = build_reference(params, model_tag, model_dir, embed)
        _save_reference(cache, reference)
    return reference, embed


def _judge_window(params: Params, model_tag: str, model_dir: Path, result: MonitorResult) -> None:
    """Compare `result.window` with the production model's reference; fill in the verdict."""
    reference, embed = reference_and_encoder(params, model_tag, model_dir)
    result.reference = reference
    window = result.window
    report = assess_drift(
        reference.profile,
        window_profile(window),
        params.monitor,
        reference_embeddings=reference.embeddings,
        window_embeddings=embed(window.texts),
    )
    result.report = report
    result.status = "drift" if report.drifted else "no_drift"
    result.message = f"{report.summary()} in {window.n} requests"


def retrain_cooldown_left(params: Params, now: datetime) -> timedelta | None:
    """Time left before drift may trigger another training run; None when it may now."""
    state, _ = load_state(params)
    last = state.get("last_retrain_at")
    if not last:
        return None
    try:
        since = now - datetime.fromisoformat(last)
    except (TypeError, ValueError):
        return None
    left = timedelta(hours=params.monitor.retrain_cooldown_hours) - since
    return left if left > timedelta(0) else None


def record_retrain(params: Params, when: datetime, flow_run: str) -> None:
    """Remember a drift-triggered training run (for the cooldown)."""
    state, _ = load_state(params)
    state.update(last_retrain_at=when.isoformat(), last_retrain_flow_run=flow_run)
    _save_state(params, state)
