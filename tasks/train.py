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
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import transformers
import yaml
from tqdm.auto import tqdm

from tasks.common import stage_main
from textgate.artifacts import (
    LabelMap,
    PrepareOutputs,
    TrainMetrics,
    prepare_outputs,
    read_artifact,
    read_payload,
    train_outputs,
    write_artifact,
)
from textgate.config import PARAMS_FILE, Params, TrainConfig
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
from textgate.io import write_json
from textgate.model import build_classifier, predict_outputs, save_classifier, select_device
from textgate.runtime import share_cpus
from textgate.stats import expected_calibration_error, fit_temperature, softmax
from textgate.text import TextCleaning
from textgate.training import (
    TrainingCallbacks,
    TrainingProgress,
    TrainResult,
    ValidationReport,
    seed_everything,
    train_classifier,
)
from textgate.unknown import (
    NEEDS_EMBEDDING,
    Gaussian,
    UnknownPolicy,
    choose_unknown_threshold,
    fit_gaussian,
    fit_standardization,
    unknown_scores,
)

CHECKPOINT_FILE = "last.pt"
# Settings that do not change the course of training: a checkpoint survives changing them.
NOT_IN_FINGERPRINT = {
    "output_dir",
    "quantize",
    "abstain_target_precision",
    "abstain_max_share",
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


def calibrate(logits: np.ndarray, labels: list[int], bins: int) -> dict[str, float]:
    """Fit the temperature on validation logits; ECE (over `bins` bins) before and after."""
    temperature = fit_temperature(logits, labels)
    return {
        "temperature": temperature,
        "val_ece_before": expected_calibration_error(softmax(logits), labels, bins),
        "val_ece_after": expected_calibration_error(softmax(logits, temperature), labels, bins),
        "n_val": len(labels),
    }


def launch(params: Params, processes: int) -> dict[str, float]:
    """Run this stage in `processes` processes under torchrun; return rank 0's metrics."""
    with tempfile.TemporaryDirectory(prefix="textgate-train-") as tmp:
        params_file = Path(tmp) / PARAMS_FILE
        params_file.write_text(
            yaml.safe_dump(params.model_dump(mode="json", by_alias=True), sort_keys=False),
            encoding="utf-8",
        )
        command = torchrun_command(processes, "tasks.train", ["--params", str(params_file)])
        print(f"train: {processes} processes: {' '.join(command)}", flush=True)
        # torchrun would set 1 thread per process; each sets its own share of the CPUs anyway.
        threads = share_cpus(processes)
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(threads))}
        code = subprocess.run(command, check=False, env=env).returncode
    if code != 0:
        raise LaunchFailed(f"torchrun exited with code {code} (the processes' output is above)")
    return read_payload(TrainMetrics, train_outputs(params).metrics)


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
    config = params.train
    splits = read_splits(prepare_outputs(params))
    if world.is_main:
        print(
            f"train: {len(splits.train)} examples, {len(splits.labels)} labels, "
            f"{config.base_model} on {device}"
            + (f" x {world.size} processes" if world.distributed else "")
        )
    oos_index(params, splits.labels)  # a wrong out-of-scope label fails before training
    checkpoint_dir = config.checkpoint_dir / run_fingerprint(config, splits.files, world.size)
    seed_everything(config.seed)  # before the new classification head is initialised
    model, tokenizer = build_classifier(config.base_model, splits.labels, config.pooling)
    result = train_classifier(
        model,
        tokenizer,
        splits.train["text"].tolist(),
        splits.targets(splits.train),
        splits.val["text"].tolist(),
        splits.targets(splits.val),
        config,
        device,
        world=world,
        callbacks=stage_callbacks(checkpoint_dir),
    )
    if not world.is_main:
        return {}
    calibration, abstention, gaussian = calibrate_and_abstain(model, tokenizer, splits, params)
    metadata = model_metadata(params, splits, result, calibration, abstention)
    save_classifier(
        model.cpu(),
        tokenizer,
        splits.labels,
        metadata,
        train_outputs(params).model_dir,
        seen_texts=[*splits.train["text"], *splits.val["text"]],
        # Inside the staging directory: the model appears with its files and ONNX export or
        # not at all.
        finalize=partial(finish_model_dir, gaussian, config.quantize == "int8"),
    )
    shutil.rmtree(checkpoint_dir, ignore_errors=True)  # the model is saved: nothing to resume
    metrics = stage_metrics(result, calibration)
    outputs = train_outputs(params)
    write_artifact(TrainMetrics, outputs.metrics, metrics)
    write_json(outputs.run, run_record(result))
    print(
        f"train: {result.seconds:.1f} s, {result.samples_per_second:.1f} samples/s, "
        f"peak memory {result.peak_memory_mb:.0f} MB ({result.peak_memory}); "
        f"see {outputs.run}"
    )
    return metrics


@dataclass(frozen=True)
class Splits:
    """The prepared training and validation splits and the label names."""

    labels: list[str]
    train: pd.DataFrame
    val: pd.DataFrame
    files: list[Path]  # the files they were read from

    def targets(self, split: pd.DataFrame) -> list[int]:
        """The label ids of `split`'s rows."""
        ids = {label: index for index, label in enumerate(self.labels)}
        return split["label"].map(ids).tolist()


def read_splits(prepared: PrepareOutputs) -> Splits:
    """The prepare stage's train and val splits and its label map."""
    files = [prepared.split("train"), prepared.split("val"), prepared.label_map]
    return Splits(
        labels=read_artifact(LabelMap, prepared.label_map).labels,
        train=pd.read_parquet(prepared.split("train")),
        val=pd.read_parquet(prepared.split("val")),
        files=files,
    )


def calibrate_and_abstain(
    model: Any, tokenizer: Any, splits: Splits, params: Params
) -> tuple[dict[str, float], UnknownPolicy, Gaussian | None]:
    """On the validation split: the temperature, and the unknown score's threshold (its
    Gaussian fitted on the training split first, for mahalanobis); printed."""
    val_logits, val_embeddings = predict_outputs(
        model,
        tokenizer,
        splits.val["text"].tolist(),
        params.train.max_length,
        params.evaluate.batch_size,
    )
    gaussian = fit_unknown(model, tokenizer, splits, params)
    targets = splits.targets(splits.val)
    calibration = calibrate(val_logits, targets, params.evaluate.calibration_bins)
    print(
        f"calibration: temperature {calibration['temperature']:.3f}, validation ECE "
        f"{calibration['val_ece_before']:.4f} -> {calibration['val_ece_after']:.4f}"
    )
    abstention = choose_abstention(
        val_logits, val_embeddings, splits, params, calibration["temperature"], gaussian
    )
    return calibration, abstention, gaussian


def finish_model_dir(gaussian: Gaussian | None, int8: bool, model_dir: Path) -> None:
    """The unknown score's fitted Gaussian, and the int8 ONNX export when asked."""
    if gaussian is not None:
        gaussian.save(model_dir)
    if int8:
        export_int8(model_dir)


def oos_index(params: Params, labels: list[str]) -> int | None:
    """The index of data.out_of_scope_label among `labels`; None when not declared."""
    label = params.data.out_of_scope_label
    if label is None:
        return None
    if label not in labels:
        raise TextgateError(
            f"data.out_of_scope_label is {label!r}, which is not a label of the training "
            f"split ({len(labels)} labels); set it to the out-of-scope label, or null"
        )
    return labels.index(label)


def fit_unknown(model: Any, tokenizer: Any, splits: Splits, params: Params) -> Gaussian | None:
    """The Gaussian of the mahalanobis unknown score, on the training split's embeddings."""
    if params.train.unknown_score not in NEEDS_EMBEDDING:
        return None
    _, embeddings = predict_outputs(
        model,
        tokenizer,
        splits.train["text"].tolist(),
        params.train.max_length,
        params.evaluate.batch_size,
    )
    exclude = oos_index(params, splits.labels)
    return fit_gaussian(embeddings, splits.targets(splits.train), exclude=exclude)


def choose_abstention(
    val_logits: np.ndarray,
    val_embeddings: np.ndarray,
    splits: Splits,
    params: Params,
    temperature: float,
    gaussian: Gaussian | None,
) -> UnknownPolicy:
    """The unknown score's threshold, chosen on validation; printed with what it gives."""
    config = params.train
    y_val = np.asarray(splits.targets(splits.val))
    oos = oos_index(params, splits.labels)
    standardization = fit_standardization(
        config.unknown_score,
        val_logits,
        val_embeddings,
        y_val,
        oos,
        temperature=temperature,
        gaussian=gaussian,
    )
    scores = unknown_scores(
        config.unknown_score,
        val_logits,
        val_embeddings,
        temperature=temperature,
        gaussian=gaussian,
        standardization=standardization,
    )
    policy = choose_unknown_threshold(
        config.unknown_score,
        scores,
        y_val,
        val_logits.argmax(axis=1),
        oos_index=oos,
        target_precision=config.abstain_target_precision,
        target_oos_recall=config.abstain_target_oos_recall,
        max_unknown_share=config.abstain_max_share,
        standardization=standardization,
    )
    recall = "" if policy.oos_recall is None else f", out-of-scope recall {policy.oos_recall:.4f}"
    print(
        f"abstention ({policy.method} score above {policy.threshold}): on validation it answers "
        f"{policy.coverage:.1%} with precision {policy.precision:.4f}{recall} (target "
        f"{policy.target} {policy.target_value}"
        + ("" if policy.reached else ", not reached: the best the data allows")
        + (
            f"; capped at train.abstain_max_share {config.abstain_max_share}"
            if policy.capped
            else ""
        )
        + ")"
    )
    return policy


def model_metadata(
    params: Params,
    splits: Splits,
    result: TrainResult,
    calibration: dict[str, float],
    abstention: UnknownPolicy,
) -> dict[str, Any]:
    """What the model directory's training.json records."""
    config = params.train
    return {
        "base_model": config.base_model,
        "max_length": config.max_length,
        # redact_pii, pii_phone_regions, chinese_script: serving cleans texts the same way
        **TextCleaning.from_params(params.prepare).to_metadata(),
        "labels": splits.labels,
        "train_config": config.model_dump(mode="json"),
        "train_examples": len(splits.train),
        "val_examples": len(splits.val),
        "result": reproducible_result(result),
        "calibration": calibration,
        "abstention": abstention.to_dict(),
        "out_of_scope_label": params.data.out_of_scope_label,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
    }


def stage_metrics(result: TrainResult, calibration: dict[str, float]) -> dict[str, float]:
    """The stage's metrics.json."""
    return {
        "val_accuracy": result.val_accuracy,
        "val_macro_f1": result.val_macro_f1,
        "best_epoch": result.best_epoch,
        "optimizer_steps": result.optimizer_steps,
        "temperature": round(calibration["temperature"], 4),
    }


# What differs between two runs on the same inputs: clocks, memory, this machine's threads,
# and whether the run resumed. DVC hashes metrics.json and model/ (dvc.lock), so these go to
# the run file (train_outputs(params).run), which is no DVC output: a fresh clone's first run
# then leaves dvc.lock as committed (the same seeded weights and metrics, the same hashes).
RUN_FIELDS = (
    "seconds",
    "samples_per_second",
    "peak_memory_mb",
    "peak_memory",
    "threads",
    "resumed_from_step",
    "steps_this_run",
)


def reproducible_result(result: TrainResult) -> dict[str, Any]:
    """The training result without RUN_FIELDS: what the same seeded run always gives."""
    record = {k: v for k, v in asdict(result).items() if k not in RUN_FIELDS}
    record["history"] = [
        {k: v for k, v in entry.items() if k != "seconds"} for entry in record["history"]
    ]
    return record


def run_record(result: TrainResult) -> dict[str, Any]:
    """This run's timings, memory and threads (RUN_FIELDS), and when each validation came."""
    record: dict[str, Any] = {k: getattr(result, k) for k in RUN_FIELDS}
    record["validation_seconds"] = [entry.get("seconds") for entry in asdict(result)["history"]]
    return record


# --- checkpoint files and console reports: the callbacks training is given -------------------


def stage_callbacks(checkpoint_dir: Path) -> TrainingCallbacks:
    """Report on the console; keep checkpoints in `checkpoint_dir/last.pt`."""
    console = ConsoleReport()
    return TrainingCallbacks(
        on_resume=console.resumed,
        on_progress=console.progress,
        on_validation=console.validated,
        save_checkpoint=partial(save_checkpoint, checkpoint_dir),
        load_checkpoint=partial(load_checkpoint, checkpoint_dir),
    )


def save_checkpoint(directory: Path, state: dict[str, Any]) -> Path:
    """Write `state` to `directory/last.pt` atomically: a temporary file, then os.replace."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / CHECKPOINT_FILE
    temporary = directory / f".{CHECKPOINT_FILE}.{os.getpid()}.tmp"
    with temporary.open("wb") as handle:
        torch.save(state, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    return path


def load_checkpoint(directory: Path) -> dict[str, Any] | None:
    """The state saved in `directory/last.pt`; None when there is none."""
    if not (directory / CHECKPOINT_FILE).is_file():
        return None
    return torch.load(directory / CHECKPOINT_FILE, map_location="cpu", weights_only=True)


class ConsoleReport:
    """Training's reports on the console: a progress bar per epoch (stderr), a line per
    validation and on resuming (stdout)."""

    def __init__(self) -> None:
        self.bar: tqdm | None = None

    def resumed(self, step: int, epoch: int) -> None:
        print(f"resuming from step {step} (epoch {epoch})", flush=True)

    def progress(self, progress: TrainingProgress) -> None:
        if progress.moment == "start":
            self.bar = tqdm(
                total=progress.batches,
                initial=progress.batches_done,
                desc=f"epoch {progress.epoch}/{progress.epochs}",
                unit="batch",
                # Piped into logs (DVC under Prefect), a bar line every 15 s is plenty.
                mininterval=2.0 if sys.stderr.isatty() else 15.0,
            )
        elif self.bar is None:
            return
        elif progress.moment == "step":
            self.bar.update(1)
            if progress.loss is not None and progress.samples_per_second is not None:
                self.bar.set_postfix(
                    loss=f"{progress.loss:.3f}",
                    samples_s=f"{progress.samples_per_second:.1f}",
                    refresh=False,
                )
        else:
            self.bar.close()
            self.bar = None

    def validated(self, report: ValidationReport) -> None:
        if self.bar is not None:
            self.bar.clear()
        log = report.log
        print(
            f"step {log.step} (epoch {log.epoch}): loss {log.train_loss:.4f}, val "
            f"accuracy {log.val_accuracy:.4f}, val macro-F1 {log.val_macro_f1:.4f} "
            f"({log.seconds:.1f}s)"
            + (" best" if report.best else "")
            + (", stopping early" if report.stopping_early else ""),
            flush=True,
        )


if __name__ == "__main__":
    sys.exit(stage_main("train", run))
