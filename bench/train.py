"""Training benchmark: textgate's training loop against a plain transformers `Trainer`
fine-tune of the same base model, in one run on the same machine.

    python -m bench.train --data DIR [--max-train N] [--seed S] [--base-model M]

DIR holds train.csv, val.csv and test.csv with columns `text,label`; texts are used as they
are (no textgate cleaning) by both. One after the other, each in its own process:

1. **baseline**: `transformers.Trainer`, batch 32, learning rate 5e-5, every text padded to
   64 tokens, 3 epochs, Trainer's other defaults (AdamW, linear decay, no warm-up), fp32;
   then scored on the test split.
2. **textgate**: `textgate.training.train_classifier` with params.yaml's `train:` settings
   (the defaults), validated on the val split as usual; an evaluation hook scores the test
   split at each validation, and the hook's own time is left out of textgate's training time.

It prints each one's training time, test accuracy and macro-F1, the time textgate needed to
reach the baseline's final test accuracy and the ratio baseline time / that time (target
>= 3x), and textgate's final test accuracy (target >= 0.95; on data with an `oos` label,
the in-scope accuracy, CLINC150's metric). Progress goes to stderr; the last line printed on
stdout is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import json_line, json_ready, log, machine_info, positive_int
from textgate.config import PARAMS_FILE

TARGET_SPEEDUP = 3.0  # baseline training time / textgate's time to reach the same accuracy
TARGET_ACCURACY = 0.95
# On data with an out-of-scope label (CLINC150), as served (abstention included):
TARGET_IN_SCOPE_ACCURACY = 0.96
TARGET_OOS_RECALL = 0.70
OOS_LABEL = "oos"  # out-of-scope examples (CLINC150): in-scope accuracy leaves them out
SPLITS = ("train", "val", "test")
# The baseline recipe: a typical first fine-tune with Trainer.
BASELINE_BATCH_SIZE = 32
BASELINE_LEARNING_RATE = 5e-5
BASELINE_MAX_LENGTH = 64
BASELINE_EPOCHS = 3
EVAL_BATCH_SIZE = 128
MIB = 1024 * 1024


class BenchError(Exception):
    """Bad input: a missing file or column, a label the training split lacks."""


@dataclass(frozen=True)
class Options:
    data: Path
    params: Path
    max_train: int | None
    max_val: int | None
    max_test: int | None
    seed: int | None
    base_model: str | None
    oos_label: str
    skip_baseline: bool = False
    keep_model: Path | None = None  # where to keep textgate's model directory


@dataclass(frozen=True)
class Split:
    texts: list[str]
    labels: list[str]


# --- data ------------------------------------------------------------------------------------


def stratified_subset(labels: Sequence[str], size: int, seed: int) -> np.ndarray:
    """Sorted indices of `size` examples, each label's share as in `labels`; seeded.

    Each label gets at least one example when `size` allows it; the rest is shared out in
    proportion to what each label has left (largest remainders, ties broken at random).
    All indices when `size` is at least their number.
    """
    labels = np.asarray(labels)
    if size >= len(labels):
        return np.arange(len(labels))
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    rng = np.random.default_rng(seed)
    names, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    if size < len(names):  # fewer examples than labels: `size` labels at random, one each
        take = np.zeros(len(names), dtype=int)
        take[rng.choice(len(names), size=size, replace=False)] = 1
    else:
        take = np.ones(len(names), dtype=int)
        spare = counts - take
        budget = size - len(names)
        quota = budget * spare / spare.sum()  # each below its spare, as budget < spare.sum()
        extra = np.floor(quota).astype(int)
        # The slots floor() leaves: largest remainders first, ties in random order.
        order = np.lexsort((rng.random(len(names)), -(quota - extra)))
        extra[order[: budget - int(extra.sum())]] += 1
        take += extra
    chosen = [
        rng.choice(np.flatnonzero(inverse == label), size=int(count), replace=False)
        for label, count in enumerate(take)
        if count
    ]
    return np.sort(np.concatenate(chosen))


def read_split(path: Path) -> Split:
    """A `text,label` CSV file."""
    import pandas as pd

    if not path.is_file():
        raise BenchError(f"missing {path}")
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = {"text", "label"} - set(frame.columns)
    if missing:
        raise BenchError(f"{path}: missing column(s) {sorted(missing)}")
    if frame.empty:
        raise BenchError(f"{path}: no rows")
    return Split(texts=frame["text"].tolist(), labels=frame["label"].tolist())


def subset(split: Split, size: int | None, seed: int) -> Split:
    if size is None:
        return split
    index = stratified_subset(split.labels, size, seed)
    return Split(texts=[split.texts[i] for i in index], labels=[split.labels[i] for i in index])


def load_data(options: Options, seed: int) -> tuple[list[str], dict[str, Split]]:
    """The label set (from the training split) and the three splits, subsets where asked."""
    splits = {name: read_split(options.data / f"{name}.csv") for name in SPLITS}
    splits["train"] = subset(splits["train"], options.max_train, seed)
    splits["val"] = subset(splits["val"], options.max_val, seed)
    splits["test"] = subset(splits["test"], options.max_test, seed)
    labels = sorted(set(splits["train"].labels))
    for name in ("val", "test"):
        unknown = sorted(set(splits[name].labels) - set(labels))
        if unknown:
            raise BenchError(f"{name}.csv has labels the training split lacks: {unknown[:5]}")
    return labels, splits


# --- scores ----------------------------------------------------------------------------------


def score(
    y_true: Sequence[int], y_pred: Sequence[int], labels: Sequence[str], oos_label: str
) -> dict[str, float | None]:
    """Accuracy, macro-F1 and, when `oos_label` is a label, accuracy on the other examples."""
    from textgate.metrics import compute_metrics

    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    metrics = compute_metrics(y_true, y_pred, labels)
    in_scope = None
    if oos_label in labels:
        keep = y_true != list(labels).index(oos_label)
        in_scope = float(np.mean(y_true[keep] == y_pred[keep])) if keep.any() else None
    return {
        "accuracy": metrics.accuracy,
        "macro_f1": metrics.macro_f1,
        "in_scope_accuracy": in_scope,
    }


def served(
    y_true: Sequence[int],
    logits: np.ndarray,
    unknown: np.ndarray,
    scores: np.ndarray,
    labels: Sequence[str],
    oos_label: str,
) -> dict[str, float | None]:
    """Abstention as served: "unknown" answers count as the out-of-scope label (right on
    out-of-scope rows, wrong on the others); textgate.unknown's figures, plus the accuracy
    and macro-F1 over every label."""
    from textgate.unknown import served_scores

    oos = list(labels).index(oos_label) if oos_label in labels else None
    y_true, argmax = np.asarray(y_true), logits.argmax(axis=1)
    answered = argmax if oos is None else np.where(unknown, oos, argmax)
    overall = score(y_true, answered, labels, oos_label)
    figures = served_scores(y_true, argmax, unknown, scores, oos)
    return {"accuracy": overall["accuracy"], "macro_f1": overall["macro_f1"], **figures}


def thresholded(
    method: str,
    val: tuple[np.ndarray, np.ndarray | None, list[int]],
    test: tuple[np.ndarray, np.ndarray | None, list[int]],
    labels: Sequence[str],
    options: Options,
    temperature: float = 1.0,
    gaussian: Any = None,
) -> dict[str, Any]:
    """One unknown score: its threshold chosen on val (params' targets), scored on both."""
    from textgate.unknown import (
        choose_unknown_threshold,
        fit_standardization,
        served_unknown,
        unknown_scores,
    )

    config = _train_config(options)
    oos = list(labels).index(options.oos_label) if options.oos_label in labels else None
    result: dict[str, Any] = {"method": method}
    policy = None
    standardization = fit_standardization(
        method, *val, oos, temperature=temperature, gaussian=gaussian
    )
    for name, (logits, embeddings, y) in (("val", val), ("test", test)):
        scores = unknown_scores(
            method,
            logits,
            embeddings,
            temperature=temperature,
            gaussian=gaussian,
            standardization=standardization,
        )
        if policy is None:
            policy = choose_unknown_threshold(
                method,
                scores,
                y,
                logits.argmax(axis=1),
                oos_index=oos,
                target_precision=config.abstain_target_precision,
                target_oos_recall=config.abstain_target_oos_recall,
                max_unknown_share=config.abstain_max_share,
                standardization=standardization,
            )
            result["policy"] = policy.to_dict()
        unknown = served_unknown(logits.argmax(axis=1), scores, policy.threshold, oos)
        result[name] = served(y, logits, unknown, scores, labels, options.oos_label)
    return result


def time_to_reach(points: Sequence[dict[str, Any]], target: float) -> dict[str, Any] | None:
    """The first evaluation point (by training seconds) whose test accuracy reaches `target`."""
    for point in sorted(points, key=lambda point: point["seconds"]):
        if point["test_accuracy"] >= target - 1e-12:
            return point
    return None


def ratio(numerator: float | None, denominator: float | None) -> float:
    """numerator / denominator, NaN where it is undefined."""
    if numerator is None or denominator is None or denominator <= 0:
        return math.nan
    if math.isnan(numerator) or math.isnan(denominator):
        return math.nan
    return numerator / denominator


# --- the two runs (each in its own process) ---------------------------------------------------


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MIB


def _train_config(options: Options):
    from textgate.config import load_params

    config = load_params(options.params).train
    updates: dict[str, Any] = {}
    if options.base_model is not None:
        updates["base_model"] = options.base_model
    if options.seed is not None:
        updates["seed"] = options.seed
    return config.model_copy(update=updates)


def run_baseline(options: Options) -> dict[str, Any]:
    """Fine-tune with transformers' Trainer (the recipe above); score the test split."""
    import torch
    from transformers import Trainer, TrainingArguments, default_data_collator

    from textgate.model import build_classifier, select_device
    from textgate.runtime import share_cpus
    from textgate.training import seed_everything

    config = _train_config(options)
    labels, splits = load_data(options, config.seed)
    label_ids = {label: index for index, label in enumerate(labels)}
    device = select_device(config.device)
    torch.set_num_threads(share_cpus(1))  # the same threads as textgate's
    seed_everything(config.seed)
    # transformers' own head for the base model (a plain fine-tune, as a user would write it)
    model, tokenizer = build_classifier(config.base_model, labels, pooling="cls")

    def dataset(split: Split) -> list[dict[str, torch.Tensor]]:
        encoded = tokenizer(
            split.texts,
            padding="max_length",
            truncation=True,
            max_length=BASELINE_MAX_LENGTH,
            return_tensors="pt",
        )
        targets = torch.tensor([label_ids[label] for label in split.labels])
        return [
            {**{name: value[i] for name, value in encoded.items()}, "labels": targets[i]}
            for i in range(len(split.texts))
        ]

    train, val = dataset(splits["train"]), dataset(splits["val"])
    test = dataset(splits["test"])
    with tempfile.TemporaryDirectory(prefix="textgate-bench-trainer-") as tmp:
        args = TrainingArguments(
            output_dir=tmp,
            per_device_train_batch_size=BASELINE_BATCH_SIZE,
            per_device_eval_batch_size=EVAL_BATCH_SIZE,
            learning_rate=BASELINE_LEARNING_RATE,
            num_train_epochs=BASELINE_EPOCHS,
            seed=config.seed,
            eval_strategy="no",
            save_strategy="no",
            logging_strategy="epoch",
            report_to="none",
            disable_tqdm=True,
            use_cpu=device.type == "cpu",
        )
        trainer = Trainer(
            model=model, args=args, train_dataset=train, data_collator=default_data_collator
        )
        log(f"baseline: Trainer on {len(train)} examples, {device}")
        start = time.perf_counter()
        output = trainer.train()
        seconds = time.perf_counter() - start
        test_logits = trainer.predict(test).predictions
        val_logits = trainer.predict(val).predictions
    y_test = [label_ids[label] for label in splits["test"].labels]
    y_val = [label_ids[label] for label in splits["val"].labels]
    predicted = test_logits.argmax(axis=1)
    # Larson et al.'s baseline: the softmax confidence, thresholded on validation.
    msp = thresholded(
        "msp", (val_logits, None, y_val), (test_logits, None, y_test), labels, options
    )
    return {
        "seconds": seconds,
        "optimizer_steps": int(output.global_step),
        "epochs": BASELINE_EPOCHS,
        "samples_per_second": len(train) * BASELINE_EPOCHS / seconds,
        "test": score(y_test, predicted, labels, options.oos_label),
        "test_thresholded": msp["test"],
        "val_thresholded": msp["val"],
        "threshold": msp["policy"],
        "peak_memory_mb": peak_rss_mb(),
        "threads": torch.get_num_threads(),
        "device": str(device),
    }


def run_textgate(options: Options) -> dict[str, Any]:
    """Train with textgate's loop and params.yaml's defaults, scoring the test split at each
    validation (the hook's time is not training time); score the kept (best) weights."""

    from tasks.train import ConsoleReport
    from textgate.model import build_classifier, predict_logits, select_device
    from textgate.training import EvalPoint, TrainingCallbacks, seed_everything, train_classifier

    config = _train_config(options)
    labels, splits = load_data(options, config.seed)
    label_ids = {label: index for index, label in enumerate(labels)}
    ids = {name: [label_ids[label] for label in split.labels] for name, split in splits.items()}
    device = select_device(config.device)
    seed_everything(config.seed)
    model, tokenizer = build_classifier(config.base_model, labels, config.pooling)
    test_texts = splits["test"].texts
    points: list[dict[str, Any]] = []
    hook_seconds = 0.0

    def score_test(point: EvalPoint) -> None:
        nonlocal hook_seconds
        start = time.perf_counter()
        logits = predict_logits(
            point.model, tokenizer, test_texts, config.max_length, EVAL_BATCH_SIZE
        )
        scores = score(ids["test"], logits.argmax(axis=1), labels, options.oos_label)
        points.append(
            {
                "seconds": point.seconds,
                "step": point.step,
                "epoch": point.epoch,
                "val_macro_f1": point.val_macro_f1,
                "test_accuracy": scores["accuracy"],
                "test_in_scope_accuracy": scores["in_scope_accuracy"],
            }
        )
        hook_seconds += time.perf_counter() - start
        log(
            f"textgate: step {point.step}, {point.seconds:.1f} s, test accuracy "
            f"{scores['accuracy']:.4f}"
        )

    log(f"textgate: train_classifier on {len(splits['train'].texts)} examples, {device}")
    console = ConsoleReport()
    result = train_classifier(
        model,
        tokenizer,
        splits["train"].texts,
        ids["train"],
        splits["val"].texts,
        ids["val"],
        config,
        device,
        callbacks=TrainingCallbacks(
            on_progress=console.progress, on_validation=console.validated, on_evaluate=score_test
        ),
    )
    unknown = score_unknown(model, tokenizer, labels, splits, ids, options)
    return {
        "seconds": result.seconds,
        "hook_seconds": hook_seconds,
        "optimizer_steps": result.optimizer_steps,
        "epochs": result.epochs_run,
        "best_step": result.best_step,
        "stopped_early": result.stopped_early,
        "samples_per_second": result.samples_per_second,
        "padding_fraction": result.padding_fraction,
        "test": unknown["served"]["test"],
        "test_argmax": unknown["argmax"],
        "methods": unknown["methods"],
        "served_runtime": unknown["served"]["runtime"],
        "threshold": unknown["served"]["policy"],
        "points": points,
        "peak_memory_mb": result.peak_memory_mb,
        "threads": result.threads,
        "device": result.device,
        "train_config": config.model_dump(mode="json"),
    }


def score_unknown(
    model: Any,
    tokenizer: Any,
    labels: list[str],
    splits: dict[str, Split],
    ids: dict[str, list[int]],
    options: Options,
) -> dict[str, Any]:
    """Every unknown score on the trained model (threshold on val, fp32), and the served
    answers of params' method: the model saved, exported to int8 ONNX and loaded as served."""
    from textgate.model import predict_outputs
    from textgate.stats import fit_temperature
    from textgate.unknown import METHODS, fit_gaussian

    config = _train_config(options)
    outputs = {
        name: predict_outputs(model, tokenizer, split.texts, config.max_length, EVAL_BATCH_SIZE)
        for name, split in splits.items()
    }
    temperature = fit_temperature(outputs["val"][0], ids["val"])
    oos = labels.index(options.oos_label) if options.oos_label in labels else None
    gaussian = fit_gaussian(outputs["train"][1], ids["train"], exclude=oos)
    val, test = ((*outputs[name], ids[name]) for name in ("val", "test"))
    methods = {
        method: thresholded(method, val, test, labels, options, temperature, gaussian)
        for method in METHODS
    }
    for method, result in methods.items():
        log(f"unknown score {method}: val {result['val']}, test {result['test']}")
    argmax = score(ids["test"], outputs["test"][0].argmax(axis=1), labels, options.oos_label)
    policy = methods[config.unknown_score]["policy"]
    return {
        "methods": methods,
        "argmax": argmax,
        "served": serve_and_score(
            model,
            tokenizer,
            labels,
            splits["test"],
            ids["test"],
            options,
            temperature,
            gaussian,
            policy,
        ),
    }


def serve_and_score(
    model: Any,
    tokenizer: Any,
    labels: list[str],
    test: Split,
    y_test: list[int],
    options: Options,
    temperature: float,
    gaussian: Any,
    policy: dict[str, Any],
) -> dict[str, Any]:
    """The test split answered by the model as the train stage saves it and serving loads it
    (int8 ONNX on CPUs when train.quantize is int8), abstention included."""
    from textgate.model import save_classifier
    from textgate.runtime import load_classifier

    config = _train_config(options)
    metadata = {
        "max_length": config.max_length,
        "redact_pii": False,  # the bench's texts are used as they are
        "calibration": {"temperature": temperature},
        "abstention": policy,
        "out_of_scope_label": options.oos_label if options.oos_label in labels else None,
    }

    def finish(model_dir: Path) -> None:
        gaussian.save(model_dir)
        if config.quantize == "int8":
            from textgate.export import export_onnx

            export_onnx(model_dir, quantize=True)

    with tempfile.TemporaryDirectory(prefix="textgate-bench-model-") as tmp:
        model_dir = options.keep_model or Path(tmp) / "model"
        save_classifier(model.cpu(), tokenizer, labels, metadata, model_dir, finalize=finish)
        classifier = load_classifier(model_dir)
        detector = classifier.unknown
        logits, embeddings = classifier.predict_outputs(test.texts, EVAL_BATCH_SIZE)
        scores = detector.scores(logits, embeddings)
        unknown = detector.unknown(logits, embeddings)
    figures = served(y_test, logits, unknown, scores, labels, options.oos_label)
    log(f"served ({classifier.runtime}, {policy['method']}): test {figures}")
    return {"test": figures, "runtime": classifier.runtime, "policy": policy}


WORKERS = {"baseline": run_baseline, "textgate": run_textgate}


def run_worker(name: str, options: Options) -> dict[str, Any]:
    """Run one side in a fresh Python process (its own memory peak, threads and RNG)."""
    with tempfile.TemporaryDirectory(prefix="textgate-bench-train-") as tmp:
        out = Path(tmp) / "result.json"
        command = [sys.executable, "-m", "bench.train", *to_argv(options)]
        command += ["--worker", name, "--worker-out", str(out)]
        # The worker's stdout (training logs) goes to our stderr: stdout is the report's.
        code = subprocess.run(command, stdout=sys.stderr, check=False).returncode
        if code != 0 or not out.is_file():
            raise BenchError(f"the {name} run failed (exit code {code}); its output is above")
        return json.loads(out.read_text(encoding="utf-8"))


# --- report ----------------------------------------------------------------------------------


def evaluate_targets(
    speedup: float | None, accuracy: float | None, accuracy_name: str, oos_recall: float | None
) -> dict[str, Any]:
    """Each target with its value, threshold and verdict, and whether all are met.

    The speedup has no target without a baseline (None); out-of-scope recall only on data
    with an out-of-scope label, where the accuracy is the in-scope one.
    """
    accuracy = math.nan if accuracy is None else accuracy
    checks: dict[str, dict[str, Any]] = {}
    if speedup is not None:
        checks["speedup"] = {
            "value": speedup,
            "threshold": TARGET_SPEEDUP,
            "passed": bool(speedup >= TARGET_SPEEDUP),
        }
    floor = TARGET_IN_SCOPE_ACCURACY if oos_recall is not None else TARGET_ACCURACY
    checks["accuracy"] = {
        "value": accuracy,
        "threshold": floor,
        "passed": bool(accuracy >= floor),
        "measure": accuracy_name,
    }
    if oos_recall is not None:
        checks["oos_recall"] = {
            "value": oos_recall,
            "threshold": TARGET_OOS_RECALL,
            "passed": bool(oos_recall >= TARGET_OOS_RECALL),
        }
    return {**checks, "passed": all(check["passed"] for check in checks.values())}


def build_report(
    baseline: dict[str, Any] | None,
    textgate: dict[str, Any],
    config: dict[str, Any],
    machine: dict[str, Any],
) -> dict[str, Any]:
    """The whole result, as printed on the JSON last line (baseline None: skipped)."""
    reached = reach_seconds = speedup = None
    if baseline is not None:
        reached = time_to_reach(textgate["points"], baseline["test"]["accuracy"])
        reach_seconds = None if reached is None else reached["seconds"]
        speedup = ratio(baseline["seconds"], reach_seconds)
    test = textgate["test"]
    if test["in_scope_accuracy"] is not None and test.get("oos_recall") is not None:
        accuracy, accuracy_name = test["in_scope_accuracy"], "in-scope test accuracy (as served)"
    else:
        accuracy, accuracy_name = test["accuracy"], "test accuracy"
    return {
        "baseline": baseline,
        "textgate": textgate,
        "time_to_reach_baseline_s": reach_seconds,
        "reached_at": reached,
        "speedup": speedup,
        "targets": evaluate_targets(speedup, accuracy, accuracy_name, test.get("oos_recall")),
        "config": config,
        "machine": machine,
    }


def _cell(value: Any, pattern: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return pattern.format(value)


# (title, key in a side's scores, format) of the test-split rows
SCORE_ROWS = (
    ("test accuracy", "accuracy", "{:.4f}"),
    ("in-scope accuracy", "in_scope_accuracy", "{:.4f}"),
    ("out-of-scope recall", "oos_recall", "{:.4f}"),
    ("out-of-scope precision", "oos_precision", "{:.4f}"),
    ("unknown-score AUROC", "unknown_auroc", "{:.4f}"),
    ("coverage", "coverage", "{:.4f}"),
    ("test macro-F1", "macro_f1", "{:.4f}"),
)


def format_report(report: dict[str, Any]) -> str:
    """Readable tables (run, test scores as served, unknown-score methods on validation), the
    time to reach the baseline's accuracy and one line per target."""
    baseline, textgate = report["baseline"], report["textgate"]
    lines = [f"{'':24}{'baseline':>12}{'textgate':>12}{'textgate/baseline':>19}"]
    for title, key, pattern, compare in (
        ("training time (s)", "seconds", "{:.1f}", True),
        ("samples/s", "samples_per_second", "{:.1f}", True),
        ("optimizer steps", "optimizer_steps", "{:.0f}", False),
        ("epochs", "epochs", "{:.0f}", False),
        ("peak memory (MiB)", "peak_memory_mb", "{:.0f}", True),
    ):
        mine, theirs = textgate[key], None if baseline is None else baseline[key]
        relative = _cell(ratio(mine, theirs), "{:.2f}x") if compare else ""
        lines.append(
            f"{title:24}{_cell(theirs, pattern):>12}{_cell(mine, pattern):>12}{relative:>19}"
        )
    columns = {
        "baseline argmax": None if baseline is None else baseline["test"],
        "baseline thr.": None if baseline is None else baseline.get("test_thresholded"),
        "textgate argmax": textgate.get("test_argmax"),
        "textgate served": textgate["test"],
    }
    lines.append("test split, abstention as served (thr.: softmax confidence threshold on val):")
    lines.append(f"{'':24}" + "".join(f"{name:>17}" for name in columns))
    for title, key, pattern in SCORE_ROWS:
        cells = [_cell(None if c is None else c.get(key), pattern) for c in columns.values()]
        if set(cells) != {"n/a"}:
            lines.append(f"{title:24}" + "".join(f"{cell:>17}" for cell in cells))
    lines += format_methods(textgate.get("methods") or {})
    lines.append(
        f"textgate's training time leaves out its evaluation hook (test scoring at each "
        f"validation): {textgate['hook_seconds']:.1f} s"
    )
    if baseline is not None:
        target = baseline["test"]["accuracy"]
        reached = report["reached_at"]
        if reached is None:
            lines.append(f"textgate never reached the baseline's test accuracy {target:.4f}")
        else:
            lines.append(
                f"textgate reached the baseline's test accuracy {target:.4f} after "
                f"{reached['seconds']:.1f} s (step {reached['step']}, epoch {reached['epoch']}; "
                f"test accuracy {reached['test_accuracy']:.4f})"
            )
    targets = report["targets"]
    descriptions = {
        "speedup": ("baseline time / textgate time to reach it", "{:.2f}x", ">= {:.1f}x"),
        "accuracy": (f"textgate {targets['accuracy']['measure']}", "{:.4f}", ">= {:.2f}"),
        "oos_recall": ("textgate out-of-scope recall (as served)", "{:.4f}", ">= {:.2f}"),
    }
    for key, (title, shown, bound) in descriptions.items():
        if key not in targets:
            continue
        check = targets[key]
        verdict = "pass" if check["passed"] else "FAIL"
        value = _cell(check["value"], shown)
        lines.append(f"[{verdict}] {title}: {value} (target {bound.format(check['threshold'])})")
    lines.append(f"all targets met: {'yes' if targets['passed'] else 'no'}")
    return "\n".join(lines)


def format_methods(methods: dict[str, Any]) -> list[str]:
    """One row per unknown-score method: AUROC, and the threshold chosen on val applied."""
    if not methods:
        return []
    lines = [
        "unknown-score methods (fp32; threshold chosen on val for the params' target):",
        f"{'method':20}{'val AUROC':>10}{'val oos rec.':>13}{'val in-scope':>13}"
        f"{'test AUROC':>11}{'test oos rec.':>14}{'test in-scope':>14}",
    ]
    for method, result in methods.items():
        val, test = result["val"], result["test"]
        cells = [
            (val["unknown_auroc"], 10),
            (val["oos_recall"], 13),
            (val["in_scope_accuracy"], 13),
            (test["unknown_auroc"], 11),
            (test["oos_recall"], 14),
            (test["in_scope_accuracy"], 14),
        ]
        lines.append(f"{method:20}" + "".join(f"{_cell(v, '{:.4f}'):>{w}}" for v, w in cells))
    return lines


def run(options: Options) -> dict[str, Any]:
    """The baseline, then textgate, each in its own process; return the report."""
    config_seed = _train_config(options).seed
    labels, splits = load_data(options, config_seed)  # fail early on bad data
    sizes = {name: len(split.texts) for name, split in splits.items()}
    log(f"data {options.data}: {sizes}, {len(labels)} labels")
    machine = machine_info("torch", "transformers", "accelerate")
    baseline = None
    if not options.skip_baseline:
        baseline = run_worker("baseline", options)
        accuracy = baseline["test"]["accuracy"]
        log(f"baseline: {baseline['seconds']:.1f} s, test accuracy {accuracy:.4f}")
    textgate = run_worker("textgate", options)
    log(f"textgate: {textgate['seconds']:.1f} s, test accuracy {textgate['test']['accuracy']:.4f}")
    config = {
        "data": str(options.data),
        "sizes": sizes,
        "labels": len(labels),
        "seed": config_seed,
        "base_model": _train_config(options).base_model,
        "baseline_recipe": {
            "batch_size": BASELINE_BATCH_SIZE,
            "learning_rate": BASELINE_LEARNING_RATE,
            "max_length": BASELINE_MAX_LENGTH,
            "padding": "max_length",
            "epochs": BASELINE_EPOCHS,
        },
    }
    return build_report(baseline, textgate, config, machine)


# --- command line ----------------------------------------------------------------------------


def to_argv(options: Options) -> list[str]:
    """The command-line arguments that give `options` back (for the worker processes)."""
    argv = ["--data", str(options.data), "--params", str(options.params)]
    argv += ["--oos-label", options.oos_label]
    if options.skip_baseline:
        argv.append("--skip-baseline")
    if options.keep_model is not None:
        argv += ["--keep-model", str(options.keep_model)]
    for flag, value in (
        ("--max-train", options.max_train),
        ("--max-val", options.max_val),
        ("--max-test", options.max_test),
        ("--seed", options.seed),
        ("--base-model", options.base_model),
    ):
        if value is not None:
            argv += [flag, str(value)]
    return argv


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.train", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--data", type=Path, required=True, help="folder of train/val/test.csv")
    parser.add_argument("--params", type=Path, default=Path(PARAMS_FILE))
    parser.add_argument(
        "--max-train", type=positive_int, help="a stratified subset of the training split"
    )
    parser.add_argument("--max-val", type=positive_int, help="a stratified subset of val")
    parser.add_argument("--max-test", type=positive_int, help="a stratified subset of test")
    parser.add_argument("--seed", type=int, help="default: train.seed in params")
    parser.add_argument("--base-model", help="default: train.base_model in params")
    parser.add_argument(
        "--oos-label",
        default=OOS_LABEL,
        help="the out-of-scope label, left out of in-scope accuracy",
    )
    parser.add_argument(
        "--skip-baseline", action="store_true", help="run textgate alone (a quick check)"
    )
    parser.add_argument("--keep-model", type=Path, help="keep textgate's model directory here")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> tuple[Options, argparse.Namespace]:
    args = _parser().parse_args(argv)
    options = Options(
        data=args.data,
        params=args.params,
        max_train=args.max_train,
        max_val=args.max_val,
        max_test=args.max_test,
        seed=args.seed,
        base_model=args.base_model,
        oos_label=args.oos_label,
        skip_baseline=args.skip_baseline,
        keep_model=args.keep_model,
    )
    return options, args


def main(argv: Sequence[str] | None = None) -> int:
    from textgate.errors import TextgateError

    options, args = parse_args(argv)
    try:
        if args.worker:
            result = WORKERS[args.worker](options)
            args.worker_out.write_text(json.dumps(json_ready(result)), encoding="utf-8")
            return 0
        report = run(options)
    except (BenchError, TextgateError) as error:
        print(f"bench.train: {error}", file=sys.stderr)
        return 2
    print(format_report(report))
    print(json_line(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
