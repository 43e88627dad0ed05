"""Drift statistics and the monitor's verdict: does serving traffic still look like training?

Both sides are reduced to a `Profile`: the reference is the production model's training data,
the window is the requests logged since the monitor's last check. Four checks compare them:

- `label_psi`: population stability index of the predicted-label distribution (the served
  model's best guesses) against the training labels; a chi-squared p-value is reported too;
- `embedding_mmd`: maximum mean discrepancy (RBF kernel, median-heuristic bandwidth) between
  sentence embeddings of the two samples, with a permutation-test p-value;
- `length_ks`: the two-sample Kolmogorov-Smirnov distance between text lengths (characters);
- `abstention_rate`: the share of abstained answers against the validation split's.

Every function is deterministic given its seed; nothing here reads or writes files.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.stats import chisquare, ks_2samp

from textgate.config import MonitorConfig

# Proportions are floored at this before taking logs, so a label absent on one side gives a
# large but finite PSI.
PSI_EPSILON = 1e-4
# Pseudo-count per label for the chi-squared expectation, so labels the reference never had
# are surprising, not a division by zero.
CHI2_PSEUDOCOUNT = 0.5


@dataclass(frozen=True)
class Profile:
    """What drift is measured on: label counts, text lengths, abstentions.

    `abstention_rate` is None where it is unknown (a model without an abstention threshold).
    """

    n: int
    label_counts: dict[str, int]
    lengths: np.ndarray  # (n,) characters per text
    abstention_rate: float | None = None


@dataclass(frozen=True)
class DriftCheck:
    """One drift check: its statistic, the threshold it is held to, and why it (did not) fire."""

    name: str
    value: float | None
    threshold: float
    drifted: bool
    detail: str
    p_value: float | None = None


@dataclass(frozen=True)
class DriftReport:
    """Every check of one window; drift when any check fires."""

    checks: list[DriftCheck] = field(default_factory=list)

    @property
    def drifted(self) -> bool:
        return any(check.drifted for check in self.checks)

    @property
    def fired(self) -> list[DriftCheck]:
        return [check for check in self.checks if check.drifted]

    def summary(self) -> str:
        if not self.drifted:
            return f"no drift ({len(self.checks)} checks within their thresholds)"
        return "drift: " + "; ".join(f"{check.name} {check.detail}" for check in self.fired)


def _proportions(counts: Mapping[str, int], labels: Sequence[str]) -> np.ndarray:
    values = np.array([max(int(counts.get(label, 0)), 0) for label in labels], dtype=np.float64)
    total = values.sum()
    if total <= 0:
        raise ValueError("a label distribution needs at least one count")
    return values / total


def label_psi(
    reference_counts: Mapping[str, int],
    observed_counts: Mapping[str, int],
    epsilon: float = PSI_EPSILON,
) -> float:
    """Population stability index: sum over labels of (q - p) * ln(q / p).

    p are the reference proportions, q the observed ones, both floored at `epsilon`. Rules of
    thumb: < 0.1 stable, 0.1-0.2 moderate shift, > 0.2 significant shift.
    """
    labels = sorted(set(reference_counts) | set(observed_counts))
    p = np.clip(_proportions(reference_counts, labels), epsilon, None)
    q = np.clip(_proportions(observed_counts, labels), epsilon, None)
    return float(np.sum((q - p) * np.log(q / p)))


def label_chi2_p_value(
    reference_counts: Mapping[str, int], observed_counts: Mapping[str, int]
) -> float:
    """Goodness of fit of the observed label counts to the reference proportions (chi-squared).

    With thousands of requests even a negligible shift is "significant": the p-value is
    reported for context, the PSI is what is held to a threshold.
    """
    labels = sorted(set(reference_counts) | set(observed_counts))
    observed = np.array([observed_counts.get(label, 0) for label in labels], dtype=np.float64)
    if len(labels) < 2 or observed.sum() <= 0:
        return 1.0
    smoothed = np.array([reference_counts.get(label, 0) for label in labels], dtype=np.float64)
    smoothed = smoothed + CHI2_PSEUDOCOUNT
    expected = smoothed / smoothed.sum() * observed.sum()
    return float(chisquare(observed, expected).pvalue)


@dataclass(frozen=True)
class MMDResult:
    """An MMD permutation test: the unbiased MMD^2, its p-value, the kernel bandwidth used."""

    mmd2: float
    p_value: float
    bandwidth: float
    permutations: int


def _squared_distances(z: np.ndarray) -> np.ndarray:
    norms = np.einsum("ij,ij->i", z, z)
    distances = norms[:, None] + norms[None, :] - 2.0 * (z @ z.T)
    return np.maximum(distances, 0.0)


def _unbiased_mmd2(kernel: np.ndarray, in_x: np.ndarray) -> np.ndarray:
    """Unbiased MMD^2 for each row of `in_x`, a (permutations, n) boolean split of the pool.

    `kernel` is the (n, n) kernel matrix with its diagonal set to zero.
    """
    a = in_x.astype(np.float64)  # (permutations, n)
    b = 1.0 - a
    m = a.sum(axis=1)
    n = b.sum(axis=1)
    ka = kernel @ a.T  # (n, permutations)
    kb = kernel @ b.T
    xx = np.einsum("pi,ip->p", a, ka)
    yy = np.einsum("pi,ip->p", b, kb)
    xy = np.einsum("pi,ip->p", a, kb)
    return xx / (m * (m - 1)) + yy / (n * (n - 1)) - 2.0 * xy / (m * n)


def rbf_mmd_test(
    x: np.ndarray,
    y: np.ndarray,
    *,
    permutations: int = 200,
    seed: int = 0,
    bandwidth: float | None = None,
) -> MMDResult:
    """Two-sample test of "x and y come from the same distribution" with an RBF-kernel MMD.

    The kernel is exp(-|a - b|^2 / (2 * bandwidth^2)); the bandwidth defaults to the median
    pairwise distance of the pooled sample (the median heuristic). The p-value is
    (1 + #permutations with MMD^2 >= observed) / (1 + permutations).

    Args:
        x: (m, d) first sample, m >= 2.
        y: (n, d) second sample, n >= 2.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must be (n, d) with the same d, got {x.shape} and {y.shape}")
    if len(x) < 2 or len(y) < 2:
        raise ValueError("each sample needs at least 2 points")
    if permutations < 1:
        raise ValueError(f"permutations must be >= 1, got {permutations}")
    pooled = np.vstack([x, y])  # (m + n, d)
    distances = _squared_distances(pooled)
    if bandwidth is None:
        upper = distances[np.triu_indices(len(pooled), k=1)]
        positive = upper[upper > 0]
        bandwidth = math.sqrt(float(np.median(positive))) if positive.size else 1.0
    if not bandwidth > 0:
        raise ValueError(f"bandwidth must be > 0, got {bandwidth}")
    kernel = np.exp(-distances / (2.0 * bandwidth**2))
    np.fill_diagonal(kernel, 0.0)
    observed_split = np.zeros((1, len(pooled)), dtype=bool)
    observed_split[0, : len(x)] = True
    observed = float(_unbiased_mmd2(kernel, observed_split)[0])
    rng = np.random.default_rng(seed)
    exceed = 0
    # In chunks, so memory stays (chunk, n) whatever the number of permutations.
    for start in range(0, permutations, 64):
        count = min(64, permutations - start)
        splits = np.zeros((count, len(pooled)), dtype=bool)
        for row in range(count):
            splits[row, rng.permutation(len(pooled))[: len(x)]] = True
        exceed += int(np.sum(_unbiased_mmd2(kernel, splits) >= observed - 1e-12))
    return MMDResult(
        mmd2=observed,
        p_value=(1 + exceed) / (1 + permutations),
        bandwidth=float(bandwidth),
        permutations=permutations,
    )


def length_ks(reference: np.ndarray, observed: np.ndarray) -> tuple[float, float]:
    """Two-sample Kolmogorov-Smirnov test of text lengths: (distance D in [0, 1], p-value)."""
    result = ks_2samp(np.asarray(reference), np.asarray(observed))
    return float(result.statistic), float(result.pvalue)


def assess_drift(
    reference: Profile,
    window: Profile,
    config: MonitorConfig,
    reference_embeddings: np.ndarray | None = None,
    window_embeddings: np.ndarray | None = None,
) -> DriftReport:
    """Every drift check of `window` against `reference`, with the thresholds of `config`.

    Embeddings are optional (without them the embedding check is left out); each is
    (samples, hidden).
    """
    checks = [label_check(reference, window, config)]
    if reference_embeddings is not None and window_embeddings is not None:
        checks.append(embedding_check(reference_embeddings, window_embeddings, config))
    checks.append(length_check(reference, window, config))
    checks.append(abstention_check(reference, window, config))
    return DriftReport(checks=checks)


def label_check(reference: Profile, window: Profile, config: MonitorConfig) -> DriftCheck:
    """PSI of the predicted-label distribution against `config.max_label_psi`."""
    psi = label_psi(reference.label_counts, window.label_counts)
    chi2_p = label_chi2_p_value(reference.label_counts, window.label_counts)
    return DriftCheck(
        name="label_psi",
        value=psi,
        threshold=config.max_label_psi,
        drifted=psi > config.max_label_psi,
        detail=f"PSI {psi:.3f} {'>' if psi > config.max_label_psi else '<='} "
        f"{config.max_label_psi} (chi-squared p = {chi2_p:.3g})",
        p_value=chi2_p,
    )


def embedding_check(
    reference_embeddings: np.ndarray, window_embeddings: np.ndarray, config: MonitorConfig
) -> DriftCheck:
    """The MMD permutation test's p-value against `config.mmd_p_value`.

    Args:
        reference_embeddings: (samples, hidden).
        window_embeddings: (samples, hidden).
    """
    mmd = rbf_mmd_test(
        reference_embeddings,
        window_embeddings,
        permutations=config.mmd_permutations,
        seed=config.seed,
    )
    fired = mmd.p_value < config.mmd_p_value
    return DriftCheck(
        name="embedding_mmd",
        value=mmd.p_value,  # what the threshold applies to; MMD^2 is in the detail
        threshold=config.mmd_p_value,
        drifted=fired,
        detail=f"MMD^2 {mmd.mmd2:.4f}, permutation p = {mmd.p_value:.4f} "
        f"{'<' if fired else '>='} {config.mmd_p_value} "
        f"({len(reference_embeddings)} vs {len(window_embeddings)} texts)",
        p_value=mmd.p_value,
    )


def length_check(reference: Profile, window: Profile, config: MonitorConfig) -> DriftCheck:
    """The KS distance between text lengths against `config.max_length_ks`."""
    distance, ks_p = length_ks(reference.lengths, window.lengths)
    fired = distance > config.max_length_ks
    return DriftCheck(
        name="length_ks",
        value=distance,
        threshold=config.max_length_ks,
        drifted=fired,
        detail=f"KS distance {distance:.3f} {'>' if fired else '<='} {config.max_length_ks} "
        f"(median {np.median(window.lengths):.0f} vs {np.median(reference.lengths):.0f} "
        f"characters, p = {ks_p:.3g})",
        p_value=ks_p,
    )


def abstention_check(reference: Profile, window: Profile, config: MonitorConfig) -> DriftCheck:
    """The window's abstention rate against the validation rate plus the allowed increase.

    Not checked (never drifted) when the reference has no abstention rate.
    """
    observed = window.abstention_rate or 0.0
    expected = reference.abstention_rate
    if expected is None:
        return DriftCheck(
            name="abstention_rate",
            value=observed,
            threshold=config.max_abstention_increase,
            drifted=False,
            detail=f"{observed:.1%} abstained; not checked: the model has no validation "
            "abstention rate",
        )
    limit = expected + config.max_abstention_increase
    fired = observed > limit
    return DriftCheck(
        name="abstention_rate",
        value=observed,
        threshold=limit,
        drifted=fired,
        detail=f"{observed:.1%} abstained {'>' if fired else '<='} {limit:.1%} "
        f"(validation {expected:.1%} + {config.max_abstention_increase:.0%})",
    )
