"""Score the production model (from the BentoML model store) on the candidate's test set."""

from __future__ import annotations

from collections.abc import Sequence

import bentoml
from bentoml.exceptions import NotFound

from textgate.errors import TextgateError
from textgate.model import TextClassifier


class ChampionError(TextgateError):
    """The production model cannot be loaded from the BentoML model store."""


def score_production(model_tag: str, texts: Sequence[str], batch_size: int = 64) -> list[str]:
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
        classifier = TextClassifier(stored.path)
    except (TextgateError, OSError, KeyError) as error:
        raise ChampionError(f"production model {model_tag} cannot be loaded: {error}") from None
    return [prediction.label for prediction in classifier.predict(list(texts), batch_size)]
