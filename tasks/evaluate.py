"""DVC stage `evaluate`: score the trained model on the test split; metrics, plots, confusion."""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

from tasks.common import stage_main
from textgate.config import Params
from textgate.io import atomic_path, write_json
from textgate.metrics import Metrics, compute_metrics
from textgate.model import TextClassifier


def plot_confusion(metrics: Metrics, path: Path) -> None:
    """Save the confusion matrix as a PNG (rows = actual, columns = predicted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = max(6.0, 0.55 * len(metrics.labels) + 2)
    figure, axes = plt.subplots(figsize=(size, size))
    axes.imshow(metrics.confusion, cmap="Blues")
    axes.set_xticks(range(len(metrics.labels)), metrics.labels, rotation=60, ha="right")
    axes.set_yticks(range(len(metrics.labels)), metrics.labels)
    axes.set_xlabel("predicted")
    axes.set_ylabel("actual")
    peak = max(max(row) for row in metrics.confusion) or 1
    for i, row in enumerate(metrics.confusion):
        for j, count in enumerate(row):
            if count:
                colour = "white" if count > peak / 2 else "black"
                axes.text(j, i, str(count), ha="center", va="center", color=colour, fontsize=8)
    axes.set_title(f"accuracy {metrics.accuracy:.3f}, macro-F1 {metrics.macro_f1:.3f}")
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110)
    plt.close(figure)


def run(params: Params) -> Metrics:
    """Write metrics.json, per_class.json, confusion.csv (DVC plot) and confusion.png."""
    out = params.evaluate.output_dir
    classifier = TextClassifier(params.train.output_dir / "model")
    test = pd.read_parquet(params.prepare.output_dir / "test.parquet")
    label_ids = {label: index for index, label in enumerate(classifier.labels)}
    probabilities = classifier.predict_proba(test["text"].tolist(), params.evaluate.batch_size)
    predicted = probabilities.argmax(axis=1)
    metrics = compute_metrics(test["label"].map(label_ids).tolist(), predicted, classifier.labels)

    out.mkdir(parents=True, exist_ok=True)
    write_json(
        out / "metrics.json",
        {"accuracy": metrics.accuracy, "macro_f1": metrics.macro_f1, "n_test": metrics.n},
    )
    write_json(
        out / "per_class.json",
        {label: scores.model_dump() for label, scores in metrics.per_class.items()},
    )
    pairs = pd.DataFrame(
        {"actual": test["label"], "predicted": [classifier.labels[i] for i in predicted]}
    )
    with atomic_path(out / "confusion.csv") as tmp:
        pairs.to_csv(tmp, index=False)
    plot_confusion(metrics, out / "confusion.png")
    print(
        f"evaluate: accuracy {metrics.accuracy:.4f}, macro-F1 {metrics.macro_f1:.4f} "
        f"on {metrics.n} test examples"
    )
    return metrics


if __name__ == "__main__":
    sys.exit(stage_main("evaluate", run))
