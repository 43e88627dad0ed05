"""DVC stage `evaluate`: score the trained model on the test split; metrics, plots, confusion."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tasks.common import stage_main
from textgate.artifacts import Behaviour as BehaviourFile
from textgate.artifacts import (
    EvaluateMetrics,
    EvaluateOutputs,
    PerClass,
    evaluate_outputs,
    prepare_outputs,
    train_outputs,
    write_artifact,
)
from textgate.behaviour import (
    MUST_PASS,
    InvarianceResult,
    MustPassCase,
    MustPassResult,
    load_must_pass,
    must_pass,
)
from textgate.behaviour import invariance as invariance_rates
from textgate.config import EvaluateConfig, Params
from textgate.io import atomic_path, write_json
from textgate.metrics import Metrics, compute_metrics
from textgate.model import Classifier, make_predictions
from textgate.runtime import load_classifier
from textgate.stats import expected_calibration_error, softmax
from textgate.unknown import served_scores, served_unknown


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


def golden_cases(
    classifier: Classifier, texts: list[str], count: int, seed: int, extra: list[str]
) -> list[dict[str, object]]:
    """Texts with their offline answers, replayed against the served bento before promotion.

    `count` test texts (a seeded sample) plus `extra` (the must-pass texts). Each answer is
    computed one text at a time, as the replay sends them: int8 activations are quantised
    per batch, so a text's score can move in the third decimal with what it is batched with.
    """
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(len(texts), size=min(count, len(texts)), replace=False).tolist())
    golden = []
    for text in [texts[i] for i in chosen] + extra:
        (prediction,) = classifier.predict([text], batch_size=1)
        golden.append({"text": text, "label": prediction.label, "score": prediction.score})
    return golden


@dataclass(frozen=True)
class Split:
    """The test split as the classifier sees it: texts, label names and label indices."""

    texts: list[str]
    labels: pd.Series
    y_true: np.ndarray  # (examples,) index into the classifier's labels


@dataclass(frozen=True)
class Scores:
    """The test-split scores: metrics, calibrated probabilities, ECE, and the extra figures
    (runtime, fp32 accuracy of an ONNX model, abstention) that go into metrics.json."""

    metrics: Metrics
    probabilities: np.ndarray  # (examples, labels), temperature-scaled
    ece: float
    ece_uncalibrated: float
    extra: dict[str, Any]
    unknown: np.ndarray | None = None  # (examples,) answered "unknown" as served


@dataclass(frozen=True)
class Behaviour:
    """The behavioural tests: invariance per perturbation, the must-pass file, their rates."""

    invariance: dict[str, InvarianceResult]
    must_pass: MustPassResult
    rates: dict[str, float | None]


def load_test_split(params: Params, classifier: Classifier) -> Split:
    """The prepared test split, with its labels as indices into `classifier.labels`."""
    test = pd.read_parquet(prepare_outputs(params).split("test"))
    label_ids = {label: index for index, label in enumerate(classifier.labels)}
    return Split(
        texts=test["text"].tolist(),
        labels=test["label"],
        y_true=test["label"].map(label_ids).to_numpy(),
    )


def score_test_split(
    classifier: Classifier, split: Split, config: EvaluateConfig, model_dir: Path
) -> Scores:
    """Metrics, calibration and (for an ONNX model) the fp32 accuracy on the test split.

    With an out-of-scope label, the metrics score the answers as served: an "unknown" answer
    is the out-of-scope label (right on out-of-scope rows, wrong on the others).
    """
    detector = classifier.unknown
    logits, embeddings = classifier.predict_outputs(
        split.texts,
        config.batch_size,
        embeddings=detector is not None and detector.needs_embeddings,
    )
    probabilities = softmax(logits, classifier.temperature)
    predicted = served_labels(logits, classifier, embeddings)
    metrics = compute_metrics(split.y_true.tolist(), predicted, classifier.labels)
    ece = expected_calibration_error(probabilities, split.y_true, config.calibration_bins)
    ece_raw = expected_calibration_error(softmax(logits), split.y_true, config.calibration_bins)
    extra: dict[str, Any] = {"runtime": classifier.runtime}
    if classifier.runtime.startswith("onnx"):
        fp32 = load_classifier(model_dir, runtime="torch")
        fp32_logits, fp32_embeddings = fp32.predict_outputs(
            split.texts,
            config.batch_size,
            embeddings=detector is not None and detector.needs_embeddings,
        )
        fp32_predicted = served_labels(fp32_logits, fp32, fp32_embeddings)
        extra["accuracy_fp32"] = float((fp32_predicted == split.y_true).mean())
    if detector is not None:
        scores = detector.scores(logits, embeddings)
        unknown = served_unknown(
            logits.argmax(axis=1), scores, detector.threshold, detector.oos_index
        )
        extra["abstention"] = {
            "method": detector.method,
            "out_of_scope_label": None
            if detector.oos_index is None
            else classifier.labels[detector.oos_index],
            "threshold": detector.threshold,
            "abstained": int(unknown.sum()),
            **served_scores(
                split.y_true, logits.argmax(axis=1), unknown, scores, detector.oos_index
            ),
        }
        return Scores(metrics, probabilities, ece, ece_raw, extra, unknown)
    return Scores(metrics, probabilities, ece, ece_raw, extra)


def served_labels(
    logits: np.ndarray, classifier: Classifier, embeddings: np.ndarray | None
) -> np.ndarray:
    """(n,) label indices as scored: the argmax, or the out-of-scope label's index where the
    answer is "unknown" (only when the model declares one)."""
    predicted = logits.argmax(axis=1)
    detector = classifier.unknown
    if detector is None or detector.oos_index is None:
        return predicted
    return np.where(detector.unknown(logits, embeddings), detector.oos_index, predicted)


def run_behaviour(
    classifier: Classifier,
    texts: list[str],
    must_pass_cases: list[MustPassCase],
    config: EvaluateConfig,
) -> Behaviour:
    """Invariance to perturbations of the test texts, and the must-pass cases."""

    def predict_ids(batch: list[str]) -> np.ndarray:
        return classifier.predict_proba(batch, config.batch_size).argmax(axis=1)

    invariance = invariance_rates(
        predict_ids, texts, max_examples=config.behaviour_examples, seed=config.seed
    )
    # A must-pass case answered "unknown" (abstained) is not answered as written: it fails.
    must = must_pass(
        lambda batch: [p.label for p in classifier.predict(batch, config.batch_size)],
        must_pass_cases,
    )
    rates: dict[str, float | None] = {kind: result.rate for kind, result in invariance.items()}
    rates[MUST_PASS] = must.rate
    return Behaviour(invariance, must, rates)


def metrics_payload(classifier: Classifier, scores: Scores, behaviour: Behaviour) -> dict[str, Any]:
    """metrics.json's content: what the gate reads."""
    return {
        "accuracy": scores.metrics.accuracy,
        "macro_f1": scores.metrics.macro_f1,
        "n_test": scores.metrics.n,
        "ece": scores.ece,
        "ece_uncalibrated": scores.ece_uncalibrated,
        "temperature": classifier.temperature,
        "behaviour": behaviour.rates,
        **scores.extra,
    }


def write_scores(
    out: EvaluateOutputs, classifier: Classifier, scores: Scores, behaviour: Behaviour
) -> None:
    """metrics.json, per_class.json and behaviour.json."""
    metrics = scores.metrics
    write_artifact(EvaluateMetrics, out.metrics, metrics_payload(classifier, scores, behaviour))
    write_artifact(
        PerClass,
        out.per_class,
        {label: per_class.model_dump() for label, per_class in metrics.per_class.items()},
    )
    write_artifact(
        BehaviourFile,
        out.behaviour,
        {
            "invariance": {
                kind: result.model_dump() for kind, result in behaviour.invariance.items()
            },
            MUST_PASS: behaviour.must_pass.model_dump(),
        },
    )


def write_predictions(
    out: EvaluateOutputs,
    classifier: Classifier,
    split: Split,
    probabilities: np.ndarray,
    unknown: np.ndarray | None,
) -> pd.DataFrame:
    """predictions.parquet: one row per test example (for the champion comparison)."""
    offline = make_predictions(probabilities, classifier.labels, unknown)
    frame = pd.DataFrame(
        {
            "text": split.texts,
            "label": split.labels,
            "predicted": [p.best_label for p in offline],
            "score": [p.score for p in offline],
            "abstained": [p.abstained for p in offline],
        }
    )
    with atomic_path(out.predictions) as tmp:
        frame.to_parquet(tmp, index=False)
    return frame


def print_summary(classifier: Classifier, scores: Scores, behaviour: Behaviour) -> None:
    """The stage's summary lines: accuracy, calibration, abstention, behaviour rates."""
    metrics, extra = scores.metrics, scores.extra
    print(
        f"evaluate: accuracy {metrics.accuracy:.4f}, macro-F1 {metrics.macro_f1:.4f} "
        f"on {metrics.n} test examples ({classifier.runtime}"
        + (f"; fp32 {extra['accuracy_fp32']:.4f}" if "accuracy_fp32" in extra else "")
        + f"); ECE {scores.ece_uncalibrated:.4f} -> {scores.ece:.4f} "
        f"(temperature {classifier.temperature:.3f})"
    )
    if "abstention" in extra:
        abstention = extra["abstention"]
        figures = ", ".join(
            f"{key} {value:.4f}"
            for key in ("in_scope_accuracy", "oos_recall", "oos_precision", "unknown_auroc")
            if (value := abstention.get(key)) is not None
        )
        print(
            f"abstention ({abstention['method']} score above {abstention['threshold']}): "
            f"answers {abstention['coverage']:.1%} of the test set; as served: {figures}"
        )
    print(
        "behaviour: "
        + ", ".join(f"{k} {'n/a' if v is None else f'{v:.3f}'}" for k, v in behaviour.rates.items())
    )


def run(params: Params) -> Metrics:
    """Score the model on the test split and run the behavioural tests.

    Writes metrics.json (DVC metrics), per_class.json, predictions.parquet (one row per test
    example, for the champion comparison), behaviour.json, golden.json (requests replayed
    against the bento), confusion.csv (DVC plot) and confusion.png.
    """
    config = params.evaluate
    out = evaluate_outputs(params)
    model_dir = train_outputs(params).model_dir
    # The runtime serving will use (int8 ONNX on CPUs when exported): that is what is gated.
    classifier = load_classifier(model_dir)
    must_pass_cases = load_must_pass(config.must_pass_file, classifier.labels)
    split = load_test_split(params, classifier)
    scores = score_test_split(classifier, split, config, model_dir)
    behaviour = run_behaviour(classifier, split.texts, must_pass_cases, config)

    params.evaluate.output_dir.mkdir(parents=True, exist_ok=True)
    write_scores(out, classifier, scores, behaviour)
    frame = write_predictions(out, classifier, split, scores.probabilities, scores.unknown)
    golden = golden_cases(
        classifier,
        split.texts,
        config.golden_requests,
        config.seed,
        extra=[case.text for case in must_pass_cases],
    )
    write_json(out.golden, golden)
    with atomic_path(out.confusion_csv) as tmp:
        frame[["label", "predicted"]].rename(columns={"label": "actual"}).to_csv(tmp, index=False)
    plot_confusion(scores.metrics, out.confusion_png)
    print_summary(classifier, scores, behaviour)
    return scores.metrics


if __name__ == "__main__":
    sys.exit(stage_main("evaluate", run))
