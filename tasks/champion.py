"""Score the production model (from the BentoML model store) on the candidate's test set."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import bentoml
from bentoml.exceptions import NotFound

from textgate.errors import TextgateError
from textgate.model import read_seen
from textgate.runtime import load_classifier


class ChampionError(TextgateError):
    """The production model cannot be loaded from the BentoML model store."""


@dataclass(frozen=True)
class ChampionScores:
    """The production model's answers, and the fingerprints of the texts it was trained on."""

    labels: list[str]
    seen: set[str] | None  # None: a model saved before textgate recorded them


def score_production(model_tag: str, texts: Sequence[str], batch_size: int) -> ChampionScores:
    """The production model's predicted label for each text (raw texts, cleaned as in training).

    Raises:
        ChampionError: the model is no longer in the store (e.g. another BENTOML_HOME) or its
            directory is not a textgate model.
    """
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
    return ChampionScores(labels=labels, seen=read_seen(stored.path))
