"""The textgate HTTP service: `POST /classify` over one model from the BentoML model store.

Which model: the bento argument `model_tag`, which `tasks.package` sets to the exact tag it
has just saved, so it is recorded in the bento and restored whenever that bento is served
(a newer model saved later does not change what an existing bento serves). Without the
argument (serving from source while developing) the tag comes from `TEXTGATE_MODEL_TAG`, and
else is `textgate-classifier:latest`.

Pre- and post-processing are `textgate.model.TextClassifier`: the same cleaning,
tokenisation and label mapping as evaluation, so serving cannot drift from training.
"""

from __future__ import annotations

import os
from typing import Annotated

import bentoml
import torch
from pydantic import AfterValidator, BaseModel, Field

from textgate.model import TextClassifier

MODEL_TAG_ENV = "TEXTGATE_MODEL_TAG"
TORCH_THREADS_ENV = "TEXTGATE_TORCH_THREADS"
# Used only when serving from source with neither the bento argument nor the variable set;
# keep it equal to package.model_name in params.yaml (not read here: a bento has no params).
DEV_MODEL_TAG = "textgate-classifier:latest"
# Small by default: one worker batching requests, next to other processes on the host; a
# dedicated machine can raise it. More threads than cores only adds contention.
DEFAULT_TORCH_THREADS = 2

# Request limits: they bound the tokenizer and model work one request can cause. Texts are
# truncated to the model's max_length tokens anyway, so longer input carries no signal.
MAX_TEXTS_PER_REQUEST = 64
MAX_TEXT_CHARS = 2000


def _not_blank(text: str) -> str:
    if not text.strip():
        raise ValueError("text must contain at least one non-whitespace character")
    return text


Text = Annotated[str, Field(min_length=1, max_length=MAX_TEXT_CHARS), AfterValidator(_not_blank)]
Texts = Annotated[list[Text], Field(min_length=1, max_length=MAX_TEXTS_PER_REQUEST)]


class Classification(BaseModel):
    """The predicted label for one text and its probability."""

    label: str
    score: float = Field(ge=0.0, le=1.0)


def configured_model_tag() -> str:
    """The model this service serves: bento argument, then environment, then latest (dev)."""
    arguments = bentoml.use_arguments()
    return getattr(arguments, "model_tag", None) or os.environ.get(MODEL_TAG_ENV) or DEV_MODEL_TAG


def _check_recorded_in_bento(tag: str) -> None:
    """Refuse to serve a model other than the one the bento was built with.

    A bento built by hand without `--arg model_tag=...` would otherwise resolve `latest`
    again at serve time and silently serve whatever model was saved last.
    """
    bento = TextgateService.bento  # set by BentoML when serving a built bento, else None
    if bento is None:
        return
    recorded = sorted(str(model.tag) for model in bento.info.all_models)
    if tag not in recorded:
        raise RuntimeError(
            f"bento {bento.tag} was built with model(s) {recorded} but would serve {tag}; "
            "build it with `--arg model_tag=<name:version>` (tasks.package does)"
        )


@bentoml.service(name="textgate", workers=1, traffic={"timeout": 30})
class TextgateService:
    """Classify short support texts with a textgate model."""

    model_ref = bentoml.models.BentoModel(configured_model_tag())

    def __init__(self) -> None:
        torch.set_num_threads(int(os.environ.get(TORCH_THREADS_ENV, DEFAULT_TORCH_THREADS)))
        stored = self.model_ref  # resolved from the model store: a bentoml Model
        self.model_tag = str(stored.tag)
        _check_recorded_in_bento(self.model_tag)
        self.classifier = TextClassifier(stored.path)

    # Adaptive batching: requests are validated one by one (the limits above), then their
    # lists are concatenated along dimension 0, classified together and split back in order.
    @bentoml.api(batchable=True, batch_dim=0, max_batch_size=128, max_latency_ms=10_000)
    def classify(self, texts: Texts) -> list[Classification]:
        """Classify each text; one result per text, in the order given."""
        predictions = self.classifier.predict(texts)
        return [Classification(label=p.label, score=p.score) for p in predictions]
