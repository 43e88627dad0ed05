"""SentenceEncoder on the tiny model: mean pooling over real tokens, L2-normalised, in order."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from textgate.embeddings import SentenceEncoder
from textgate.errors import DataError

TEXTS = [
    "my card was stolen",
    "refund",
    "hello please help me sign in to my account because i am locked out",
    "money back asap",
    "my card was stolen",  # a duplicate
]


@pytest.fixture(scope="module")
def encoder(tiny_model_dir) -> SentenceEncoder:
    return SentenceEncoder(tiny_model_dir, device="cpu")


def reference(encoder: SentenceEncoder, text: str) -> np.ndarray:
    """One text, no padding: the plain mean of its token states, divided by its norm."""
    tokens = encoder.tokenizer(
        text, truncation=True, max_length=encoder.max_length, return_tensors="pt"
    )
    with torch.inference_mode():
        states = encoder.encoder(**tokens).last_hidden_state[0].numpy()  # (tokens, hidden)
    mean = states.mean(axis=0)
    return mean / np.linalg.norm(mean)


def test_embeddings_have_one_unit_row_per_text(encoder):
    embeddings = encoder.encode(TEXTS, batch_size=64)
    assert embeddings.shape == (len(TEXTS), encoder.encoder.config.hidden_size)
    assert embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(embeddings[0], embeddings[4])  # the same text, the same row
    assert not np.allclose(embeddings[0], embeddings[1])


@pytest.mark.parametrize("batch_size", [1, 2, 64])
def test_each_row_is_its_texts_mean_pooled_embedding_whatever_the_padding(encoder, batch_size):
    # Batches mix short and long texts: padding must not count in the mean, and the rows come
    # back in the order of the texts although batches are sorted by length.
    embeddings = encoder.encode(TEXTS, batch_size=batch_size)
    for row, text in zip(embeddings, TEXTS, strict=True):
        np.testing.assert_allclose(row, reference(encoder, text), atol=1e-5, err_msg=text)


def test_texts_longer_than_max_length_are_truncated(encoder):
    long = " ".join(["refund"] * (4 * encoder.max_length))
    longer = long + " and then many more words about a stolen card"
    embeddings = encoder.encode([long, longer], batch_size=2)
    np.testing.assert_allclose(embeddings[0], embeddings[1], atol=1e-6)  # the same first tokens
    np.testing.assert_allclose(embeddings[0], reference(encoder, long), atol=1e-5)


def test_no_texts_give_an_empty_matrix(encoder):
    assert encoder.encode([], batch_size=64).shape == (0, encoder.encoder.config.hidden_size)


def test_max_length_comes_from_the_model_directory(tiny_model_dir, tmp_path, encoder):
    assert (
        encoder.max_length
        == json.loads((tiny_model_dir / "training.json").read_text())["max_length"]
    )
    copy = shutil.copytree(tiny_model_dir, tmp_path / "model")
    (copy / "training.json").unlink()
    with pytest.raises(DataError, match="training.json"):
        SentenceEncoder(copy, device="cpu")
