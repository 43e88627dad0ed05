"""Smoke test of the ONNX Runtime options benchmark on a tiny exported model."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from bench import onnx_options

pytestmark = pytest.mark.slow  # exports a model to ONNX

TEXTS = ["my card was stolen", "refund", "I cannot sign in at all today", "hi"]


@pytest.fixture
def exported(tiny_model_dir: Path, tmp_path: Path) -> Any:
    """A copy of the tiny model with its int8 export, loaded as serving loads it."""
    from textgate.export import export_onnx
    from textgate.runtime import OnnxClassifier

    model_dir = shutil.copytree(tiny_model_dir, tmp_path / "model")
    export_onnx(model_dir)
    return OnnxClassifier(model_dir, threads=1)


def test_every_variant_is_measured_against_the_serving_options(exported: Any) -> None:
    classifier = exported
    texts = TEXTS * 20
    ids = onnx_options.encode(classifier, texts)
    rows = onnx_options.compare_options(classifier.onnx_path, ids, repeats=1)
    names = [row["variant"] for row in rows]
    assert names[0] == "serving options" and rows[0]["ratio"] == 1.0
    assert rows[0]["max_logit_change"] == 0.0 and rows[0]["same_label_share"] == 1.0
    assert set(onnx_options.VARIANTS) < set(names) and any("micro-batches" in n for n in names)
    for row in rows:
        assert row["texts_per_s"] > 0 and row["load_s"] > 0
        assert 0.0 <= row["same_label_share"] <= 1.0
    # Options that only change how memory is managed must not change any answer.
    unchanged = {row["variant"]: row["max_logit_change"] for row in rows}
    assert unchanged["memory arena off"] == unchanged["memory patterns off"] == 0.0


def test_the_earlier_export_and_static_int8_are_measured_with_the_serving_options(
    exported: Any, tmp_path: Path
) -> None:
    import onnx

    classifier = exported
    texts = TEXTS * 10
    work = tmp_path / "variants"
    work.mkdir()
    files = onnx_options.export_variants(classifier.model_dir, texts[:12], work)
    assert len(files) == 2 and all(path.is_file() for path in files.values())
    ops = {
        name: {node.op_type for node in onnx.load(str(path)).graph.node}
        for name, path in files.items()
    }
    before = next(name for name in files if "before" in name)
    static = next(name for name in files if "static" in name)
    assert "QAttention" not in ops[before] and "MatMulInteger" in ops[before]  # unfused
    # Static: int8 tensors with fixed scales (QDQ pairs), nothing quantised at run time.
    assert "DequantizeLinear" in ops[static] and "DynamicQuantizeLinear" not in ops[static]
    ids = onnx_options.encode(classifier, texts)
    rows = onnx_options.compare_options(classifier.onnx_path, ids, repeats=1, other_files=files)
    measured = {row["variant"]: row for row in rows}
    assert set(files) < set(measured)
    # The same checkpoint: the variants answer much as the served file does.
    assert measured[before]["same_label_share"] > 0.9


def test_a_negative_number_of_calibration_texts_is_refused(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        onnx_options.main(["--model-dir", ".", "--calibration-texts", "-1"])
    assert exit_info.value.code == 2
    assert "--calibration-texts: must be 0 or more, got -1" in capsys.readouterr().err
