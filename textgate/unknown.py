""" "I don't know": the unknown score, its threshold, and how abstention is scored as served.

A text is answered "unknown" (abstained) when the model's argmax is the declared
out-of-scope label (`data.out_of_scope_label`), or when its unknown score is above a
threshold chosen on the validation split. Higher scores mean "less like the training data":

- `msp`: 1 - the calibrated top-class probability (softmax of logits / temperature);
- `energy`: the free energy -T * logsumexp(logits / T) (Liu et al. 2020);
- `mahalanobis`: the smallest squared Mahalanobis distance of the encoder's pooled embedding
  to an in-scope class mean, with one covariance shared by all classes (Lee et al. 2018,
  Podolskiy et al. 2021), fitted on the training split and stored with the model
  (`unknown.npz`);
- `mahalanobis+energy`: the sum of both, each standardised by its mean and standard
  deviation on the in-scope validation rows (stored with the threshold): the distance finds
  texts far from every intent, the energy the ones the classifier is unsure of, and together
  they keep more in-scope answers at the same out-of-scope recall (README "Out of scope").

Every runtime (PyTorch, int8 ONNX) calls `unknown_scores` on its own logits and embeddings,
so training, evaluation and serving cannot score differently.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np

UNKNOWN_FILE = "unknown.npz"  # in a model directory: the class means and shared precision
METHODS = ("msp", "energy", "mahalanobis", "mahalanobis+energy")
Method = Literal["msp", "energy", "mahalanobis", "mahalanobis+energy"]
# Scores that sum standardised parts: (part, ...) per method.
COMBINED = {"mahalanobis+energy": ("mahalanobis", "energy")}
NEEDS_EMBEDDING = {"mahalanobis", "mahalanobis+energy"}
# part -> (mean, standard deviation) on the in-scope validation rows.
Standardization = dict[str, tuple[float, float]]
# Shrinkage of the shared covariance towards a scaled identity: a 384-dim covariance from a
# few thousand examples is near singular; 1% of its mean variance keeps the inverse stable.
SHRINKAGE = 0.01


@dataclass(frozen=True)
class Gaussian:
    """Class means and the inverse of their shared covariance, fitted on embeddings."""

    means: np.ndarray  # (classes, hidden)
    precision: np.ndarray  # (hidden, hidden)

    @cached_property
    def terms(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The float64 precision, the means' transpose and every mean's mu'P mu: computed once,
        not per request (served one text at a time, they were most of the score's cost)."""
        precision = self.precision.astype(np.float64)
        means = self.means.astype(np.float64)
        return precision, np.ascontiguousarray(means.T), ((means @ precision) * means).sum(axis=1)

    def save(self, model_dir: str | Path) -> Path:
        path = Path(model_dir) / UNKNOWN_FILE
        np.savez(path, means=self.means, precision=self.precision)
        return path

    @classmethod
    def load(cls, model_dir: str | Path) -> Gaussian | None:
        path = Path(model_dir) / UNKNOWN_FILE
        if not path.is_file():
            return None
        with np.load(path) as data:
            return cls(means=data["means"], precision=data["precision"])


def fit_gaussian(
    embeddings: np.ndarray, y: Sequence[int] | np.ndarray, exclude: int | None = None
) -> Gaussian:
    """Class means and shared covariance of `embeddings`, leaving out class `exclude` (the
    out-of-scope class: its examples have no one centre)."""
    x = np.asarray(embeddings, dtype=np.float64)
    y = np.asarray(y)
    keep = y != exclude if exclude is not None else np.ones(len(y), dtype=bool)
    x, y = x[keep], y[keep]
    classes = np.unique(y)
    if len(classes) == 0:
        raise ValueError("cannot fit class means: no in-scope examples")
    means = np.stack([x[y == c].mean(axis=0) for c in classes])
    centred = x - means[np.searchsorted(classes, y)]
    covariance = centred.T @ centred / max(1, len(x))
    ridge = SHRINKAGE * float(np.trace(covariance)) / covariance.shape[0] + 1e-12
    precision = np.linalg.inv(covariance + ridge * np.eye(covariance.shape[0]))
    return Gaussian(means=means.astype(np.float32), precision=precision.astype(np.float32))


def unknown_scores(
    method: str,
    logits: np.ndarray,
    embeddings: np.ndarray | None = None,
    *,
    temperature: float = 1.0,
    gaussian: Gaussian | None = None,
    standardization: Standardization | None = None,
) -> np.ndarray:
    """(n,) unknown scores, higher = more likely out of scope, from (n, labels) logits and
    (n, hidden) pooled embeddings (only `mahalanobis` reads them and `gaussian`; a combined
    method needs `standardization`, from `fit_standardization`)."""
    if method in COMBINED:
        if standardization is None or any(p not in standardization for p in COMBINED[method]):
            raise ValueError(f"the {method} score needs the standardization of its parts")
        total = np.zeros(len(logits), dtype=np.float64)
        for part in COMBINED[method]:
            mean, std = standardization[part]
            scores = unknown_scores(
                part, logits, embeddings, temperature=temperature, gaussian=gaussian
            )
            total += (scores - mean) / std
        return total
    z = np.asarray(logits, dtype=np.float64) / temperature
    top = z.max(axis=1, keepdims=True)
    log_sum_exp = (top + np.log(np.exp(z - top).sum(axis=1, keepdims=True)))[:, 0]
    if method == "msp":
        return 1.0 - np.exp(top[:, 0] - log_sum_exp)
    if method == "energy":
        return -temperature * log_sum_exp
    if method == "mahalanobis":
        if embeddings is None or gaussian is None:
            raise ValueError("the mahalanobis score needs the embeddings and the fitted Gaussian")
        x = np.asarray(embeddings, dtype=np.float64)
        precision, means_t, means_term = gaussian.terms
        projected = x @ precision  # (n, hidden)
        # |x - mu|^2_P = x'Px - 2 x'P mu + mu'P mu, for every class mean at once: (n, classes)
        squared = (projected * x).sum(axis=1, keepdims=True) - 2 * projected @ means_t + means_term
        return squared.min(axis=1)
    raise ValueError(f"unknown score method {method!r}; choose one of {METHODS}")


def fit_standardization(
    method: str,
    logits: np.ndarray,
    embeddings: np.ndarray | None,
    y_true: Sequence[int] | np.ndarray,
    oos_index: int | None,
    *,
    temperature: float = 1.0,
    gaussian: Gaussian | None = None,
) -> Standardization | None:
    """Each part's mean and standard deviation on the in-scope rows (`y_true` other than
    `oos_index`; all rows when None) of the validation split, for a combined `method`; None
    for a single score."""
    if method not in COMBINED:
        return None
    in_scope = (
        np.asarray(y_true) != oos_index if oos_index is not None else np.ones(len(logits), bool)
    )
    if not in_scope.any():
        raise ValueError(f"cannot standardize the {method} score: no in-scope examples")
    out: Standardization = {}
    for part in COMBINED[method]:
        scores = unknown_scores(
            part, logits, embeddings, temperature=temperature, gaussian=gaussian
        )
        rows = scores[in_scope]
        out[part] = (float(rows.mean()), float(max(rows.std(), 1e-12)))
    return out


@dataclass(frozen=True)
class UnknownPolicy:
    """The unknown score's method and threshold (score > threshold: "unknown"), and what it
    gave on the validation split it was chosen on.

    `target` names what the threshold was chosen for: `oos_recall` (the out-of-scope
    examples answered "unknown") or `precision` (of the examples answered); `reached` says
    whether the validation split reached `target_value`. `threshold` None: never by score.
    """

    method: str
    threshold: float | None
    target: Literal["precision", "oos_recall"]
    target_value: float
    reached: bool
    coverage: float  # share of the validation split answered
    precision: float  # of the answered validation examples
    oos_recall: float | None
    n: int
    # The precision target would have answered "unknown" to more than the allowed share
    # (`max_unknown_share`): the threshold was raised to that share instead.
    capped: bool = False
    # A combined method's parts: their mean and standard deviation (fit_standardization).
    standardization: Standardization | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain values for `training.json["abstention"]`."""
        return asdict(self)


def served_unknown(
    predicted: np.ndarray, scores: np.ndarray, threshold: float | None, oos_index: int | None
) -> np.ndarray:
    """(n,) True where the served answer is "unknown": the argmax is the out-of-scope label,
    or the score is above the threshold."""
    unknown = np.zeros(len(scores), dtype=bool)
    if threshold is not None:
        unknown |= np.asarray(scores) > threshold
    if oos_index is not None:
        unknown |= np.asarray(predicted) == oos_index
    return unknown


def choose_unknown_threshold(
    method: str,
    scores: np.ndarray,
    y_true: Sequence[int] | np.ndarray,
    predicted: np.ndarray,
    *,
    oos_index: int | None,
    target_precision: float,
    target_oos_recall: float | None,
    max_unknown_share: float | None = None,
    standardization: Standardization | None = None,
) -> UnknownPolicy:
    """The highest threshold (fewest "unknown" answers) that meets the target on validation.

    With out-of-scope examples in `y_true` and a `target_oos_recall`, the target is that share
    of them answered "unknown"; otherwise the precision of the answered examples (an answered
    out-of-scope example is wrong), with at most `max_unknown_share` of the examples answered
    "unknown" by score (None: no cap): a model of 91% accuracy would otherwise turn a quarter
    of its traffic into "unknown" to reach 98% precision. When no threshold reaches the
    target, the closest one.
    """
    scores, y_true, predicted = map(np.asarray, (scores, y_true, predicted))
    if len(scores) == 0:
        raise ValueError("cannot choose an unknown threshold: no examples")
    is_oos = y_true == oos_index if oos_index is not None else np.zeros(len(y_true), bool)
    capped = False
    if target_oos_recall is not None and is_oos.any():
        threshold = _threshold_for_recall(scores, is_oos, predicted, oos_index, target_oos_recall)
        target, value = "oos_recall", target_oos_recall
    else:
        # Rows whose argmax is the out-of-scope label are "unknown" whatever the threshold.
        open_rows = predicted != oos_index if oos_index is not None else np.ones(len(scores), bool)
        correct = (predicted == y_true) & ~is_oos
        threshold = (
            _threshold_for_precision(scores[open_rows], correct[open_rows], target_precision)
            if open_rows.any()
            else None
        )
        lowest = _lowest_threshold(scores[open_rows], max_unknown_share)
        capped = threshold is not None and lowest is not None and lowest > threshold
        if capped:
            threshold = lowest
        target, value = "precision", target_precision
    unknown = served_unknown(predicted, scores, threshold, oos_index)
    answered = ~unknown
    precision = float(((predicted == y_true) & answered).sum() / max(1, answered.sum()))
    recall = float(unknown[is_oos].mean()) if is_oos.any() else None
    achieved = recall if target == "oos_recall" else precision
    return UnknownPolicy(
        method=method,
        threshold=threshold,
        target=target,
        target_value=float(value),
        reached=bool(achieved is not None and achieved >= value - 1e-12),
        coverage=float(answered.mean()),
        precision=precision,
        oos_recall=recall,
        n=len(scores),
        capped=capped,
        standardization=standardization,
    )


def _lowest_threshold(scores: np.ndarray, max_unknown_share: float | None) -> float | None:
    """The lowest threshold above which at most `max_unknown_share` of `scores` lie."""
    if max_unknown_share is None or len(scores) == 0:
        return None
    allowed = math.floor(max_unknown_share * len(scores) + 1e-9)  # rows that may score above
    if allowed >= len(scores):
        return None
    return float(np.sort(scores)[len(scores) - 1 - allowed])


def _threshold_for_recall(
    scores: np.ndarray, is_oos: np.ndarray, predicted: np.ndarray, oos_index: int, target: float
) -> float | None:
    """The highest threshold at which `target` of the out-of-scope rows are "unknown"."""
    caught = is_oos & (predicted == oos_index)
    needed = math.ceil(target * int(is_oos.sum()) - 1e-9) - int(caught.sum())
    if needed <= 0:
        return None  # the argmax alone reaches the target
    missed = np.sort(scores[is_oos & ~caught])[::-1]  # descending
    cut = missed[min(needed, len(missed)) - 1]  # every score >= cut must be "unknown"
    below = scores[scores < cut]
    return float(below.max()) if len(below) else float(cut) - 1.0


def _threshold_for_precision(scores: np.ndarray, correct: np.ndarray, target: float) -> float:
    """The highest threshold whose answered rows (score <= it) reach `target` precision; the
    most precise one (the highest among equals) when none does."""
    order = np.argsort(scores, kind="stable")
    sorted_scores = scores[order]
    precision = np.cumsum(correct[order]) / np.arange(1, len(scores) + 1)
    last_of_ties = np.r_[sorted_scores[1:] != sorted_scores[:-1], True]
    candidates = np.flatnonzero(last_of_ties)
    qualifying = candidates[precision[candidates] >= target]
    if len(qualifying):
        return float(sorted_scores[qualifying[-1]])
    best = precision[candidates].max()
    return float(sorted_scores[candidates[precision[candidates] == best][-1]])


def auroc(positive: np.ndarray, scores: np.ndarray) -> float | None:
    """Area under the ROC curve of `scores` for the `positive` rows; None without both kinds."""
    positive = np.asarray(positive, dtype=bool)
    if positive.all() or not positive.any():
        return None
    # Mann-Whitney: the chance a positive row scores above a negative one (ties count half).
    ranks = average_ranks(np.asarray(scores, dtype=np.float64))
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of `values`, ties sharing their average rank (scipy's rankdata, numpy only:
    the lean bento carries no scipy)."""
    _, group, counts = np.unique(values, return_inverse=True, return_counts=True)
    last = np.cumsum(counts)  # the 1-based rank of each group's last member
    return ((last - counts + 1 + last) / 2)[group.reshape(-1)]


def served_scores(
    y_true: np.ndarray,
    predicted: np.ndarray,
    unknown: np.ndarray,
    scores: np.ndarray,
    oos_index: int | None,
) -> dict[str, float | None]:
    """Scores with abstention as served ("unknown" answers count wrong on in-scope rows).

    `in_scope_accuracy` (all rows when no out-of-scope label is declared), `oos_recall` and
    `oos_precision` (of the "unknown" answers), `unknown_auroc` (the score separating
    out-of-scope rows from the rest), `coverage` (share answered).
    """
    y_true, predicted, unknown = map(np.asarray, (y_true, predicted, unknown))
    is_oos = y_true == oos_index if oos_index is not None else np.zeros(len(y_true), bool)
    right = (predicted == y_true) & ~unknown
    in_scope = ~is_oos
    return {
        "in_scope_accuracy": float(right[in_scope].mean()) if in_scope.any() else None,
        "oos_recall": float(unknown[is_oos].mean()) if is_oos.any() else None,
        "oos_precision": float(is_oos[unknown].mean()) if is_oos.any() and unknown.any() else None,
        "unknown_auroc": auroc(is_oos, scores),
        "coverage": float((~unknown).mean()) if len(unknown) else None,
    }


@dataclass(frozen=True)
class UnknownDetector:
    """A model's served "unknown" rule: its score method and threshold, the out-of-scope
    label's index, and the fitted Gaussian (mahalanobis)."""

    method: str
    threshold: float | None
    temperature: float = 1.0
    oos_index: int | None = None
    gaussian: Gaussian | None = None
    standardization: Standardization | None = None

    @property
    def needs_embeddings(self) -> bool:
        return self.method in NEEDS_EMBEDDING

    def scores(self, logits: np.ndarray, embeddings: np.ndarray | None) -> np.ndarray:
        """(n,) unknown scores of (n, labels) logits and (n, hidden) embeddings."""
        return unknown_scores(
            self.method,
            logits,
            embeddings,
            temperature=self.temperature,
            gaussian=self.gaussian,
            standardization=self.standardization,
        )

    def unknown(self, logits: np.ndarray, embeddings: np.ndarray | None) -> np.ndarray:
        """(n,) True where the served answer is "unknown"."""
        scores = self.scores(logits, embeddings)
        return served_unknown(logits.argmax(axis=1), scores, self.threshold, self.oos_index)


def load_detector(
    metadata: dict[str, Any], model_dir: str | Path, labels: Sequence[str], temperature: float
) -> UnknownDetector | None:
    """The detector `training.json` describes; None for a model that always answers.

    `abstention` holds the method and threshold (an entry without a method is an older
    model's: a minimum calibrated confidence); `out_of_scope_label` the declared label.
    """
    abstention = metadata.get("abstention") or {}
    oos_label = metadata.get("out_of_scope_label")
    oos_index = list(labels).index(oos_label) if oos_label in labels else None
    threshold = abstention.get("threshold")
    if threshold is not None and (
        isinstance(threshold, bool) or not isinstance(threshold, int | float)
    ):
        raise ValueError("abstention.threshold must be a number")
    method = abstention.get("method")
    if method is None and threshold is not None:  # an older model: answer from confidence t on
        if not 0 <= threshold <= 1:
            raise ValueError(f"abstention.threshold must be in [0, 1], got {threshold}")
        method, threshold = "msp", 1.0 - float(threshold)
    if method is None and oos_index is None:
        return None
    method = method or "msp"
    if method not in METHODS:
        raise ValueError(f"abstention.method {method!r} is not one of {METHODS}")
    gaussian = Gaussian.load(model_dir) if method in NEEDS_EMBEDDING else None
    if method in NEEDS_EMBEDDING and gaussian is None:
        raise ValueError(f"abstention.method is {method} but the model has no {UNKNOWN_FILE}")
    standardization = _read_standardization(method, abstention.get("standardization"))
    return UnknownDetector(
        method=method,
        threshold=None if threshold is None else float(threshold),
        temperature=temperature,
        oos_index=oos_index,
        gaussian=gaussian,
        standardization=standardization,
    )


def _read_standardization(method: str, value: Any) -> Standardization | None:
    """`abstention.standardization` as written by a combined method's policy, checked."""
    if method not in COMBINED:
        return None
    parts = COMBINED[method]
    if not isinstance(value, dict) or set(value) != set(parts):
        raise ValueError(
            f"abstention.method is {method} but abstention.standardization does not give "
            f"the mean and standard deviation of each of {list(parts)}"
        )
    out: Standardization = {}
    for part in parts:
        pair = value[part]
        if (
            not isinstance(pair, list | tuple)
            or len(pair) != 2
            or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in pair)
            or not math.isfinite(pair[0])
            or not math.isfinite(pair[1])
            or pair[1] <= 0
        ):
            raise ValueError(
                f"abstention.standardization.{part} must be [mean, standard deviation > 0], "
                f"got {pair!r}"
            )
        out[part] = (float(pair[0]), float(pair[1]))
    return out
