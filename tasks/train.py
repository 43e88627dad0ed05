"""DVC stage `train`: fine-tune the base encoder on the prepared splits and save the model."""

from __future__ import annotations

import platform
import sys
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import torch
import transformers

from tasks.common import stage_main
from textgate.abstain import choose_threshold
from textgate.config import Params
from textgate.export import export_onnx
from textgate.io import read_json, write_json
from textgate.model import build_classifier, predict_logits, save_classifier, select_device
from textgate.stats import expected_calibration_error, fit_temperature, softmax
from textgate.training import seed_everything, train_classifier

CALIBRATION_BINS = 15


def export_int8(model_dir: Path) -> None:
    """ONNX export with int8 dynamic quantisation, for serving on CPUs."""
    info = export_onnx(model_dir, quantize=True)
    print(f"export: {info['runtime']} {info['size_mb']} MB in {info['export_seconds']} s")


def calibrate(logits, labels: list[int]) -> dict[str, float]:
    """Fit the temperature on validation logits; ECE before and after (temperature scaling)."""
    temperature = fit_temperature(logits, labels)
    return {
        "temperature": temperature,
        "val_ece_before": expected_calibration_error(softmax(logits), labels, CALIBRATION_BINS),
        "val_ece_after": expected_calibration_error(
            softmax(logits, temperature), labels, CALIBRATION_BINS
        ),
        "n_val": len(labels),
    }


def run(params: Params) -> dict[str, float]:
    """Train, then write `model/` (weights, tokenizer, label map, metadata) and metrics.json."""
    config, prepared = params.train, params.prepare.output_dir
    labels: list[str] = read_json(prepared / "label_map.json")["labels"]
    label_ids = {label: index for index, label in enumerate(labels)}
    train = pd.read_parquet(prepared / "train.parquet")
    val = pd.read_parquet(prepared / "val.parquet")
    device = select_device(config.device)
    print(f"train: {len(train)} examples, {len(labels)} labels, {config.base_model} on {device}")

    val_labels = val["label"].map(label_ids).tolist()
    seed_everything(config.seed)  # before the new classification head is initialised
    model, tokenizer = build_classifier(config.base_model, labels)
    result = train_classifier(
        model,
        tokenizer,
        train["text"].tolist(),
        train["label"].map(label_ids).tolist(),
        val["text"].tolist(),
        val_labels,
        config,
        device,
    )
    val_logits = predict_logits(model, tokenizer, val["text"].tolist(), config.max_length)
    calibration = calibrate(val_logits, val_labels)
    print(
        f"calibration: temperature {calibration['temperature']:.3f}, validation ECE "
        f"{calibration['val_ece_before']:.4f} -> {calibration['val_ece_after']:.4f}"
    )
    abstention = choose_threshold(
        softmax(val_logits, calibration["temperature"]),
        val_labels,
        config.abstain_target_precision,
    )
    print(
        f"abstention: below {abstention.threshold:.3f} answer 'unknown'; on validation it "
        f"answers {abstention.coverage:.1%} with precision {abstention.precision:.4f} "
        f"(target {config.abstain_target_precision}"
        + ("" if abstention.reached else ", not reached: the best the data allows")
        + ")"
    )
    metadata = {
        "base_model": config.base_model,
        "max_length": config.max_length,
        "redact_pii": params.prepare.redact_pii,
        "labels": labels,
        "train_config": config.model_dump(mode="json"),
        "train_examples": len(train),
        "val_examples": len(val),
        "result": asdict(result),
        "calibration": calibration,
        "abstention": abstention.to_dict(),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
    }
    save_classifier(
        model.cpu(),
        tokenizer,
        labels,
        metadata,
        config.output_dir / "model",
        seen_texts=[*train["text"], *val["text"]],
        # Inside the staging directory: the model appears with its ONNX export or not at all.
        finalize=export_int8 if config.quantize == "int8" else None,
    )
    metrics = {
        "val_accuracy": result.val_accuracy,
        "val_macro_f1": result.val_macro_f1,
        "best_epoch": result.best_epoch,
        "train_seconds": round(result.seconds, 2),
        "samples_per_second": round(result.samples_per_second, 2),
        "temperature": round(calibration["temperature"], 4),
    }
    write_json(config.output_dir / "metrics.json", metrics)
    return metrics


if __name__ == "__main__":
    sys.exit(stage_main("train", run))
