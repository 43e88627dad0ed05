"""The evaluate stage on a model trained from tiny files in a temporary folder."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from tasks import evaluate, prepare, train
from textgate.model import TextClassifier


@pytest.mark.slow  # trains a model
def test_train_and_evaluate_write_a_complete_model_and_metrics(params):
    prepare.run(params)
    metrics = train.run(params)
    model_dir = params.train.output_dir / "model"
    for name in (
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "label_map.json",
        "training.json",
    ):
        assert (model_dir / name).is_file(), name
    assert not list(params.train.output_dir.glob(".model.*")), "staging dir left behind"
    meta = json.loads((model_dir / "training.json").read_text())
    assert meta["result"]["epochs_run"] == 2 and meta["result"]["device"] == "cpu"
    # Serving cleans texts as prepare did: redaction, phone regions and Chinese script.
    assert (meta["redact_pii"], meta["pii_phone_regions"], meta["chinese_script"]) == (
        params.prepare.redact_pii,
        params.prepare.pii_phone_regions,
        params.prepare.chinese_script,
    )
    assert 0 <= metrics["val_accuracy"] <= 1

    result = evaluate.run(params)
    out = params.evaluate.output_dir
    written = json.loads((out / "metrics.json").read_text())
    assert written["accuracy"] == pytest.approx(result.accuracy)
    assert written["n_test"] == len(pd.read_parquet(params.prepare.output_dir / "test.parquet"))
    assert set(json.loads((out / "per_class.json").read_text())) == {"lost_card", "login", "refund"}
    confusion = pd.read_csv(out / "confusion.csv")
    assert list(confusion.columns) == ["actual", "predicted"] and len(confusion) == result.n
    assert (out / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    texts = ["my card was stolen", "refund please"]
    predictions = TextClassifier(model_dir).predict(texts, batch_size=2)
    assert [p.best_label in {"lost_card", "login", "refund"} for p in predictions] == [True, True]
    assert (model_dir / "onnx" / "model.int8.onnx").is_file()  # train.quantize: int8
    assert meta["abstention"]["target_precision"] == params.train.abstain_target_precision
    assert written["runtime"] == "onnx-int8" and "accuracy_fp32" in written
