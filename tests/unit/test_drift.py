"""Drift statistics on seeded synthetic data: each must fire on a shift and stay quiet without."""

from __future__ import annotations

import numpy as np
import pytest

from tests.helpers import make_params
from textgate.drift import (
    Profile,
    assess_drift,
    label_chi2_p_value,
    label_psi,
    length_ks,
    rbf_mmd_test,
)

MONITOR = make_params({}).monitor
UNIFORM = {"refund": 300, "lost_card": 300, "login": 300}


def test_psi_is_zero_for_identical_distributions_and_symmetric_in_sign():
    assert label_psi(UNIFORM, {"refund": 100, "lost_card": 100, "login": 100}) == pytest.approx(0)
    assert label_psi(UNIFORM, {"refund": 90, "lost_card": 100, "login": 110}) < 0.01


@pytest.mark.parametrize(
    ("observed", "fires"),
    [
        ({"refund": 105, "lost_card": 98, "login": 97}, False),  # sampling noise
        ({"refund": 120, "lost_card": 100, "login": 80}, False),  # moderate
        ({"refund": 240, "lost_card": 40, "login": 20}, True),  # one intent dominates
        ({"refund": 100, "lost_card": 100, "login": 50, "shipping": 50}, True),  # a new label
    ],
)
def test_psi_fires_only_on_a_real_shift(observed, fires):
    assert (label_psi(UNIFORM, observed) > MONITOR.max_label_psi) is fires


def test_psi_with_a_label_missing_on_one_side_is_finite():
    value = label_psi({"a": 10, "b": 10}, {"a": 20})
    assert np.isfinite(value) and value > 1


def test_chi2_p_value_small_on_shift_and_not_on_noise():
    rng = np.random.default_rng(0)
    draws = rng.choice(["refund", "lost_card", "login"], size=300)
    same = {label: int((draws == label).sum()) for label in UNIFORM}
    assert label_chi2_p_value(UNIFORM, same) > 0.05
    assert label_chi2_p_value(UNIFORM, {"refund": 240, "lost_card": 40, "login": 20}) < 1e-6
    assert label_chi2_p_value(UNIFORM, {}) == 1.0


def test_mmd_does_not_fire_on_the_same_distribution():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(150, 8))
    y = rng.normal(size=(150, 8))
    result = rbf_mmd_test(x, y, permutations=200, seed=0)
    assert result.p_value > 0.05
    assert abs(result.mmd2) < 0.01
    assert result.bandwidth > 0


@pytest.mark.parametrize("shift", [0.5, 1.0])
def test_mmd_fires_on_a_mean_shift(shift):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(150, 8))
    y = rng.normal(loc=shift, size=(150, 8))
    result = rbf_mmd_test(x, y, permutations=200, seed=0)
    assert result.p_value < MONITOR.mmd_p_value
    assert result.p_value == pytest.approx(1 / 201)  # no permutation reached the observed MMD


def test_mmd_fires_on_a_change_of_spread_with_the_same_mean():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(200, 4))
    y = rng.normal(scale=2.0, size=(200, 4))
    assert rbf_mmd_test(x, y, permutations=100, seed=0).p_value < 0.01


def test_mmd_is_deterministic_given_the_seed_and_checks_its_input():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(40, 3)), rng.normal(size=(30, 3))
    assert rbf_mmd_test(x, y, seed=7) == rbf_mmd_test(x, y, seed=7)
    with pytest.raises(ValueError, match="same d"):
        rbf_mmd_test(x, rng.normal(size=(30, 4)))
    with pytest.raises(ValueError, match="at least 2"):
        rbf_mmd_test(x[:1], y)


def test_ks_on_lengths():
    rng = np.random.default_rng(5)
    short = rng.poisson(40, size=500)
    distance, p_value = length_ks(short, rng.poisson(40, size=300))
    assert distance < MONITOR.max_length_ks and p_value > 0.01
    distance, p_value = length_ks(short, rng.poisson(120, size=300))
    assert distance > 0.9 and p_value < 1e-10


def _profile(labels: dict[str, int], lengths: np.ndarray, abstention: float | None) -> Profile:
    return Profile(
        n=sum(labels.values()), label_counts=labels, lengths=lengths, abstention_rate=abstention
    )


def test_assess_drift_quiet_on_the_same_traffic():
    rng = np.random.default_rng(6)
    reference = _profile(UNIFORM, rng.poisson(40, 900), 0.05)
    window = _profile({"refund": 98, "lost_card": 104, "login": 98}, rng.poisson(40, 300), 0.06)
    report = assess_drift(
        reference, window, MONITOR, rng.normal(size=(100, 8)), rng.normal(size=(100, 8))
    )
    assert not report.drifted, report.summary()
    assert [check.name for check in report.checks] == [
        "label_psi",
        "embedding_mmd",
        "length_ks",
        "abstention_rate",
    ]
    assert report.summary().startswith("no drift")


def test_assess_drift_names_each_check_that_fires():
    rng = np.random.default_rng(7)
    reference = _profile(UNIFORM, rng.poisson(40, 900), 0.05)
    window = _profile({"refund": 280, "login": 20}, rng.poisson(150, 300), 0.40)
    report = assess_drift(
        reference,
        window,
        MONITOR,
        rng.normal(size=(100, 8)),
        rng.normal(loc=1.0, size=(100, 8)),
    )
    assert {check.name for check in report.fired} == {
        "label_psi",
        "embedding_mmd",
        "length_ks",
        "abstention_rate",
    }
    abstention = report.checks[-1]
    assert abstention.threshold == pytest.approx(0.15)
    assert "40.0% abstained > 15.0%" in abstention.detail
    assert report.summary().startswith("drift: label_psi PSI")


def test_abstention_is_not_judged_without_a_validation_rate():
    rng = np.random.default_rng(8)
    reference = _profile(UNIFORM, rng.poisson(40, 900), None)
    window = _profile({"refund": 100, "lost_card": 100, "login": 100}, rng.poisson(40, 300), 0.9)
    report = assess_drift(reference, window, MONITOR)
    assert [check.name for check in report.checks] == ["label_psi", "length_ks", "abstention_rate"]
    assert not report.drifted
    assert "not checked" in report.checks[-1].detail
