"""prepare, train and evaluate run on tiny files in a temporary folder."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from tasks import evaluate, prepare, train
from tasks.common import stage_main
from tests.conftest import make_rows, write_csv
from tests.helpers import MUST_PASS_ROWS, make_params, tiny_overrides
from textgate.model import TextClassifier


@pytest.fixture
def params(tmp_path, tiny_base_model):
    rows = make_rows(per_class=15)
    rows.append(("mail me at jane.doe@example.com about my refund", "refund"))
    rows.append(rows[0])  # an exact duplicate
    write_csv(tmp_path / "raw" / "train.csv", rows)
    write_csv(tmp_path / "must_pass.csv", MUST_PASS_ROWS)
    params = make_params(tiny_overrides(tmp_path, tiny_base_model))
    params.validate_.output_dir.mkdir(parents=True)
    labels = sorted({label for _, label in rows})
    (params.validate_.output_dir / "report.json").write_text(json.dumps({"labels": labels}))
    return params


def test_prepare_cleans_redacts_and_splits_stratified(params):
    sizes = prepare.run(params)
    out = params.prepare.output_dir
    parts = {name: pd.read_parquet(out / f"{name}.parquet") for name in ("train", "val", "test")}
    assert sizes == {name: len(frame) for name, frame in parts.items()}
    assert sum(sizes.values()) == 46  # 47 rows, one exact duplicate dropped
    for frame in parts.values():
        assert set(frame["label"]) == {"lost_card", "login", "refund"}
    all_texts = pd.concat(parts.values())["text"]
    assert not all_texts.duplicated().any()
    assert "mail me at [EMAIL] about my refund" in set(all_texts)
    stats = json.loads((out / "stats.json").read_text())
    assert stats["train_file"]["pii_redacted"]["email"] == 1
    assert stats["train_file"]["duplicates_dropped"] == 1
    again = prepare.run(params)
    assert again == sizes  # seeded: the same split every time
    assert pd.read_parquet(out / "test.parquet").equals(parts["test"])


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


def test_training_is_seeded(params):
    prepare.run(params)
    weights = params.train.output_dir / "model" / "model.safetensors"
    torch.manual_seed(1)  # whatever the global state before a run, the result is the same
    first = train.run(params)
    first_weights = load_file(weights)
    torch.manual_seed(2)
    second = train.run(params)
    second_weights = load_file(weights)
    assert first["val_macro_f1"] == second["val_macro_f1"]
    assert first_weights.keys() == second_weights.keys()
    for name, tensor in first_weights.items():
        assert torch.equal(tensor, second_weights[name]), name


def test_stage_reports_missing_prepared_data_clearly(params, capsys):
    code = stage_main("train", train.run, ["--params", "/nonexistent/params.yaml"])
    assert code == 2
    assert "params file not found: /nonexistent/params.yaml" in capsys.readouterr().err
