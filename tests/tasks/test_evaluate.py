"""The evaluate stage on a model trained from tiny files in a temporary folder."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from tasks import evaluate, prepare, train
from tests.conftest import make_rows, write_csv
from tests.helpers import MUST_PASS_ROWS, make_params, tiny_overrides
from textgate.gate import out_of_scope_checks
from textgate.model import TextClassifier
from textgate.unknown import NEEDS_EMBEDDING


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
    assert meta["abstention"]["target"] == "precision"  # no out-of-scope label
    assert meta["abstention"]["target_value"] == params.train.abstain_target_precision
    assert meta["abstention"]["method"] == params.train.unknown_score
    assert (model_dir / "unknown.npz").is_file() == (params.train.unknown_score in NEEDS_EMBEDDING)
    assert written["runtime"] == "onnx-int8" and "accuracy_fp32" in written
    assert written["abstention"]["oos_recall"] is None  # nothing is out of scope here


@pytest.mark.slow  # trains a model
def test_an_out_of_scope_label_is_served_as_unknown_scored_and_gated(tmp_path, tiny_base_model):
    rows = make_rows(per_class=15)
    rows += [(f"{word} weather {i}", "oos") for i, word in enumerate(["what", "how", "is"] * 6)]
    write_csv(tmp_path / "raw" / "train.csv", rows)
    write_csv(tmp_path / "must_pass.csv", MUST_PASS_ROWS)
    overrides = tiny_overrides(tmp_path, tiny_base_model)
    overrides["data"]["out_of_scope_label"] = "oos"
    combined = "mahalanobis+energy"  # the default: its standardization travels in training.json
    overrides["train"] |= {"unknown_score": combined, "abstain_target_oos_recall": 0.9}
    params = make_params(overrides)
    params.validate_.output_dir.mkdir(parents=True)
    labels = sorted({label for _, label in rows})
    (params.validate_.output_dir / "report.json").write_text(json.dumps({"labels": labels}))
    prepare.run(params)
    train.run(params)
    meta = json.loads((params.train.output_dir / "model" / "training.json").read_text())
    assert meta["out_of_scope_label"] == "oos" and meta["abstention"]["target"] == "oos_recall"
    assert set(meta["abstention"]["standardization"]) == {"mahalanobis", "energy"}
    evaluate.run(params)
    written = json.loads((params.evaluate.output_dir / "metrics.json").read_text())
    served = written["abstention"]
    assert served["out_of_scope_label"] == "oos" and served["method"] == combined
    for key in ("in_scope_accuracy", "oos_recall", "oos_precision", "unknown_auroc", "coverage"):
        assert served[key] is None or 0 <= served[key] <= 1, key
    assert served["oos_recall"] is not None and served["coverage"] < 1
    # "unknown" answers are the out-of-scope label in the scores: its recall is served recall.
    per_class = json.loads((params.evaluate.output_dir / "per_class.json").read_text())
    assert per_class["oos"]["recall"] == pytest.approx(served["oos_recall"])
    predictions = pd.read_parquet(params.evaluate.output_dir / "predictions.parquet")
    assert predictions["abstained"].sum() == served["abstained"]

    assert len(out_of_scope_checks(written, params.gate)) == 4
    # The gate reads these figures: a floor above the weakest one fails that check.
    fields = {"in_scope_accuracy": "min_in_scope_accuracy", "oos_recall": "min_oos_recall"}
    weakest = min(fields, key=lambda key: served[key])
    assert served[weakest] < 1
    floor = (served[weakest] + 1) / 2
    strict = params.gate.model_copy(
        update={
            "out_of_scope": params.gate.out_of_scope.model_copy(update={fields[weakest]: floor})
        }
    )
    failed = [c.name for c in out_of_scope_checks(written, strict) if not c.passed]
    assert f"out_of_scope[{weakest}]" in failed
