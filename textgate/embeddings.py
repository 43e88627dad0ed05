"""Sentence embeddings from a model directory's encoder, for drift detection.

The encoder is the fine-tuned transformer of a textgate model (its classification head is
left out): the representation the production model actually classifies from. A text's
embedding is the mean of its last hidden states over real (not padding) tokens, L2-normalised.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModel, AutoTokenizer
from transformers.utils import logging as transformers_logging

from textgate.artifacts import TRAINING_FILE
from textgate.io import read_json
from textgate.model import length_sorted_batches, select_device


class SentenceEncoder:
    """Mean-pooled, L2-normalised embeddings from the encoder in a textgate model directory.

    Texts are embedded as given: pass them cleaned as the model saw them (the request log and
    the prepared splits already are).
    """

    def __init__(self, model_dir: str | Path, device: str = "auto") -> None:
        self.model_dir = Path(model_dir)
        self.max_length: int = read_json(self.model_dir / TRAINING_FILE)["max_length"]
        self.device = select_device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        # The checkpoint's classification head has no place in the bare encoder: say nothing.
        verbosity = transformers_logging.get_verbosity()
        transformers_logging.set_verbosity_error()
        try:
            self.encoder = AutoModel.from_pretrained(self.model_dir)
        finally:
            transformers_logging.set_verbosity(verbosity)
        self.encoder.to(self.device).eval()

    @torch.inference_mode()
    def encode(self, texts: Sequence[str], batch_size: int) -> np.ndarray:
        """(len(texts), hidden) float32 embeddings, in the order of `texts`."""
        hidden = self.encoder.config.hidden_size
        out = np.zeros((len(texts), hidden), dtype=np.float32)
        for index in length_sorted_batches(texts, batch_size):
            batch = self.tokenizer(
                [texts[i] for i in index],
                truncation=True,
                max_length=self.max_length,
                padding=True,
                return_tensors="pt",
            ).to(self.device)
            states = self.encoder(**batch).last_hidden_state  # (batch, tokens, hidden)
            mask = batch["attention_mask"].unsqueeze(-1).to(states.dtype)  # (batch, tokens, 1)
            pooled = (states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
            pooled = torch.nn.functional.normalize(pooled, dim=-1)
            out[index] = pooled.float().cpu().numpy()
        return out
