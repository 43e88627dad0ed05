"""The release checks on real (tiny) models: each made to fail for the right reason.

One model is trained properly on three keyword intents; the others are made bad on purpose:
trained on shuffled labels, made overconfident, or asked to pass a must-pass case it cannot.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from tasks import evaluate, prepare, train
from tests.conftest import make_rows, write_csv
from tests.helpers import MUST_PASS_ROWS, make_params, merge, tiny_overrides
from textgate.config import Params
from textgate.gate import behaviour_checks, calibration_check, floor_checks, unseen_mask
from textgate.io import read_json
from textgate.model import read_seen
from textgate.text import text_fingerprint

pytestmark = pytest.mark.slow  # trains and evaluates real (tiny) models

# Enough data and steps for the tiny BERT to learn the keywords: its random word embeddings
# must train, and it may sit at chance for epochs before it learns (no early stopping). The
# [CLS] head: a random encoder's mean over a text dilutes its one keyword among the fillers
# (the mean-pooled default gave this model ECE 0.11 and missed a must-pass case); the head
# itself is tested in tests/unit/test_pooling.py and by every other trained tiny model.
LEARNING = {
    "train": {
        "epochs": 12,
        "learning_rate": 5.0e-3,
        "freeze_embeddings": False,
        "early_stopping_patience": 0,
        "pooling": "cls",
    }
}
GATE = {"min_accuracy": 0.7, "min_macro_f1": 0.7}


def params_for(work: Path, base_model: Path, **overrides) -> Params:
    return make_params(merge(merge(tiny_overrides(work, base_model), LEARNING), overrides))


@pytest.fixture(scope="module")
def good(tmp_path_factory, tiny_base_model) -> Params:
    """A properly trained and evaluated tiny model."""
    work = tmp_path_factory.mktemp("good")
    rows = make_rows(per_class=30)
    write_csv(work / "raw" / "train.csv", rows)
    write_csv(work / "must_pass.csv", MUST_PASS_ROWS)
    params = params_for(work, tiny_base_model, gate=GATE)
    params.validate_.output_dir.mkdir(parents=True)
    labels = sorted({label for _, label in rows})
    (params.validate_.output_dir / "report.json").write_text(json.dumps({"labels": labels}))
    prepare.run(params)
    train.run(params)
    evaluate.run(params)
    return params


def copy_model(source: Params, work: Path) -> Params:
    """A copy of `source`'s prepared data and model under `work`, with its own outputs."""
    shutil.copytree(source.prepare.output_dir, work / "prepare")
    shutil.copytree(source.train.output_dir, work / "train")
    shutil.copy(source.evaluate.must_pass_file, work / "must_pass.csv")
    return make_params(
        merge(
            json.loads(source.model_dump_json(by_alias=True)),
            {
                "prepare": {"output_dir": str(work / "prepare")},
                "train": {"output_dir": str(work / "train")},
                "evaluate": {
                    "output_dir": str(work / "evaluate"),
                    "must_pass_file": str(work / "must_pass.csv"),
                },
            },
        )
    )


def test_good_model_passes_and_its_evidence_is_complete(good):
    out = good.evaluate.output_dir
    metrics = read_json(out / "metrics.json")
    assert all(check.passed for check in floor_checks(metrics, good.gate)), metrics
    assert calibration_check(metrics, good.gate).passed, metrics
    assert behaviour_checks(metrics["behaviour"], good.gate)[-1].passed  # must-pass

    calibration = read_json(good.train.output_dir / "model" / "training.json")["calibration"]
    assert calibration["temperature"] == pytest.approx(metrics["temperature"])
    assert calibration["val_ece_after"] <= calibration["val_ece_before"] + 1e-9

    predictions = pd.read_parquet(out / "predictions.parquet")
    test = pd.read_parquet(good.prepare.output_dir / "test.parquet")
    seen = read_seen(good.train.output_dir / "model")
    splits = {
        n: pd.read_parquet(good.prepare.output_dir / f"{n}.parquet") for n in ("train", "val")
    }
    assert seen == {text_fingerprint(t) for frame in splits.values() for t in frame["text"]}
    assert not any(unseen is False for unseen in unseen_mask(test["text"].tolist(), seen))
    assert predictions["text"].tolist() == test["text"].tolist()
    assert (predictions["label"] == predictions["predicted"]).mean() == metrics["accuracy"]

    behaviour = read_json(out / "behaviour.json")
    assert set(behaviour["invariance"]) == {"casing", "punctuation", "typos", "filler"}
    assert behaviour["must_pass"]["n"] == len(MUST_PASS_ROWS)
    golden = read_json(out / "golden.json")
    assert len(golden) == good.evaluate.golden_requests + len(MUST_PASS_ROWS)
    assert {"text", "label", "score"} == set(golden[0])


def test_model_trained_on_shuffled_labels_fails_the_floors(good, tmp_path):
    params = copy_model(good, tmp_path)
    path = params.prepare.output_dir / "train.parquet"
    frame = pd.read_parquet(path)
    frame["label"] = frame["label"].sample(frac=1.0, random_state=0).to_numpy()
    frame.to_parquet(path, index=False)
    train.run(params)
    evaluate.run(params)  # on the true test labels
    metrics = read_json(params.evaluate.output_dir / "metrics.json")
    failed = [check.name for check in floor_checks(metrics, params.gate) if not check.passed]
    assert failed == ["accuracy_floor", "macro_f1_floor"], metrics


def test_overconfident_model_fails_the_ece_ceiling(good, tmp_path):
    params = copy_model(good, tmp_path)
    # A harder test set: a third of the answers now count as mistakes...
    path = params.prepare.output_dir / "test.parquet"
    test = pd.read_parquet(path)
    labels = sorted(set(test["label"]))
    flip = test.index % 3 == 0
    test.loc[flip, "label"] = [labels[(labels.index(x) + 1) % 3] for x in test["label"][flip]]
    test.to_parquet(path, index=False)
    # ...while the model says every answer is ~100% sure.
    training = params.train.output_dir / "model" / "training.json"
    meta = read_json(training)
    meta["calibration"]["temperature"] = 0.01
    training.write_text(json.dumps(meta))
    evaluate.run(params)
    metrics = read_json(params.evaluate.output_dir / "metrics.json")
    assert metrics["accuracy"] <= 0.7, "precondition: the model is wrong about a third of the time"
    assert metrics["ece"] == pytest.approx(1.0 - metrics["accuracy"], abs=0.01)
    check = calibration_check(metrics, params.gate)
    assert not check.passed
    assert check.reason.startswith(f"ece {metrics['ece']:.4f} > ceiling 0.1000")


def test_model_that_fails_a_must_pass_case_fails_the_gate(good, tmp_path):
    params = copy_model(good, tmp_path)
    wrong = ("hello stolen card thanks", "login")
    write_csv(params.evaluate.must_pass_file, [*MUST_PASS_ROWS, wrong])
    evaluate.run(params)
    behaviour = read_json(params.evaluate.output_dir / "behaviour.json")["must_pass"]
    assert behaviour["n"] == 3
    assert behaviour["failures"][0]["expected"] == "login"
    metrics = read_json(params.evaluate.output_dir / "metrics.json")
    checks = {c.name: c for c in behaviour_checks(metrics["behaviour"], params.gate)}
    assert not checks["behaviour[must_pass]"].passed
    assert checks["behaviour[must_pass]"].value == pytest.approx(2 / 3)


def test_must_pass_file_with_an_unknown_label_is_a_clear_error(good, tmp_path):
    from textgate.errors import DataError

    params = copy_model(good, tmp_path)
    write_csv(params.evaluate.must_pass_file, [("where is my parcel", "shipping")])
    with pytest.raises(DataError, match="unknown label 'shipping'"):
        evaluate.run(params)
