import dataclasses

import numpy as np
import pytest
from scipy.stats import binomtest
from sklearn.metrics import accuracy_score, f1_score

from textgate.stats import (
    BootstrapResult,
    _resample_counts,
    _scores,
    expected_calibration_error,
    fit_temperature,
    mcnemar_p_value,
    paired_bootstrap,
    softmax,
)

N_LABELS = 12


def sample_labels(probabilities: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One class index per row, drawn from that row's probabilities."""
    cumulative = probabilities.cumsum(axis=1)
    draws = rng.random((len(probabilities), 1))
    return np.minimum((draws > cumulative).sum(axis=1), probabilities.shape[1] - 1)


def corrupt(y: np.ndarray, where: np.ndarray) -> np.ndarray:
    """A copy of `y` with the class shifted by one (so wrong) at the given positions."""
    out = y.copy()
    out[where] = (out[where] + 1) % N_LABELS
    return out


@pytest.fixture
def gold() -> np.ndarray:
    return np.random.default_rng(0).integers(0, N_LABELS, size=300)


# --- softmax ---------------------------------------------------------------------------------


def test_softmax_rows_sum_to_one_in_float64():
    logits = np.random.default_rng(0).normal(size=(7, 4)).astype(np.float32)
    probs = softmax(logits)
    assert probs.dtype == np.float64
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)
    expected = np.exp(logits.astype(np.float64))
    np.testing.assert_allclose(probs, expected / expected.sum(axis=1, keepdims=True))


def test_softmax_is_stable_for_huge_logits_and_applies_temperature():
    probs = softmax(np.array([[1000.0, 1001.0], [-1000.0, -1000.0]]))
    assert np.isfinite(probs).all()
    np.testing.assert_allclose(probs, [[1 / (1 + np.e), np.e / (1 + np.e)], [0.5, 0.5]])
    logits = np.array([[2.0, 0.0, -1.0]])
    np.testing.assert_allclose(softmax(logits, temperature=2.0), softmax(logits / 2.0))
    np.testing.assert_allclose(softmax(np.array([0.0, 0.0])), [0.5, 0.5])  # 1-D: one row


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan")])
def test_softmax_rejects_non_positive_temperature(temperature):
    with pytest.raises(ValueError, match="temperature must be > 0"):
        softmax(np.zeros((1, 2)), temperature)


# --- expected calibration error ----------------------------------------------------------


def test_ece_is_near_zero_for_calibrated_probabilities():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(4), size=50_000)
    y = sample_labels(probs, rng)  # labels drawn from the probabilities: calibrated by design
    assert expected_calibration_error(probs, y, n_bins=15) < 0.015


def test_ece_is_large_for_an_overconfident_model():
    rng = np.random.default_rng(0)
    n = 2000
    probs = np.tile([0.98, 0.01, 0.01], (n, 1))
    y = np.where(rng.random(n) < 0.5, 0, 1)  # 98% confident, about 50% right
    assert expected_calibration_error(probs, y, n_bins=15) == pytest.approx(0.48, abs=0.04)


def test_ece_hand_computed_with_bins_closed_on_the_right():
    # Confidence 0.5 belongs to the bin (0, 0.5], not (0.5, 1]: bin gaps |1-0.5| and |0-1|.
    probs = np.array([[0.5, 0.5], [1.0, 0.0]])
    assert expected_calibration_error(probs, [0, 1], n_bins=2) == pytest.approx(0.75)
    # One bin: accuracy 1/2 vs mean confidence 3/4.
    assert expected_calibration_error(probs, [0, 1], n_bins=1) == pytest.approx(0.25)


@pytest.mark.parametrize(
    ("probs", "y", "message"),
    [
        (np.empty((0, 3)), [], "no examples"),
        (np.array([[0.5, 0.5]]), [], "no examples"),
        (np.array([[0.5, 0.5]]), [0, 1], "length mismatch: probabilities=1, y_true=2"),
        (np.array([[0.5, 0.5]]), [2], r"class index 2, outside \[0, 2\)"),
        (np.array([0.5, 0.5]), [0, 1], "must be 2-D"),
    ],
)
def test_ece_rejects_bad_input(probs, y, message):
    with pytest.raises(ValueError, match=message):
        expected_calibration_error(probs, y, n_bins=15)


# --- temperature scaling -----------------------------------------------------------------


@pytest.mark.parametrize("true_temperature", [2.5, 1.0, 0.5])
def test_fit_temperature_recovers_the_temperature_that_generated_the_labels(true_temperature):
    rng = np.random.default_rng(1)
    logits = rng.normal(scale=3.0, size=(5000, 5))
    y = sample_labels(softmax(logits, true_temperature), rng)
    fitted = fit_temperature(logits, y)
    assert fitted == pytest.approx(true_temperature, rel=0.10)
    assert fit_temperature(logits, y) == fitted  # deterministic


def test_fit_temperature_stays_within_bounds():
    logits = np.array([[5.0, 0.0], [5.0, 0.0], [5.0, 0.0], [5.0, 0.0]])
    # Right half the time with huge confidence: wants T -> large; capped at the upper bound.
    fitted = fit_temperature(logits, [0, 1, 0, 1], bounds=(0.1, 3.0))
    assert fitted == pytest.approx(3.0, rel=1e-3)
    assert fitted <= 3.0


@pytest.mark.parametrize(
    ("logits", "y", "kwargs", "message"),
    [
        (np.empty((0, 2)), [], {}, "no examples"),
        (np.zeros((2, 2)), [0], {}, "length mismatch"),
        (np.zeros((1, 2)), [0], {"bounds": (0.0, 2.0)}, "0 < low < high"),
        (np.zeros((1, 2)), [0], {"bounds": (3.0, 2.0)}, "0 < low < high"),
        (np.zeros((1, 2)), [0.5], {}, "integer class indices"),
    ],
)
def test_fit_temperature_rejects_bad_input(logits, y, kwargs, message):
    with pytest.raises(ValueError, match=message):
        fit_temperature(logits, y, **kwargs)


# --- paired bootstrap --------------------------------------------------------------------


@pytest.mark.parametrize("metric", ["accuracy", "macro_f1"])
def test_identical_predictions_give_zero_delta_and_interval(gold, metric):
    pred = corrupt(gold, np.arange(0, 300, 4))
    result = paired_bootstrap(gold, pred, pred.copy(), N_LABELS, metric=metric)
    assert (result.delta, result.low, result.high) == (0.0, 0.0, 0.0)
    assert result.value_a == result.value_b


@pytest.mark.parametrize("metric", ["accuracy", "macro_f1"])
def test_clearly_better_model_has_interval_above_zero(gold, metric):
    rng = np.random.default_rng(1)
    wrong_a = rng.choice(300, size=30, replace=False)  # A: 90% accurate
    right_a = np.setdiff1d(np.arange(300), wrong_a)
    wrong_b = np.concatenate([wrong_a, rng.choice(right_a, size=30, replace=False)])  # B: 80%
    pred_a, pred_b = corrupt(gold, wrong_a), corrupt(gold, wrong_b)
    result = paired_bootstrap(gold, pred_a, pred_b, N_LABELS, metric=metric)
    assert result.low > 0
    assert result.low <= result.delta <= result.high
    if metric == "accuracy":
        assert (result.value_a, result.value_b) == pytest.approx((0.9, 0.8))
        assert result.delta == pytest.approx(0.1)
    # Reversing the models mirrors the interval below zero.
    reverse = paired_bootstrap(gold, pred_b, pred_a, N_LABELS, metric=metric)
    assert reverse.high < 0


@pytest.mark.parametrize("metric", ["accuracy", "macro_f1"])
def test_models_differing_on_a_handful_of_examples_have_interval_containing_zero(gold, metric):
    base_wrong = np.arange(0, 300, 5)  # both 80% accurate on the same examples
    only_a_wrong, only_b_wrong = np.array([1, 2, 3, 4]), np.array([6, 7, 8])
    pred_a = corrupt(gold, np.concatenate([base_wrong, only_a_wrong]))
    pred_b = corrupt(gold, np.concatenate([base_wrong, only_b_wrong]))
    result = paired_bootstrap(gold, pred_a, pred_b, N_LABELS, metric=metric)
    assert result.low < 0 < result.high


def test_full_sample_macro_f1_matches_sklearn_over_all_labels():
    rng = np.random.default_rng(2)
    # Classes 9-11 never occur, and class 8 is only ever predicted: sklearn scores them 0.
    y = rng.integers(0, 8, size=300)
    pred_a = np.where(rng.random(300) < 0.7, y, rng.integers(0, 9, size=300))
    pred_b = np.where(rng.random(300) < 0.5, y, rng.integers(0, 8, size=300))
    result = paired_bootstrap(y, pred_a, pred_b, N_LABELS, metric="macro_f1", n_resamples=10)
    labels = list(range(N_LABELS))
    for value, pred in ((result.value_a, pred_a), (result.value_b, pred_b)):
        expected = f1_score(y, pred, labels=labels, average="macro", zero_division=0)
        assert value == pytest.approx(expected, abs=1e-12)
    accuracy = paired_bootstrap(y, pred_a, pred_b, N_LABELS, metric="accuracy", n_resamples=10)
    assert accuracy.value_a == pytest.approx(accuracy_score(y, pred_a))


@pytest.mark.parametrize("metric", ["accuracy", "macro_f1"])
def test_resampled_scores_match_sklearn_on_the_resampled_examples(metric):
    rng = np.random.default_rng(3)
    y = rng.integers(0, 5, size=40)
    pred = np.where(rng.random(40) < 0.6, y, rng.integers(0, 6, size=40))
    indices = rng.integers(0, 40, size=(6, 40))
    scores = _scores(_resample_counts(indices, 40), y, pred, 6, metric)
    for row, score in zip(indices, scores, strict=True):
        if metric == "accuracy":
            expected = accuracy_score(y[row], pred[row])
        else:
            expected = f1_score(
                y[row], pred[row], labels=list(range(6)), average="macro", zero_division=0
            )
        assert score == pytest.approx(expected, abs=1e-12)


def test_paired_bootstrap_is_seeded_and_records_its_settings(gold):
    pred_a = corrupt(gold, np.arange(0, 300, 3))
    pred_b = corrupt(gold, np.arange(1, 300, 4))
    run = {"metric": "macro_f1", "n_resamples": 500, "confidence": 0.9}
    first = paired_bootstrap(gold, pred_a, pred_b, N_LABELS, seed=7, **run)
    assert first == paired_bootstrap(gold, pred_a, pred_b, N_LABELS, seed=7, **run)
    assert first != paired_bootstrap(gold, pred_a, pred_b, N_LABELS, seed=8, **run)
    assert (first.metric, first.n, first.n_resamples, first.confidence) == (
        "macro_f1",
        300,
        500,
        0.9,
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        first.delta = 0.0  # type: ignore[misc]
    assert isinstance(first, BootstrapResult)


@pytest.mark.parametrize(
    ("y", "a", "b", "kwargs", "message"),
    [
        ([0, 1], [0, 1], [0], {}, "length mismatch: y_true=2, pred_a=2, pred_b=1"),
        ([], [], [], {}, "no examples"),
        ([0], [0], [0], {"confidence": 1.0}, "confidence must be strictly between 0 and 1"),
        ([0], [0], [0], {"confidence": 0.0}, "confidence must be strictly between 0 and 1"),
        ([0], [0], [0], {"n_resamples": 0}, "n_resamples must be >= 1"),
        ([0], [0], [0], {"metric": "f1"}, "unknown metric 'f1'"),
        ([0], [12], [0], {}, r"pred_a has class index 12, outside \[0, 12\)"),
        ([-1], [0], [0], {}, r"y_true has a negative class index \(-1\)"),
    ],
)
def test_paired_bootstrap_rejects_bad_input(y, a, b, kwargs, message):
    kwargs = {"metric": "accuracy", **kwargs}
    with pytest.raises(ValueError, match=message):
        paired_bootstrap(y, a, b, N_LABELS, **kwargs)


# --- McNemar -----------------------------------------------------------------------------


def test_mcnemar_is_one_without_discordant_pairs():
    assert mcnemar_p_value([0, 1, 2], [0, 1, 0], [0, 1, 1]) == 1.0


def test_mcnemar_exact_binomial_on_discordant_pairs(gold):
    pred_a = corrupt(gold, np.arange(100, 110))  # A wrong on 10 examples B gets right
    pred_b = corrupt(gold, np.arange(0, 2))  # B wrong on 2 examples A gets right
    p = mcnemar_p_value(gold, pred_a, pred_b)
    assert p == pytest.approx(binomtest(2, 12, 0.5).pvalue)
    assert p == mcnemar_p_value(gold, pred_b, pred_a)  # two-sided: symmetric
    assert mcnemar_p_value(gold, gold, corrupt(gold, np.arange(10))) == pytest.approx(2 * 0.5**10)


def test_mcnemar_rejects_length_mismatch():
    with pytest.raises(ValueError, match="length mismatch"):
        mcnemar_p_value([0, 1], [0, 1], [0])
