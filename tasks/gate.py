"""The promotion gate's work: read evaluate's outputs, score the production model on the same
test set, decide the verdict (textgate/gate.py), and keep the verdict as JSON files.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from textgate import artifacts
from textgate.config import Params
from textgate.errors import TextgateError
from textgate.gate import (
    Check,
    Verdict,
    champion_checks,
    class_recall_champion_checks,
    evaluate_gate,
    unseen_mask,
    worst_confusions,
)
from textgate.model import read_seen
from textgate.registry import Registry, Release

Log = Callable[[str], None]


class ChampionError(TextgateError):
    """The production model cannot be loaded from the BentoML model store."""


@dataclass(frozen=True)
class ChampionScores:
    """The production model's answers, and the fingerprints of the texts it was trained on."""

    labels: list[str]
    seen: set[str] | None  # None: a model saved before textgate recorded them
    known: list[str] | None = None  # the labels it was trained on


@dataclass(frozen=True)
class GateInputs:
    """What the evaluate stage wrote that the gate reads, one entry per test example."""

    metrics: artifacts.EvaluateMetrics
    per_class: artifacts.PerClass
    texts: list[str]
    labels: list[str]  # the true labels
    predicted: list[str]  # the candidate's best guess, abstained or not


@dataclass(frozen=True)
class ChampionComparison:
    """The production model's answers on the examples that compare fairly, or why none."""

    labels: list[str]
    candidate: list[str]
    champion: list[str] | None
    error: str | None = None
    excluded: int = 0
    new_data: str | None = None  # production was trained on other labels: why it is not compared
    behaviour: dict[str, Any] | None = None  # production's behavioural pass rates


def read_gate_inputs(params: Params) -> GateInputs:
    """Evaluate's metrics, per-class scores and predictions."""
    out = artifacts.evaluate_outputs(params)
    predictions = pd.read_parquet(out.predictions)
    return GateInputs(
        metrics=artifacts.read_artifact(artifacts.EvaluateMetrics, out.metrics),
        per_class=artifacts.read_artifact(artifacts.PerClass, out.per_class),
        texts=predictions["text"].tolist(),
        labels=predictions["label"].tolist(),
        predicted=predictions["predicted"].tolist(),
    )


def score_production(model_tag: str, texts: Sequence[str], batch_size: int) -> ChampionScores:
    """The production model's predicted label for each text (raw texts, cleaned as in training).

    Raises:
        ChampionError: the model is no longer in the store (e.g. another BENTOML_HOME) or its
            directory is not a textgate model.
    """
    import bentoml  # only when there is a production model to score
    from bentoml.exceptions import NotFound

    from textgate.runtime import load_classifier

    try:
        stored = bentoml.models.get(model_tag)
    except NotFound:
        raise ChampionError(
            f"production model {model_tag} is not in the BentoML model store; restore it, or "
            "promote a model that is (`textgate promote <bento>`)"
        ) from None
    try:
        classifier = load_classifier(stored.path)  # the runtime it is served with
    except (TextgateError, OSError, KeyError) as error:
        raise ChampionError(f"production model {model_tag} cannot be loaded: {error}") from None
    predictions = classifier.predict(list(texts), batch_size)
    # Its best guess, abstained or not, as the candidate's (predictions.parquet "predicted").
    labels = [p.best_label for p in predictions]
    return ChampionScores(labels=labels, seen=read_seen(stored.path), known=classifier.labels)


def _select(values: list[str], keep: list[bool]) -> list[str]:
    return [value for value, kept in zip(values, keep, strict=True) if kept]


def compare_with_production(
    inputs: GateInputs,
    production: Release | None,
    model_md5: str | None,
    batch_size: int,
    log: Log,
) -> ChampionComparison:
    """The production model's answers on the test examples it never trained on.

    When the production model is the candidate (same md5) its answers are the candidate's.
    """
    same = ChampionComparison(labels=inputs.labels, candidate=inputs.predicted, champion=None)
    if production is None:
        return same
    if model_md5 and production.lineage.get("model_md5") == model_md5:
        return ChampionComparison(inputs.labels, inputs.predicted, champion=inputs.predicted)
    log(f"scoring production model {production.model_tag} on the test set")
    try:
        scores = score_production(production.model_tag, inputs.texts, batch_size)
    except TextgateError as failure:
        return ChampionComparison(inputs.labels, inputs.predicted, None, error=str(failure))
    ours = sorted(inputs.per_class.root)
    if scores.known is not None and sorted(scores.known) != ours:
        added = sorted(set(ours) - set(scores.known))
        dropped = sorted(set(scores.known) - set(ours))
        reason = (
            f"production {production.model_tag} was trained on other labels (new data: "
            f"{len(added)} new, {len(dropped)} gone, e.g. {(added + dropped)[:3]}): first "
            "release on this data"
        )
        return ChampionComparison(inputs.labels, inputs.predicted, None, new_data=reason)
    # Only examples the production model never trained on compare fairly.
    keep = unseen_mask(inputs.texts, scores.seen)
    labels = _select(inputs.labels, keep)
    error = None
    if not labels:
        error = "the production model was trained on every example of this test set"
    return ChampionComparison(
        labels=labels,
        candidate=_select(inputs.predicted, keep),
        champion=_select(scores.labels, keep),
        error=error,
        excluded=len(keep) - sum(keep),
        behaviour=production.metrics.get("behaviour"),
    )


def decide(params: Params, inputs: GateInputs, model_md5: str | None, log: Log) -> Verdict:
    """Every offline check: floors, the production model, intents, calibration, behaviour.

    The production model (from the registry) is scored on the same test examples as the
    candidate; when it is the same model (same md5) its predictions are the candidate's.
    """
    production = Registry(params.registry.path).production()
    comparison = compare_with_production(
        inputs, production, model_md5, params.evaluate.batch_size, log
    )
    champion_tag = production.bento_tag if production else None
    checks: list[Check] = champion_checks(
        comparison.labels,
        comparison.candidate,
        comparison.champion,
        params.gate,
        champion_tag=champion_tag,
        champion_error=comparison.error,
        excluded=comparison.excluded,
        seed=params.evaluate.seed,
        new_data=comparison.new_data,
    )
    if comparison.champion is not None and comparison.error is None:
        checks += class_recall_champion_checks(
            comparison.labels, comparison.candidate, comparison.champion, params.gate
        )
    return evaluate_gate(
        inputs.metrics.model_dump(),
        inputs.per_class.model_dump(),
        params.gate,
        champion=checks,
        champion_tag=champion_tag,
        confusions=worst_confusions(inputs.labels, inputs.predicted),
        production_behaviour=comparison.behaviour,
    )


def write_verdict(verdict: Verdict, params: Params, run: dict[str, Any]) -> Path:
    """The verdict with the run's summary as JSON: `<time>.json`, and `latest.json`.

    `latest.json` is the newest, which `textgate status` shows. Returns its path.
    """
    payload = {**verdict.model_dump(mode="json"), "run": run}
    return artifacts.write_verdict(
        artifacts.verdict_outputs(params.registry), verdict.created_at, payload
    )


def failed_lines(verdict: Verdict) -> str:
    """The summary's lines of the checks that did not pass (an alert's body)."""
    return "\n".join(line for line in verdict.summary().splitlines() if "[pass]" not in line)


def already_in_production(params: Params, model_md5: str | None) -> Release | None:
    """The production release when it serves this very model (same md5), else None."""
    current = Registry(params.registry.path).production()
    if current is not None and model_md5 and current.lineage.get("model_md5") == model_md5:
        return current
    return None
