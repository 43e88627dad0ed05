"""The unknown score, its threshold, and scoring abstention as served."""

from __future__ import annotations

import numpy as np
import pytest

from textgate.unknown import (
    Gaussian,
    UnknownDetector,
    auroc,
    choose_unknown_threshold,
    fit_gaussian,
    fit_standardization,
    load_detector,
    served_scores,
    served_unknown,
    unknown_scores,
)

HIDDEN = 16


def clusters(seed: int = 0, per_class: int = 60, classes: int = 3, far: int = 40):
    """Embeddings of `classes` tight in-scope clusters and one far-away out-of-scope cluster.

    Returns (train embeddings, train labels, test embeddings, test is-out-of-scope).
    """
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, size=(classes, HIDDEN))
    y = np.repeat(np.arange(classes), per_class)
    train = centres[y] + rng.normal(0, 1, size=(len(y), HIDDEN))
    test_in = centres[y[: classes * 20]] + rng.normal(0, 1, size=(classes * 20, HIDDEN))
    test_out = rng.normal(0, 1, size=(far, HIDDEN)) + 12.0  # far from every class
    test = np.vstack([test_in, test_out])
    is_oos = np.r_[np.zeros(len(test_in), bool), np.ones(far, bool)]
    return train, y, test, is_oos


def test_mahalanobis_separates_a_far_away_cluster_and_a_random_score_does_not():
    train, y, test, is_oos = clusters()
    gaussian = fit_gaussian(train, y)
    logits = np.zeros((len(test), 3))
    scores = unknown_scores("mahalanobis", logits, test, gaussian=gaussian)
    assert auroc(is_oos, scores) > 0.99
    random_scores = np.random.default_rng(1).random(len(test))
    assert auroc(is_oos, random_scores) < 0.75  # the bar above is no formality


def test_the_out_of_scope_class_is_left_out_of_the_class_means():
    train, y, _, _ = clusters()
    scattered = np.random.default_rng(2).normal(0, 20, size=(30, HIDDEN))
    gaussian = fit_gaussian(np.vstack([train, scattered]), np.r_[y, np.full(30, 3)], exclude=3)
    assert gaussian.means.shape == (3, HIDDEN)


def test_msp_and_energy_rank_flat_logits_as_more_unknown():
    logits = np.array([[8.0, 0.0, 0.0], [0.1, 0.0, 0.05]])
    for method in ("msp", "energy"):
        confident, flat = unknown_scores(method, logits)
        assert flat > confident, method
    msp = unknown_scores("msp", logits, temperature=2.0)
    z = logits[0] / 2.0
    assert msp[0] == pytest.approx(1 - np.exp(z.max()) / np.exp(z).sum())


def test_mahalanobis_without_embeddings_is_refused():
    with pytest.raises(ValueError, match="needs the embeddings"):
        unknown_scores("mahalanobis", np.zeros((2, 3)))
    with pytest.raises(ValueError, match="unknown score method"):
        unknown_scores("cosine", np.zeros((2, 3)))


def two_kinds_of_unknown(seed: int = 3):
    """In-scope rows (near a class, confident logits) and two kinds of out-of-scope rows: far
    from every class but confidently classified, and near a class but with flat logits.

    Returns (gaussian, logits, embeddings, is_oos)."""
    rng = np.random.default_rng(seed)
    train, y, test, is_oos = clusters(seed)
    gaussian = fit_gaussian(train, y)
    n_in, n_far = int((~is_oos).sum()), int(is_oos.sum())
    near = test[:n_far] + rng.normal(0, 0.2, size=(n_far, HIDDEN))  # close to in-scope rows
    embeddings = np.vstack([test, near])
    logits = np.zeros((len(embeddings), 3))
    confident = rng.normal(8, 1, size=n_in + n_far)
    logits[np.arange(n_in + n_far), rng.integers(0, 3, n_in + n_far)] = confident
    logits[n_in + n_far :] = rng.normal(0, 0.1, size=(n_far, 3))  # the near ones: flat
    return gaussian, logits, embeddings, np.r_[is_oos, np.ones(n_far, bool)]


def test_the_combined_score_finds_both_kinds_of_unknown_each_part_misses_one():
    gaussian, logits, embeddings, is_oos = two_kinds_of_unknown()
    in_scope = ~is_oos
    y = np.where(is_oos, 3, 0)  # label 3: out of scope
    std = fit_standardization("mahalanobis+energy", logits, embeddings, y, 3, gaussian=gaussian)
    assert set(std) == {"mahalanobis", "energy"}
    combined = unknown_scores(
        "mahalanobis+energy", logits, embeddings, gaussian=gaussian, standardization=std
    )
    parts = {
        m: unknown_scores(m, logits, embeddings, gaussian=gaussian)
        for m in ("mahalanobis", "energy")
    }
    for part, scores in parts.items():
        assert auroc(is_oos, scores) < 0.8, part  # each part misses one kind
    assert auroc(is_oos, combined) > 0.95
    # standardised on the in-scope rows: each part weighs the same there
    mean, sd = std["energy"]
    z = (parts["energy"][in_scope] - mean) / sd
    assert z.mean() == pytest.approx(0, abs=1e-9) and z.std() == pytest.approx(1)
    assert fit_standardization("mahalanobis", logits, embeddings, y, 3) is None
    with pytest.raises(ValueError, match="no in-scope examples"):
        fit_standardization("mahalanobis+energy", logits, embeddings, np.full(len(y), 3), 3)
    with pytest.raises(ValueError, match="standardization of its parts"):
        unknown_scores("mahalanobis+energy", logits, embeddings, gaussian=gaussian)


def test_a_combined_detector_round_trips_through_training_json(tmp_path):
    import json

    gaussian, logits, embeddings, is_oos = two_kinds_of_unknown()
    gaussian.save(tmp_path)
    y = np.where(is_oos, 3, 0)
    std = fit_standardization(
        "mahalanobis+energy", logits, embeddings, y, 3, temperature=1.5, gaussian=gaussian
    )
    scores = unknown_scores(
        "mahalanobis+energy",
        logits,
        embeddings,
        temperature=1.5,
        gaussian=gaussian,
        standardization=std,
    )
    policy = choose_unknown_threshold(
        "mahalanobis+energy",
        scores,
        y,
        logits.argmax(axis=1),
        oos_index=3,
        target_precision=0.98,
        target_oos_recall=0.9,
        standardization=std,
    )
    metadata = json.loads(json.dumps({"abstention": policy.to_dict()}))
    detector = load_detector(metadata, tmp_path, ["a", "b", "c"], temperature=1.5)
    np.testing.assert_allclose(detector.scores(logits, embeddings), scores)
    assert detector.unknown(logits, embeddings)[is_oos].mean() >= 0.9
    broken = {"abstention": {**metadata["abstention"], "standardization": {"energy": [0, 1]}}}
    with pytest.raises(ValueError, match="mean and standard deviation of each"):
        load_detector(broken, tmp_path, ["a", "b", "c"], temperature=1.5)
    zero = {"mahalanobis": [1.0, 0.0], "energy": [0.0, 1.0]}
    broken["abstention"]["standardization"] = zero
    with pytest.raises(ValueError, match="standard deviation > 0"):
        load_detector(broken, tmp_path, ["a", "b", "c"], temperature=1.5)


@pytest.mark.parametrize("target", [0.5, 0.8, 0.95])
def test_the_threshold_meets_its_out_of_scope_recall_target(target):
    rng = np.random.default_rng(3)
    oos = 3
    y = np.r_[rng.integers(0, 3, 300), np.full(100, oos)]
    predicted = np.where(y == oos, rng.integers(0, 4, len(y)), y)  # some oos caught by argmax
    scores = np.r_[rng.normal(0, 1, 300), rng.normal(2, 1, 100)]
    policy = choose_unknown_threshold(
        "msp", scores, y, predicted, oos_index=oos, target_precision=0.9, target_oos_recall=target
    )
    assert policy.target == "oos_recall" and policy.reached
    unknown = served_unknown(predicted, scores, policy.threshold, oos)
    recall = unknown[y == oos].mean()
    assert recall >= target and policy.oos_recall == pytest.approx(recall)
    # The highest such threshold: one step higher misses the target.
    higher = np.sort(scores[scores > policy.threshold])[0]
    assert served_unknown(predicted, scores, higher, oos)[y == oos].mean() < target


def test_the_threshold_meets_its_precision_target_without_out_of_scope_rows():
    rng = np.random.default_rng(4)
    y = rng.integers(0, 3, 500)
    wrong = rng.random(500) < 0.1
    predicted = np.where(wrong, (y + 1) % 3, y)
    scores = rng.normal(0, 1, 500) + 1.5 * wrong  # errors score higher
    policy = choose_unknown_threshold(
        "energy", scores, y, predicted, oos_index=None, target_precision=0.97, target_oos_recall=0.8
    )
    answered = scores <= policy.threshold
    assert policy.target == "precision" and policy.reached
    assert (predicted == y)[answered].mean() >= 0.97
    assert policy.coverage == pytest.approx(answered.mean())


def test_the_precision_target_never_answers_unknown_beyond_the_cap():
    rng = np.random.default_rng(5)
    y = rng.integers(0, 3, 500)
    wrong = rng.random(500) < 0.2  # a model of 80%: 98% precision needs many "unknown"
    predicted = np.where(wrong, (y + 1) % 3, y)
    scores = rng.normal(0, 1, 500) + 0.5 * wrong
    args = ("msp", scores, y, predicted)
    kwargs = {"oos_index": None, "target_precision": 0.98, "target_oos_recall": None}
    free = choose_unknown_threshold(*args, **kwargs)
    assert free.coverage < 0.9 and not free.capped
    capped = choose_unknown_threshold(*args, **kwargs, max_unknown_share=0.1)
    assert capped.capped and not capped.reached
    assert capped.coverage >= 0.9 and (scores > capped.threshold).mean() <= 0.1
    # The lowest threshold within the cap: one step lower answers "unknown" to more.
    lower = np.sort(scores[scores < capped.threshold])[-1]
    assert (scores > lower).mean() > 0.1
    # A model that reaches the target within the cap is not capped.
    good = choose_unknown_threshold("msp", scores, y, y, **kwargs, max_unknown_share=0.1)
    assert not good.capped and good.reached


def test_served_scores_count_unknown_as_right_only_on_out_of_scope_rows():
    y = np.array([0, 1, 2, 2])  # 2 is out of scope
    predicted = np.array([0, 0, 1, 2])
    unknown = np.array([False, False, True, True])
    scores = np.array([0.1, 0.2, 0.9, 0.8])
    figures = served_scores(y, predicted, unknown, scores, oos_index=2)
    assert figures == {
        "in_scope_accuracy": 0.5,
        "oos_recall": 1.0,
        "oos_precision": 1.0,
        "unknown_auroc": 1.0,
        "coverage": 0.5,
    }
    plain = served_scores(y, predicted, unknown, scores, oos_index=None)
    assert plain["oos_recall"] is None and plain["in_scope_accuracy"] == 0.25


def test_a_detector_round_trips_through_the_model_directory(tmp_path):
    train, y, test, _ = clusters()
    gaussian = fit_gaussian(train, y)
    gaussian.save(tmp_path)
    metadata = {
        "abstention": {"method": "mahalanobis", "threshold": 50.0},
        "out_of_scope_label": "oos",
    }
    detector = load_detector(metadata, tmp_path, ["a", "b", "oos"], temperature=1.5)
    assert detector is not None and detector.oos_index == 2 and detector.needs_embeddings
    np.testing.assert_array_equal(Gaussian.load(tmp_path).means, gaussian.means)
    logits = np.zeros((len(test), 3))
    logits[0, 2] = 5.0  # the argmax is the out-of-scope label: unknown whatever the score
    unknown = detector.unknown(logits, test)
    assert unknown[0] and unknown[-1] and not unknown[1]


def test_an_older_models_confidence_threshold_still_applies(tmp_path):
    detector = load_detector({"abstention": {"threshold": 0.6}}, tmp_path, ["a", "b"], 1.0)
    assert detector == UnknownDetector(method="msp", threshold=pytest.approx(0.4))
    logits = np.log(np.array([[0.7, 0.3], [0.55, 0.45]]))
    assert detector.unknown(logits, None).tolist() == [False, True]
    assert load_detector({}, tmp_path, ["a", "b"], 1.0) is None
    with pytest.raises(ValueError, match="unknown.npz"):
        load_detector({"abstention": {"method": "mahalanobis", "threshold": 1.0}}, tmp_path, [], 1)


def test_auroc_matches_the_pairwise_definition_with_ties():
    rng = np.random.default_rng(5)
    positive = rng.random(60) < 0.3
    scores = np.round(rng.normal(size=60) + positive, 1)  # rounded: many ties
    pairs = [
        1.0 if p > n else 0.5 if p == n else 0.0
        for p in scores[positive]
        for n in scores[~positive]
    ]
    assert auroc(positive, scores) == pytest.approx(np.mean(pairs))
    assert auroc(np.ones(3, bool), np.zeros(3)) is None
