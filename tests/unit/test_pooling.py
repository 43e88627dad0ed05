"""train.pooling: the head reads the mean-pooled token states of BERT-family encoders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import BertForSequenceClassification, DistilBertConfig

from textgate.errors import ConfigError
from textgate.model import (
    MeanPooledBertForSequenceClassification,
    TextClassifier,
    build_classifier,
    load_sequence_classifier,
    mean_pooled,
    save_classifier,
)

LABELS = ["a", "b", "c"]
SHORT, LONG = "hello there", "a much longer text than the other one"


@pytest.fixture(scope="module")
def mean_model(tiny_base_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    model, tokenizer = build_classifier(str(tiny_base_model), LABELS)  # pooling: auto
    out = tmp_path_factory.mktemp("mean-pooled") / "model"
    return save_classifier(model, tokenizer, LABELS, {"max_length": 32}, out)


def test_auto_pools_the_mean_for_a_bert_encoder_and_cls_keeps_berts_head(tiny_base_model):
    model, _ = build_classifier(str(tiny_base_model), LABELS)
    assert isinstance(model, MeanPooledBertForSequenceClassification)
    assert model.bert.pooler is None  # no unused [CLS] pooler weights
    cls, _ = build_classifier(str(tiny_base_model), LABELS, "cls")
    assert type(cls) is BertForSequenceClassification and cls.bert.pooler is not None


def test_the_head_reads_the_mean_of_the_real_tokens(mean_model: Path):
    model = load_sequence_classifier(mean_model).eval()
    tokenizer = TextClassifier(mean_model).tokenizer
    batch = tokenizer([SHORT, LONG], padding=True, return_tensors="pt")
    with torch.no_grad():
        padded = model(**batch).logits
        alone = model(**tokenizer([SHORT], return_tensors="pt")).logits
        states = model.bert(**batch).last_hidden_state
        by_hand = model.classifier(mean_pooled(states, batch["attention_mask"]))
    # the short text's padding changes nothing, and the logits are the head on the mean
    torch.testing.assert_close(padded[0], alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(padded, by_hand)
    first_token = model.classifier(states[:, 0])
    assert not torch.allclose(padded, first_token, atol=1e-3)  # not what [CLS] would give


def test_a_mean_pooled_model_saves_loads_and_exports_with_its_head(mean_model: Path, tmp_path):
    import shutil

    from textgate.export import export_onnx
    from textgate.runtime import OnnxClassifier

    assert isinstance(load_sequence_classifier(mean_model), MeanPooledBertForSequenceClassification)
    model_dir = tmp_path / "model"
    shutil.copytree(mean_model, model_dir)
    export_onnx(model_dir, quantize=False)
    texts = [SHORT, LONG, "refund please"]
    torch_logits = TextClassifier(model_dir).predict_logits(texts, batch_size=3)
    onnx_logits = OnnxClassifier(model_dir).predict_logits(texts, batch_size=2)
    np.testing.assert_allclose(onnx_logits, torch_logits, rtol=1e-4, atol=1e-4)


def test_mean_pooling_refuses_an_encoder_outside_the_bert_family(tmp_path):
    DistilBertConfig(dim=32, n_layers=1, n_heads=2, hidden_dim=64).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match=r"train.pooling: mean .*'distilbert'.*cls"):
        build_classifier(str(tmp_path), LABELS, "mean")
