"""Every unknown score of a trained model at several out-of-scope recall targets, as served.

    python -m bench.unknown_methods --data DIR --model MODEL_DIR [--oos-label oos]
        [--targets 0.8,0.85,0.9]

DIR holds train.csv, val.csv and test.csv (`text,label`) with an out-of-scope label; MODEL_DIR
a textgate model directory (e.g. kept by `python -m bench.train --keep-model`). The model runs
as served (int8 ONNX when it has one) with its own Gaussian (`unknown.npz`, fitted by the
train stage; fitted here on the training split's embeddings when the model has none); each
method (textgate.unknown.METHODS) has a combined score standardised on the in-scope
validation rows, as the train stage does, its threshold chosen on the validation split
for each target, and scored on the test split: the table of README "Out of scope". The last
line printed on stdout is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import json_line, log


def scores_table(
    model_dir: Path, data: Path, oos_label: str, targets: Sequence[float]
) -> dict[str, Any]:
    """Per method: val and test AUROC, and per target the in-scope accuracy and out-of-scope
    recall as served on val and test."""
    import pandas as pd

    from textgate.runtime import load_classifier
    from textgate.unknown import (
        METHODS,
        Gaussian,
        auroc,
        choose_unknown_threshold,
        fit_gaussian,
        fit_standardization,
        served_scores,
        served_unknown,
        unknown_scores,
    )

    classifier = load_classifier(model_dir)
    index = {label: i for i, label in enumerate(classifier.labels)}
    if oos_label not in index:
        raise SystemExit(f"{oos_label!r} is not a label of the model in {model_dir}")
    oos = index[oos_label]
    temperature = classifier.temperature
    splits = {}
    for name in ("train", "val", "test"):
        frame = pd.read_csv(data / f"{name}.csv")
        logits, embeddings = classifier.predict_outputs(frame["text"].astype(str).tolist(), 64)
        y = np.array([index[str(label)] for label in frame["label"]])
        splits[name] = (logits, embeddings, y)
    gaussian = Gaussian.load(model_dir) or fit_gaussian(
        splits["train"][1], splits["train"][2], exclude=oos
    )

    def served(split: tuple, scores: np.ndarray, threshold: float | None) -> dict[str, float]:
        predicted, y = split[0].argmax(axis=1), split[2]
        unknown = served_unknown(predicted, scores, threshold, oos)
        figures = served_scores(y, predicted, unknown, scores, oos)
        return {key: figures[key] for key in ("in_scope_accuracy", "oos_recall")}

    val, test = splits["val"], splits["test"]
    result: dict[str, Any] = {"argmax": served(test, np.zeros(len(test[2])), None)}
    for method in METHODS:
        fitted = {"temperature": temperature, "gaussian": gaussian}
        standardization = fit_standardization(method, *val, oos, **fitted)
        fitted["standardization"] = standardization
        score = {name: unknown_scores(method, s[0], s[1], **fitted) for name, s in splits.items()}
        row: dict[str, Any] = {
            "val_auroc": auroc(val[2] == oos, score["val"]),
            "test_auroc": auroc(test[2] == oos, score["test"]),
        }
        for target in targets:
            policy = choose_unknown_threshold(
                method,
                score["val"],
                val[2],
                val[0].argmax(axis=1),
                oos_index=oos,
                target_precision=1.0,
                target_oos_recall=target,
                standardization=standardization,
            )
            row[str(target)] = {
                "val": served(val, score["val"], policy.threshold),
                "test": served(test, score["test"], policy.threshold),
            }
        result[method] = row
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="folder of train/val/test.csv")
    parser.add_argument("--model", type=Path, required=True, help="a textgate model directory")
    parser.add_argument("--oos-label", default="oos")
    parser.add_argument("--targets", default="0.8,0.85,0.9", help="out-of-scope recall targets")
    options = parser.parse_args(argv)
    targets = [float(value) for value in options.targets.split(",")]
    log(f"[bench] unknown scores of {options.model} on {options.data}")
    result = scores_table(options.model, options.data, options.oos_label, targets)
    argmax = result["argmax"]
    print(
        f"argmax: test in-scope accuracy {argmax['in_scope_accuracy']:.4f}, "
        f"oos recall {argmax['oos_recall']:.4f}"
    )
    print("method               val AUROC test AUROC  per val target: test in-scope / oos recall")
    for method, row in result.items():
        if method == "argmax":
            continue
        cells = "  ".join(
            f"{t}: {row[str(t)]['test']['in_scope_accuracy']:.4f} / "
            f"{row[str(t)]['test']['oos_recall']:.4f}"
            for t in targets
        )
        print(f"{method:20s} {row['val_auroc']:9.4f} {row['test_auroc']:10.4f}  {cells}")
    print(json_line(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
