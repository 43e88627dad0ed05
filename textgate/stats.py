"""Calibration and model-comparison statistics: softmax, ECE, temperature, paired bootstrap."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

# scipy is imported by the functions that need it: serving needs only softmax.

Labels = Sequence[int] | np.ndarray
BootstrapMetric = Literal["accuracy", "macro_f1"]
BOOTSTRAP_METRICS: tuple[str, ...] = ("accuracy", "macro_f1")

# Resamples are scored in chunks of at most this many (resample, example) cells, so memory
# stays bounded (~32 MB of float64 counts) however large the evaluation set is.
_MAX_CHUNK_CELLS = 1 << 22


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Probabilities over the last axis of `logits / temperature`, computed stably in float64."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    scaled = np.asarray(logits, dtype=np.float64) / temperature
    # Subtracting the row maximum keeps exp() from overflowing; the result is unchanged.
    shifted = scaled - scaled.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def expected_calibration_error(probabilities: np.ndarray, y_true: Labels, n_bins: int) -> float:
    """Top-label expected calibration error over equal-width confidence bins.

    Each example falls in the bin (lo, hi] of (0, 1] that holds its top probability; the ECE is
    the mean over bins of |accuracy - mean confidence|, weighted by the share of examples.

    Args:
        probabilities: (n, n_classes) class probabilities, one row per example.
        y_true: n true class indices.
        n_bins: number of equal-width bins.
    """
    probs = np.asarray(probabilities, dtype=np.float64)
    if probs.size == 0 or np.size(y_true) == 0:
        raise ValueError("cannot compute calibration error: no examples")
    if probs.ndim != 2:
        raise ValueError(f"probabilities must be 2-D (n, n_classes), got shape {probs.shape}")
    labels = _labels(y_true, "y_true", n_labels=probs.shape[1])
    _same_length(("probabilities", len(probs)), ("y_true", len(labels)))
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    upper_edges = np.linspace(0.0, 1.0, n_bins + 1)[1:]
    # side="left" finds the first upper edge >= confidence, i.e. the bin (lo, hi].
    bins = np.minimum(np.searchsorted(upper_edges, confidence, side="left"), n_bins - 1)
    gap_sum = np.abs(
        np.bincount(bins, weights=correct, minlength=n_bins)
        - np.bincount(bins, weights=confidence, minlength=n_bins)
    )
    # Per bin: (count / n) * |sum(correct) - sum(conf)| / count = |...| / n.
    return float(gap_sum.sum() / len(labels))


def fit_temperature(
    logits: np.ndarray, y_true: Labels, *, bounds: tuple[float, float] = (0.05, 20.0)
) -> float:
    """The temperature T in `bounds` that minimises the mean NLL of softmax(logits / T).

    The search is a bounded scalar minimisation over log T (deterministic).
    """
    from scipy.optimize import minimize_scalar
    from scipy.special import logsumexp

    z = np.asarray(logits, dtype=np.float64)
    if z.size == 0 or np.size(y_true) == 0:
        raise ValueError("cannot fit a temperature: no examples")
    if z.ndim != 2:
        raise ValueError(f"logits must be 2-D (n, n_classes), got shape {z.shape}")
    labels = _labels(y_true, "y_true", n_labels=z.shape[1])
    _same_length(("logits", len(z)), ("y_true", len(labels)))
    low, high = bounds
    if not 0 < low < high:
        raise ValueError(f"bounds must satisfy 0 < low < high, got {bounds}")
    true_logit = z[np.arange(len(labels)), labels]

    def nll(log_t: float) -> float:
        t = math.exp(log_t)
        return float(np.mean(logsumexp(z / t, axis=1) - true_logit / t))

    result = minimize_scalar(
        nll, bounds=(math.log(low), math.log(high)), method="bounded", options={"xatol": 1e-6}
    )
    return float(min(max(math.exp(result.x), low), high))


@dataclass(frozen=True)
class BootstrapResult:
    """Model A minus model B on one metric, with a paired-bootstrap percentile interval."""

    metric: str
    value_a: float
    value_b: float
    delta: float  # value_a - value_b on the full set
    low: float
    high: float
    confidence: float
    n: int
    n_resamples: int


def paired_bootstrap(
    y_true: Labels,
    pred_a: Labels,
    pred_b: Labels,
    n_labels: int,
    *,
    metric: BootstrapMetric,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> BootstrapResult:
    """Compare two models' predictions on the same examples with a paired bootstrap.

    Every resample draws n example indices with replacement and scores both models on those
    same indices, so the interval reflects the difference between the models rather than
    the difficulty of the sample. Macro-F1 averages over all `n_labels` classes, with F1 = 0
    for a class that has no true and no predicted example (as sklearn's `zero_division=0`).

    Returns:
        The full-set values and delta, and the percentile interval of the resampled deltas.
    """
    if metric not in BOOTSTRAP_METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {list(BOOTSTRAP_METRICS)}")
    if n_labels < 1:
        raise ValueError(f"n_labels must be >= 1, got {n_labels}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be strictly between 0 and 1, got {confidence}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    y, a, b = _paired_labels(y_true, pred_a, pred_b, n_labels)
    n = len(y)

    full = np.ones((1, n))
    value_a = float(_scores(full, y, a, n_labels, metric)[0])
    value_b = float(_scores(full, y, b, n_labels, metric)[0])

    rng = np.random.default_rng(seed)
    chunk = max(1, _MAX_CHUNK_CELLS // n)
    deltas = np.empty(n_resamples)
    for start in range(0, n_resamples, chunk):
        size = min(chunk, n_resamples - start)
        counts = _resample_counts(rng.integers(0, n, size=(size, n)), n)
        deltas[start : start + size] = _scores(counts, y, a, n_labels, metric) - _scores(
            counts, y, b, n_labels, metric
        )
    alpha = 1.0 - confidence
    low, high = np.quantile(deltas, [alpha / 2, 1 - alpha / 2])
    return BootstrapResult(
        metric=metric,
        value_a=value_a,
        value_b=value_b,
        delta=value_a - value_b,
        low=float(low),
        high=float(high),
        confidence=confidence,
        n=n,
        n_resamples=n_resamples,
    )


def mcnemar_p_value(y_true: Labels, pred_a: Labels, pred_b: Labels) -> float:
    """Exact two-sided McNemar p-value on the examples exactly one of the two models gets right.

    A binomial test of how those discordant examples split between the models, against 50/50;
    1.0 when the models are right and wrong on exactly the same examples.
    """
    from scipy.stats import binomtest

    y, a, b = _paired_labels(y_true, pred_a, pred_b, n_labels=None)
    correct_a, correct_b = a == y, b == y
    only_a = int(np.sum(correct_a & ~correct_b))
    only_b = int(np.sum(~correct_a & correct_b))
    if only_a + only_b == 0:
        return 1.0
    return float(binomtest(only_a, only_a + only_b, p=0.5, alternative="two-sided").pvalue)


def _resample_counts(indices: np.ndarray, n: int) -> np.ndarray:
    """(resamples, n) indices -> (resamples, n) float counts of how often each example is drawn."""
    rows = indices.shape[0]
    flat = (np.arange(rows)[:, None] * n + indices).ravel()
    return np.bincount(flat, minlength=rows * n).reshape(rows, n).astype(np.float64)


def _scores(
    counts: np.ndarray, y: np.ndarray, pred: np.ndarray, n_labels: int, metric: str
) -> np.ndarray:
    """One metric value per resample, given (resamples, n) example counts."""
    correct = (pred == y).astype(np.float64)
    if metric == "accuracy":
        return (counts @ correct) / counts.sum(axis=1)
    eye = np.eye(n_labels)
    true_onehot = eye[y]  # (n, n_labels)
    tp = counts @ (true_onehot * correct[:, None])  # (resamples, n_labels)
    n_true = counts @ true_onehot  # TP + FN
    n_pred = counts @ eye[pred]  # TP + FP
    # F1 = 2TP / (2TP + FP + FN) = 2TP / (n_true + n_pred); 0 where a class is absent.
    denominator = n_true + n_pred
    f1 = np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0)
    return f1.mean(axis=1)


def _labels(values: Labels, name: str, n_labels: int | None) -> np.ndarray:
    """A 1-D int64 array of class indices, checked against [0, n_labels)."""
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {array.shape}")
    if array.size == 0:
        return array.astype(np.int64)
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{name} must hold integer class indices, got dtype {array.dtype}")
    low, high = int(array.min()), int(array.max())
    if low < 0:
        raise ValueError(f"{name} has a negative class index ({low})")
    if n_labels is not None and high >= n_labels:
        raise ValueError(f"{name} has class index {high}, outside [0, {n_labels})")
    return array.astype(np.int64)


def _same_length(*named: tuple[str, int]) -> None:
    if len({length for _, length in named}) > 1:
        detail = ", ".join(f"{name}={length}" for name, length in named)
        raise ValueError(f"length mismatch: {detail}")


def _paired_labels(
    y_true: Labels, pred_a: Labels, pred_b: Labels, n_labels: int | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    y = _labels(y_true, "y_true", n_labels)
    a = _labels(pred_a, "pred_a", n_labels)
    b = _labels(pred_b, "pred_b", n_labels)
    _same_length(("y_true", len(y)), ("pred_a", len(a)), ("pred_b", len(b)))
    if len(y) == 0:
        raise ValueError("cannot compare models: no examples")
    return y, a, b
