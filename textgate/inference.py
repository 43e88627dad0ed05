"""Inference without PyTorch: what every runtime shares, from token ids to answers.

The predictions and explanations of a model directory follow from one function, a runtime's
`logits_from_ids`: cleaning, tokenisation, batching, calibration, abstention and occlusion
live here, with numpy only, so that CPU serving (textgate.runtime's ONNX Runtime classifier)
imports neither torch nor transformers. textgate.model adds the PyTorch runtime and training
helpers, and re-exports these names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from textgate.artifacts import LABEL_MAP_FILE, TRAINING_FILE
from textgate.errors import DataError
from textgate.io import read_json
from textgate.stats import softmax
from textgate.text import TextCleaning
from textgate.unknown import load_detector

# The label of a prediction whose calibrated confidence is below the abstention threshold.
UNKNOWN_LABEL = "unknown"
# Occlusion runs one forward pass per token: bound the text an explanation may ask for.
MAX_EXPLAIN_CHARS = 500


class Tokenizer(Protocol):
    """The part of a transformers tokenizer inference uses (textgate.tokenizer.FastTokenizer
    implements it without transformers).

    Called with one text or a list of texts (and `truncation=True, max_length=...`,
    optionally `return_special_tokens_mask=True`), it returns a mapping with `input_ids`,
    `attention_mask`, `token_type_ids` (when the model takes them) and, when asked,
    `special_tokens_mask`: one list of ints per text, or one list for one text.
    """

    pad_token_id: int | None
    mask_token_id: int | None

    def __call__(self, text: Any, **kwargs: Any) -> Any: ...

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]: ...


@dataclass(frozen=True)
class Prediction:
    """One text's predicted label and its probability.

    `score` is the calibrated probability of `best_label`, the most probable label. `label` is
    `best_label`, or `UNKNOWN_LABEL` when the classifier abstained (its unknown rule fired).
    `best_label` defaults to `label`, so `Prediction(label=..., score=...)` means no abstention.
    """

    label: str
    score: float
    abstained: bool = False
    best_label: str = ""
    margin: float | None = None  # top-1 minus top-2 probability (the labelling loop's "close call")

    def __post_init__(self) -> None:
        if not self.best_label:
            object.__setattr__(self, "best_label", self.label)


@dataclass(frozen=True)
class Explanation:
    """Which tokens a prediction rests on, by occlusion.

    `attributions[i]` is p(best_label | text) - p(best_label | text with `tokens[i]` masked),
    with calibrated probabilities: positive where the token supports the prediction.
    """

    label: str
    score: float
    abstained: bool
    tokens: list[str] = field(default_factory=list)  # wordpieces, without [CLS] / [SEP]
    attributions: list[float] = field(default_factory=list)  # one per token
    best_label: str = ""

    def __post_init__(self) -> None:
        if not self.best_label:
            object.__setattr__(self, "best_label", self.label)


def length_sorted_batches(texts: Sequence[str], batch_size: int) -> Iterator[np.ndarray]:
    """Indices of `texts` in batches of similar length, so each batch pads little.

    The caller writes each batch's results at its indices, which restores the input order.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = np.argsort([len(text) for text in texts], kind="stable")
    for start in range(0, len(texts), batch_size):
        yield order[start : start + batch_size]


# (input_ids, attention_mask, token_type_ids or None), each (batch, tokens) -> (batch, labels)
LogitsFromIds = Callable[[np.ndarray, np.ndarray, np.ndarray | None], np.ndarray]
# The same inputs -> (logits (batch, labels), pooled embedding (batch, hidden)).
ForwardFromIds = Callable[
    [np.ndarray, np.ndarray, np.ndarray | None], tuple[np.ndarray, np.ndarray]
]


def batched_logits(
    tokenizer: Tokenizer,
    texts: Sequence[str],
    max_length: int,
    batch_size: int,
    logits_from_ids: LogitsFromIds,
    num_labels: int,
) -> np.ndarray:
    """Raw class scores, (len(texts), num_labels) float32, for already-cleaned texts.

    The one tokenize-and-batch path of training, evaluation and serving: the texts are
    tokenized once (truncated to `max_length`), sorted by token count and run in batches of at
    most `batch_size`, each padded to its longest text only; the rows come back in input order.
    """
    (logits,) = batched_outputs(
        tokenizer,
        texts,
        max_length,
        batch_size,
        lambda *ids: (logits_from_ids(*ids),),
        (num_labels,),
    )
    return logits


def batched_outputs(
    tokenizer: Tokenizer,
    texts: Sequence[str],
    max_length: int,
    batch_size: int,
    outputs_from_ids: Callable[..., tuple[np.ndarray, ...]],
    widths: Sequence[int],
) -> tuple[np.ndarray, ...]:
    """`batched_logits` for a forward pass with several outputs, (batch, widths[i]) each."""
    out = tuple(np.empty((len(texts), width), dtype=np.float32) for width in widths)
    if not texts:
        return out
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    encoded = tokenizer(list(texts), truncation=True, max_length=max_length)
    ids: list[list[int]] = encoded["input_ids"]
    types: list[list[int]] | None = encoded.get("token_type_ids")
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    order = np.argsort(lengths, kind="stable")
    pad_id = tokenizer.pad_token_id or 0
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        width = int(lengths[index].max())
        input_ids = np.full((len(index), width), pad_id, dtype=np.int64)
        attention_mask = np.zeros((len(index), width), dtype=np.int64)
        token_type_ids = np.zeros((len(index), width), dtype=np.int64)
        for row, i in enumerate(index):  # right padding, as the tokenizer pads
            n = lengths[i]
            input_ids[row, :n] = ids[i]
            attention_mask[row, :n] = 1
            if types is not None:
                token_type_ids[row, :n] = types[i]
        results = outputs_from_ids(
            input_ids, attention_mask, token_type_ids if types is not None else None
        )
        for array, result in zip(out, results, strict=True):
            array[index] = result
    return out


def make_predictions(
    probabilities: np.ndarray, labels: Sequence[str], unknown: np.ndarray | None = None
) -> list[Prediction]:
    """The most probable label per row of calibrated (n, labels) probabilities.

    A row where `unknown` is True (see textgate.unknown) gets UNKNOWN_LABEL and
    `abstained=True`; None never abstains.
    """
    best = probabilities.argmax(axis=1)
    top2 = -np.partition(-probabilities, 1, axis=1)[:, :2] if probabilities.shape[1] > 1 else None
    predictions = []
    for row, i in enumerate(best):
        score = float(probabilities[row, i])
        abstained = unknown is not None and bool(unknown[row])
        margin = 1.0 if top2 is None else float(top2[row, 0] - top2[row, 1])
        predictions.append(
            Prediction(
                label=UNKNOWN_LABEL if abstained else labels[i],
                score=score,
                abstained=abstained,
                best_label=labels[i],
                margin=margin,
            )
        )
    return predictions


def check_explainable(text: str) -> None:
    """Raise ValueError when `text` is longer than MAX_EXPLAIN_CHARS."""
    if len(text) > MAX_EXPLAIN_CHARS:
        raise ValueError(
            f"text too long to explain: {len(text)} characters, the limit is "
            f"MAX_EXPLAIN_CHARS={MAX_EXPLAIN_CHARS}"
        )


def explain_by_occlusion(
    text: str,
    *,
    prediction: Prediction,
    tokenizer: Tokenizer,
    logits_from_ids: LogitsFromIds,
    labels: Sequence[str],
    max_length: int,
    cleaning: TextCleaning,
    temperature: float = 1.0,
) -> Explanation:
    """Explain one raw text's prediction by masking each of its tokens in turn.

    `prediction` is the text's own prediction, as `Classifier.predict` gives it: the
    explanation answers exactly that (label, score, abstention), never a second forward pass
    that could differ from it (an int8 model quantises its activations per batch). The text is
    cleaned and tokenized as for prediction (truncated to `max_length`); row i of one batch is
    the text with its i-th wordpiece replaced by the tokenizer's mask token, and the token's
    attribution is the prediction's score minus that label's probability with it masked.

    Raises:
        ValueError: the text is longer than MAX_EXPLAIN_CHARS, or the tokenizer has no mask token.
    """
    check_explainable(text)
    mask_id = tokenizer.mask_token_id
    if mask_id is None:
        raise ValueError("cannot explain by occlusion: the tokenizer has no mask token")
    cleaned = cleaning.apply(text)
    encoding = tokenizer(
        cleaned, truncation=True, max_length=max_length, return_special_tokens_mask=True
    )
    ids = np.asarray(encoding["input_ids"], dtype=np.int64)  # (tokens,)
    positions = np.flatnonzero(np.asarray(encoding["special_tokens_mask"]) == 0)
    attributions: list[float] = []
    if len(positions):
        input_ids = np.tile(ids, (len(positions), 1))  # (words, tokens)
        input_ids[np.arange(len(positions)), positions] = mask_id
        token_type_ids = None
        if "token_type_ids" in encoding:
            token_type_ids = np.tile(
                np.asarray(encoding["token_type_ids"], dtype=np.int64), (len(input_ids), 1)
            )
        logits = logits_from_ids(input_ids, np.ones_like(input_ids), token_type_ids)
        masked = softmax(logits, temperature)[:, labels.index(prediction.best_label)]  # (words,)
        attributions = [float(prediction.score - value) for value in masked]
    return Explanation(
        label=prediction.label,
        score=prediction.score,
        abstained=prediction.abstained,
        tokens=tokenizer.convert_ids_to_tokens(ids[positions].tolist()),
        attributions=attributions,
        best_label=prediction.best_label,
    )


class Classifier:
    """What every runtime shares: the model directory's metadata, calibration and abstention.

    A runtime sets `tokenizer` and `runtime` and implements `logits_from_ids`; prediction,
    probabilities and explanations follow from it.
    """

    runtime: str
    tokenizer: Tokenizer
    # The most texts one forward pass takes; None = as many as the caller's batch_size.
    max_batch_size: int | None = None

    def __init__(self, model_dir: str | Path) -> None:
        model_dir = Path(model_dir)
        if not (model_dir / LABEL_MAP_FILE).is_file():
            raise DataError(f"{model_dir} is not a textgate model directory (no {LABEL_MAP_FILE})")
        self.model_dir = model_dir
        self.labels: list[str] = read_json(model_dir / LABEL_MAP_FILE)["labels"]
        self.metadata: dict[str, Any] = read_json(model_dir / TRAINING_FILE)
        self.max_length: int = self.metadata["max_length"]
        # Normalisation, Chinese script and PII redaction as in training (textgate.text).
        self.cleaning = TextCleaning.from_metadata(self.metadata)
        # Fitted on the validation split by the train stage (temperature scaling); 1 = raw.
        self.temperature: float = float(
            self.metadata.get("calibration", {}).get("temperature", 1.0)
        )
        # The width of the pooled embeddings (textgate.unknown's mahalanobis score reads them).
        self.hidden_size: int = int(read_json(model_dir / "config.json").get("hidden_size", 0))
        # The "unknown" rule chosen on the validation split (textgate.unknown); None = always
        # answer.
        try:
            self.unknown = load_detector(self.metadata, model_dir, self.labels, self.temperature)
        except ValueError as error:
            raise DataError(f"{model_dir / TRAINING_FILE}: {error}") from None

    def logits_from_ids(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        token_type_ids: np.ndarray | None = None,
    ) -> np.ndarray:
        """Raw class scores, (batch, labels) float32, for already-tokenized (batch, tokens) ids."""
        raise NotImplementedError

    def forward_from_ids(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        token_type_ids: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Logits (batch, labels) and mean-pooled embeddings (batch, hidden), float32."""
        raise NotImplementedError(f"the {self.runtime} runtime gives no embeddings")

    def clean(self, texts: Sequence[str]) -> list[str]:
        """The texts as the model sees them: the same cleaning (and PII redaction) as training."""
        return [self.cleaning.apply(text) for text in texts]

    def predict_logits(
        self, texts: Sequence[str], batch_size: int, *, cleaned: bool = False
    ) -> np.ndarray:
        """Raw class scores for raw texts, after the same cleaning as training.

        Batches hold at most `batch_size` (and `max_batch_size`) texts; see `batched_logits`.
        `cleaned=True`: the texts are already `clean`'s output (serving logs them too).
        """
        return self.predict_outputs(texts, batch_size, embeddings=False, cleaned=cleaned)[0]

    def predict_outputs(
        self,
        texts: Sequence[str],
        batch_size: int,
        *,
        embeddings: bool = True,
        cleaned: bool = False,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Raw class scores and (when asked) pooled embeddings for raw texts, cleaned as in
        training, in batches of at most `batch_size` (and `max_batch_size`) texts."""
        if not cleaned:
            texts = self.clean(texts)
        if self.max_batch_size is not None:
            batch_size = min(batch_size, self.max_batch_size)
        args = (self.tokenizer, texts, self.max_length, batch_size)
        if not embeddings:
            return batched_logits(*args, self.logits_from_ids, len(self.labels)), None
        widths = (len(self.labels), int(self.hidden_size))
        logits, pooled = batched_outputs(*args, self.forward_from_ids, widths)
        return logits, pooled

    def unknown_mask(
        self, texts: Sequence[str], batch_size: int, *, cleaned: bool = False
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Calibrated probabilities and the served "unknown" flags (None: always answers)."""
        needs = self.unknown is not None and self.unknown.needs_embeddings
        logits, pooled = self.predict_outputs(texts, batch_size, embeddings=needs, cleaned=cleaned)
        probabilities = softmax(logits, self.temperature).astype(np.float32)
        if self.unknown is None:
            return probabilities, None
        return probabilities, self.unknown.unknown(logits, pooled)

    def predict_proba(
        self, texts: Sequence[str], batch_size: int, *, cleaned: bool = False
    ) -> np.ndarray:
        """Calibrated probabilities (softmax of logits / temperature) for raw texts."""
        logits = self.predict_logits(texts, batch_size, cleaned=cleaned)
        return softmax(logits, self.temperature).astype(np.float32)

    def predict(
        self, texts: Sequence[str], batch_size: int, *, cleaned: bool = False
    ) -> list[Prediction]:
        """The most probable label and its probability for each raw text, in order.

        Where the unknown rule fires the label is UNKNOWN_LABEL (`abstained=True`).
        """
        probabilities, unknown = self.unknown_mask(texts, batch_size, cleaned=cleaned)
        return make_predictions(probabilities, self.labels, unknown)

    def explain(self, text: str) -> Explanation:
        """The prediction for one raw text (exactly `predict`'s) and each token's share in it."""
        check_explainable(text)
        (prediction,) = self.predict([text], batch_size=1)
        return explain_by_occlusion(
            text,
            prediction=prediction,
            tokenizer=self.tokenizer,
            logits_from_ids=self._logits_in_passes,
            labels=self.labels,
            max_length=self.max_length,
            cleaning=self.cleaning,
            temperature=self.temperature,
        )

    def _logits_in_passes(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        token_type_ids: np.ndarray | None = None,
    ) -> np.ndarray:
        """`logits_from_ids` in forward passes of at most `max_batch_size` rows, as `predict`."""
        step = self.max_batch_size or len(input_ids) or 1
        passes = [
            self.logits_from_ids(
                input_ids[start : start + step],
                attention_mask[start : start + step],
                None if token_type_ids is None else token_type_ids[start : start + step],
            )
            for start in range(0, len(input_ids), step)
        ]
        return np.concatenate(passes) if passes else np.zeros((0, len(self.labels)), np.float32)
