"""DVC stage `prepare`: clean, redact, de-duplicate and split the validated raw data."""

from __future__ import annotations

import sys
from dataclasses import asdict

from tasks.common import stage_main
from textgate.artifacts import (
    SPLITS,
    LabelMap,
    PrepareStats,
    ValidatedLabels,
    prepare_outputs,
    read_artifact,
    validate_outputs,
    write_artifact,
)
from textgate.config import Params
from textgate.errors import DataError
from textgate.io import atomic_path, read_labelled, read_training
from textgate.prepare import clean_frame, stratified_split
from textgate.repair import repair_data
from textgate.text import TextCleaning


def run(params: Params) -> dict[str, int]:
    """Write train/val/test Parquet files, the label map and cleaning statistics."""
    data, prepare = params.data, params.prepare
    labels = read_artifact(ValidatedLabels, validate_outputs(params).report).labels
    cleaning = TextCleaning.from_params(prepare)
    raw_train = read_training(data)[["text", "label"]]
    raw_test = None
    if data.test_path is not None:
        raw_test = read_labelled(data.test_path, data.text_column, data.label_column, data.encoding)
    # The repairs validate counted (data.label_aliases, on_duplicates, on_test_overlap).
    raw_train, raw_test, repairs = repair_data(raw_train, raw_test, data)
    frame, stats = clean_frame(raw_train, cleaning)
    if raw_test is None:
        fractions = {"val": prepare.val_fraction, "test": prepare.test_fraction}
        parts = stratified_split(frame, fractions, prepare.seed)
    else:
        test, test_stats = clean_frame(raw_test, cleaning)
        parts = stratified_split(frame, {"val": prepare.val_fraction}, prepare.seed)
        parts["test"] = test
    unknown = sorted(set().union(*(set(part["label"]) for part in parts.values())) - set(labels))
    if unknown:
        raise DataError(f"labels not in the validated label set: {unknown}")

    outputs = prepare_outputs(params)
    outputs.directory.mkdir(parents=True, exist_ok=True)
    for name in SPLITS:
        with atomic_path(outputs.split(name)) as tmp:
            parts[name].to_parquet(tmp, index=False)
    write_artifact(LabelMap, outputs.label_map, {"labels": labels})
    sizes = {name: len(parts[name]) for name in SPLITS}
    summary = {"splits": sizes, "train_file": asdict(stats), "repairs": repairs.as_dict()}
    if raw_test is not None:
        summary["test_file"] = asdict(test_stats)
    write_artifact(PrepareStats, outputs.stats, summary)
    print(
        f"prepare: {sizes}; PII redacted {stats.pii_redacted}; "
        f"{stats.duplicates_dropped} duplicates dropped; repairs {repairs.as_dict()}"
    )
    return sizes


if __name__ == "__main__":
    sys.exit(stage_main("prepare", run))
