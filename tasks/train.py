"""DVC stage `train`: fine-tune the base encoder on the prepared splits and save the model.

With `train.processes` > 1 (or auto on several GPUs) the stage starts itself again under
torchrun, one process per GPU (or per share of the CPUs); rank 0 writes every file. An
interrupted run resumes from its last checkpoint (`train.checkpoint_dir/<fingerprint>/`).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import torch
import transformers
import yaml

from tasks.common import stage_main
from textgate.abstain import choose_threshold
from textgate.config import Params, TrainConfig
from textgate.distributed import (
    World,
    destroy_process_group,
    init_process_group,
    process_device,
    resolve_processes,
    torchrun_command,
    under_torchrun,
)
from textgate.errors import TextgateError
from textgate.io import read_json, write_json
from textgate.model import build_classifier, predict_logits, save_classifier, select_device
from textgate.stats import expected_calibration_error, fit_temperature, softmax
from textgate.training import choose_threads, seed_everything, train_classifier, usable_cpus

CALIBRATION_BINS = 15
# Settings that do not change the course of training: a checkpoint survives changing them.
NOT_IN_FINGERPRINT = {
    "output_dir",
    "quantize",
    "abstain_target_precision",
    "processes",  # the resolved count is hashed instead
    "checkpoint_dir",
    "checkpoint_every_steps",
}


class LaunchFailed(TextgateError):
    """The training processes started under torchrun failed."""


def run_fingerprint(config: TrainConfig, data_files: Sequence[Path], processes: int) -> str:
    """What decides a run's course (settings, data, processes), hashed: a checkpoint resumes
    only a run with the same fingerprint."""
    settings = config.model_dump(mode="json", exclude=NOT_IN_FINGERPRINT)
    digest = hashlib.sha256(
        json.dumps({"train": settings, "processes": processes}, sort_keys=True).encode()
    )
    for path in data_files:
        digest.update(path.name.encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:16]


def export_int8(model_dir: Path) -> None:
    """ONNX export with int8 dynamic quantisation, for serving on CPUs."""
    # Imported here: ONNX and ONNX Runtime take seconds to import, and only rank 0 exports.
    from textgate.export import export_onnx

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


def launch(params: Params, processes: int) -> dict[str, float]:
    """Run this stage in `processes` processes under torchrun; return rank 0's metrics."""
    with tempfile.TemporaryDirectory(prefix="textgate-train-") as tmp:
        params_file = Path(tmp) / "params.yaml"
        params_file.write_text(
            yaml.safe_dump(params.model_dump(mode="json", by_alias=True), sort_keys=False),
            encoding="utf-8",
        )
        command = torchrun_command(processes, "tasks.train", ["--params", str(params_file)])
        print(f"train: {processes} processes: {' '.join(command)}", flush=True)
        # torchrun would set 1 thread per process; each sets its own share of the CPUs anyway.
        threads = choose_threads(usable_cpus(), processes)
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(threads))}
        code = subprocess.run(command, check=False, env=env).returncode
    if code != 0:
        raise LaunchFailed(f"torchrun exited with code {code} (the processes' output is above)")
    return read_json(params.train.output_dir / "metrics.json")


def run(params: Params) -> dict[str, float]:
    """Train, then write `model/` (weights, tokenizer, label map, metadata) and metrics.json."""
    config = params.train
    device = select_device(config.device)
    processes = resolve_processes(config.processes, device)
    if processes > 1 and not under_torchrun():
        return launch(params, processes)
    world = World.from_env()
    device = process_device(world, device)
    init_process_group(world, device)
    try:
        return train_and_save(params, world, device)
    finally:
        destroy_process_group()


def train_and_save(params: Params, world: World, device: torch.device) -> dict[str, float]:
    """Train in this process (one of `world`); rank 0 then calibrates and writes the files."""
    config, prepared = params.train, params.prepare.output_dir
    labels: list[str] = read_json(prepared / "label_map.json")["labels"]
    label_ids = {label: index for index, label in enumerate(labels)}
    train = pd.read_parquet(prepared / "train.parquet")
    val = pd.read_parquet(prepared / "val.parquet")
    if world.is_main:
        print(
            f"train: {len(train)} examples, {len(labels)} labels, {config.base_model} on "
            f"{device}" + (f" x {world.size} processes" if world.distributed else "")
        )
    data_files = [prepared / name for name in ("train.parquet", "val.parquet", "label_map.json")]
    checkpoint_dir = config.checkpoint_dir / run_fingerprint(config, data_files, world.size)

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
        progress=world.is_main,
        world=world,
        checkpoint_dir=checkpoint_dir,
    )
    if not world.is_main:
        return {}
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
    shutil.rmtree(checkpoint_dir, ignore_errors=True)  # the model is saved: nothing to resume
    metrics = {
        "val_accuracy": result.val_accuracy,
        "val_macro_f1": result.val_macro_f1,
        "best_epoch": result.best_epoch,
        "optimizer_steps": result.optimizer_steps,
        "train_seconds": round(result.seconds, 2),
        "samples_per_second": round(result.samples_per_second, 2),
        "peak_memory_mb": round(result.peak_memory_mb, 1),
        "temperature": round(calibration["temperature"], 4),
    }
    write_json(config.output_dir / "metrics.json", metrics)
    return metrics


if __name__ == "__main__":
    sys.exit(stage_main("train", run))
