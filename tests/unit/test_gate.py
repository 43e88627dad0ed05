"""The gate's checks, each made to pass and to fail for the right reason."""

import json
import random

import pytest

from tests.helpers import merge, raw_params
from textgate.config import GateConfig
from textgate.gate import (
    Verdict,
    approval_check,
    behaviour_checks,
    calibration_check,
    champion_checks,
    class_recall_champion_checks,
    class_recall_checks,
    evaluate_gate,
    floor_checks,
    out_of_scope_checks,
    quantization_check,
    served_checks,
    unseen_mask,
    worst_confusions,
)
from textgate.text import text_fingerprint

LABELS = [f"intent_{i}" for i in range(6)]


def gate_config(**overrides) -> GateConfig:
    return GateConfig.model_validate(merge(raw_params()["gate"], overrides))


CONFIG = gate_config(min_accuracy=0.8, min_macro_f1=0.75)


def predictions(n: int = 300, wrong: set[int] = frozenset(), seed: int = 0):
    """Gold labels and predictions that are right except at the `wrong` positions."""
    rng = random.Random(seed)
    truth = [LABELS[i % len(LABELS)] for i in range(n)]
    predicted = [
        rng.choice([label for label in LABELS if label != gold]) if i in wrong else gold
        for i, gold in enumerate(truth)
    ]
    return truth, predicted


# --- floors -----------------------------------------------------------------------------


def test_floors_pass_when_every_metric_meets_its_floor():
    checks = floor_checks({"accuracy": 0.8, "macro_f1": 0.9}, CONFIG)
    assert [(c.name, c.value, c.threshold, c.passed) for c in checks] == [
        ("accuracy_floor", 0.8, 0.8, True),
        ("macro_f1_floor", 0.9, 0.75, True),
    ]


@pytest.mark.parametrize(
    ("metrics", "failing"),
    [
        ({"accuracy": 0.79, "macro_f1": 0.9}, ["accuracy_floor"]),
        ({"accuracy": 0.9, "macro_f1": 0.7}, ["macro_f1_floor"]),
        ({"accuracy": 0.9}, ["macro_f1_floor"]),
        ({"accuracy": float("nan"), "macro_f1": 0.9}, ["accuracy_floor"]),
        ({"accuracy": "0.9", "macro_f1": 0.9}, ["accuracy_floor"]),
    ],
)
def test_floors_fail_and_name_the_metric(metrics, failing):
    checks = floor_checks(metrics, CONFIG)
    assert [c.name for c in checks if not c.passed] == failing


def test_failed_floor_reason_gives_value_and_threshold():
    checks = floor_checks({"accuracy": 0.5, "macro_f1": 0.9}, CONFIG)
    assert checks[0].reason == "accuracy 0.5000 < floor 0.8000"


# --- out-of-scope answers ----------------------------------------------------------------

SERVED = {
    "out_of_scope_label": "oos",
    "in_scope_accuracy": 0.95,
    "oos_recall": 0.75,
    "oos_precision": 0.8,
    "unknown_auroc": 0.96,
}


def test_out_of_scope_floors_pass_a_good_model_and_apply_only_with_the_label():
    checks = out_of_scope_checks({"abstention": SERVED}, CONFIG)
    assert [c.name for c in checks] == [
        "out_of_scope[in_scope_accuracy]",
        "out_of_scope[oos_recall]",
        "out_of_scope[oos_precision]",
        "out_of_scope[unknown_auroc]",
    ]
    assert all(c.passed and c.kind == "out_of_scope" for c in checks)
    assert out_of_scope_checks({"abstention": SERVED | {"out_of_scope_label": None}}, CONFIG) == []
    assert out_of_scope_checks({}, CONFIG) == []


@pytest.mark.parametrize(
    ("metric", "field"),
    [
        ("in_scope_accuracy", "min_in_scope_accuracy"),
        ("oos_recall", "min_oos_recall"),
        ("oos_precision", "min_oos_precision"),
        ("unknown_auroc", "min_unknown_auroc"),
    ],
)
def test_each_out_of_scope_floor_fails_under_it_or_when_missing(metric, field):
    floor = getattr(CONFIG.out_of_scope, field)
    for value in (floor - 0.01, None):
        checks = out_of_scope_checks({"abstention": SERVED | {metric: value}}, CONFIG)
        assert [c.name for c in checks if not c.passed] == [f"out_of_scope[{metric}]"]
    verdict = evaluate_gate(
        passing_metrics() | {"abstention": SERVED | {metric: floor - 0.01}},
        per_class({"a": 0.9}),
        CONFIG,
        champion=[],
    )
    assert [c.name for c in verdict.failed] == [f"out_of_scope[{metric}]"]


def test_int8_model_more_than_half_a_point_under_fp32_fails():
    ok = quantization_check(
        {"accuracy": 0.980, "accuracy_fp32": 0.983, "runtime": "onnx-int8"}, CONFIG
    )
    assert ok.passed and ok.applied
    assert ok.reason == "onnx-int8 accuracy 0.9800 vs fp32 0.9830: drop 0.0030 <= 0.0050"
    bad = quantization_check(
        {"accuracy": 0.970, "accuracy_fp32": 0.983, "runtime": "onnx-int8"}, CONFIG
    )
    assert not bad.passed
    assert "drop 0.0130 > 0.0050" in bad.reason
    fp32 = quantization_check({"accuracy": 0.98, "runtime": "torch-cpu"}, CONFIG)
    assert fp32.passed and not fp32.applied
    assert not quantization_check({"accuracy": 0.98, "accuracy_fp32": None}, CONFIG).passed


# --- champion vs challenger ---------------------------------------------------------------


def test_no_champion_outcome_is_the_param():
    truth, predicted = predictions()
    (passing,) = champion_checks(truth, predicted, None, gate_config(no_champion="pass"))
    assert passing.passed and not passing.applied
    assert "first release" in passing.reason
    (failing,) = champion_checks(truth, predicted, None, gate_config(no_champion="fail"))
    assert not failing.passed
    assert "gate.no_champion is 'fail'" in failing.reason


def test_identical_models_pass_with_zero_delta():
    truth, predicted = predictions(wrong=set(range(0, 300, 10)))
    checks = champion_checks(truth, predicted, predicted, CONFIG, champion_tag="textgate:old")
    assert [c.name for c in checks] == ["champion_accuracy", "champion_macro_f1"]
    for check in checks:
        assert check.passed
        assert check.delta == 0.0 and check.ci == (0.0, 0.0)
        assert check.threshold == -0.03
    assert "textgate:old" in checks[0].reason and "McNemar" in checks[0].reason


def test_candidate_worse_than_the_champion_beyond_the_margin_fails():
    truth, champion = predictions(wrong=set(range(0, 300, 30)))  # 10 errors
    _, candidate = predictions(wrong=set(range(0, 300, 10)) | set(range(1, 300, 15)))  # 50
    checks = champion_checks(truth, candidate, champion, CONFIG)
    assert not any(check.passed for check in checks)
    accuracy = checks[0]
    assert accuracy.delta == pytest.approx(-40 / 300)
    assert accuracy.ci[1] < -0.03  # the whole interval is beyond the margin
    assert "a regression beyond the margin is not ruled out" in accuracy.reason


def test_candidate_equal_to_the_champion_within_noise_passes():
    # Each model gets 4 examples wrong that the other gets right: noise, not a regression.
    shared = set(range(0, 300, 25))
    truth, champion = predictions(wrong=shared | {1, 2, 3, 4})
    _, candidate = predictions(wrong=shared | {5, 6, 7, 8})
    checks = champion_checks(truth, candidate, champion, CONFIG)
    for check in checks:
        assert check.passed, check.reason
        assert check.delta == pytest.approx(0.0, abs=0.02)
        assert check.ci[0] < 0 < check.ci[1]


def test_a_small_regression_inside_the_margin_passes_and_a_tighter_margin_fails_it():
    truth, champion = predictions(wrong={1, 2})
    _, candidate = predictions(wrong={1, 2, 3, 4, 5})
    assert all(check.passed for check in champion_checks(truth, candidate, champion, CONFIG))
    strict = gate_config(margins={"accuracy": 0.0, "macro_f1": 0.0})
    assert not any(c.passed for c in champion_checks(truth, candidate, champion, strict))


def test_champion_that_cannot_be_scored_fails_the_check():
    truth, predicted = predictions()
    (check,) = champion_checks(
        truth, predicted, None, CONFIG, champion_error="model x is not in the store"
    )
    assert not check.passed
    assert "model x is not in the store" in check.reason


def test_champion_with_a_different_label_set_is_compared_on_gold_labels():
    truth, candidate = predictions(wrong={1})
    champion = ["retired_intent" if i % 50 == 0 else label for i, label in enumerate(truth)]
    checks = champion_checks(truth, candidate, champion, CONFIG)
    assert checks[0].baseline == pytest.approx(294 / 300)


def test_examples_production_trained_on_are_left_out_of_the_comparison():
    texts = ["where is my parcel", "refund please", "lost my card"]
    seen = {text_fingerprint("refund please")}
    assert unseen_mask(texts, seen) == [True, False, True]
    assert unseen_mask(texts, None) == [True, True, True]  # not recorded: keep everything
    truth, predicted = predictions(wrong={1})
    checks = champion_checks(truth, predicted, predicted, CONFIG, excluded=7)
    assert "on 300 test examples, 7 left out because production was trained on them" in (
        checks[0].reason
    )


# --- per-intent floors --------------------------------------------------------------------


def per_class(recalls: dict[str, float], support: int = 20):
    return {
        label: {"precision": 1.0, "recall": recall, "f1": recall, "support": support}
        for label, recall in recalls.items()
    }


def test_class_under_its_recall_floor_fails():
    checks = class_recall_checks(per_class({"refund": 0.95, "login": 0.4}), CONFIG)
    failed = [c for c in checks if not c.passed]
    assert [c.name for c in failed] == ["recall[login]"]
    assert failed[0].reason == "recall 0.4000 < floor 0.5000 (support 20)"


def test_the_out_of_scope_label_has_its_own_floor_not_an_intents():
    recalls = per_class({"refund": 0.95, "oos": 0.3, "login": 0.2})
    checks = {c.name: c for c in class_recall_checks(recalls, CONFIG, out_of_scope_label="oos")}
    assert checks["recall[oos]"].passed and not checks["recall[oos]"].applied
    assert "gate.out_of_scope.min_oos_recall" in checks["recall[oos]"].reason
    assert not checks["recall[login]"].passed  # the intents keep theirs
    # Named in class_recall_floors, the out-of-scope label gets that floor.
    config = gate_config(class_recall_floors={"oos": 0.5})
    named = {c.name: c for c in class_recall_checks(recalls, config, out_of_scope_label="oos")}
    assert not named["recall[oos]"].passed and named["recall[oos]"].applied


def test_per_label_floor_overrides_the_default():
    config = gate_config(class_recall_floors={"refund": 0.99})
    checks = class_recall_checks(per_class({"refund": 0.95, "login": 0.9}), config)
    assert [c.name for c in checks if not c.passed] == ["recall[refund]"]


def test_class_with_too_little_support_is_not_gated():
    checks = class_recall_checks(per_class({"refund": 0.0}, support=3), CONFIG)
    assert checks[0].passed and not checks[0].applied
    assert "support 3 < gate.min_class_support 10" in checks[0].reason


def test_floor_for_an_unknown_label_fails():
    config = gate_config(class_recall_floors={"refnud": 0.9})
    checks = class_recall_checks(per_class({"refund": 0.95}), config)
    assert [c.name for c in checks if not c.passed] == ["recall[refnud]"]
    assert "not a label of this model" in checks[0].reason


def test_an_intent_that_loses_recall_against_production_beyond_the_margin_fails():
    truth = ["a"] * 30 + ["b"] * 30 + ["c"] * 5
    champion = list(truth)
    candidate = ["b"] * 2 + ["a"] * 28 + ["a"] * 4 + ["b"] * 26 + ["a"] * 5
    checks = class_recall_champion_checks(truth, candidate, champion, CONFIG)
    # a: 28/30 (-0.067, inside the 0.1 margin); b: 26/30 (-0.133); c: too little support
    assert [(c.name, c.passed) for c in checks] == [
        ("recall_vs_production[a]", True),
        ("recall_vs_production[b]", False),
    ]
    assert checks[1].reason.startswith("recall 0.8667 vs production 1.0000 on the same 30")
    assert all(c.passed for c in class_recall_champion_checks(truth, truth, candidate, CONFIG))


def test_a_first_release_on_new_data_follows_the_no_champion_rule():
    truth, predicted = predictions()
    reason = "production t:1 was trained on other labels (new data): first release on this data"
    for policy, passed in (("pass", True), ("fail", False)):
        config = gate_config(no_champion=policy)
        (check,) = champion_checks(truth, predicted, None, config, new_data=reason)
        assert check.passed is passed and not check.applied
        assert check.reason == f"{reason}; gate.no_champion is '{policy}'"


def test_worst_confusions_are_ranked_by_count():
    truth = ["a"] * 10 + ["b"] * 10
    predicted = ["a"] * 7 + ["b"] * 3 + ["b"] * 9 + ["a"]
    pairs = worst_confusions(truth, predicted)
    assert [(p.actual, p.predicted, p.count) for p in pairs] == [("a", "b", 3), ("b", "a", 1)]
    assert pairs[0].share == pytest.approx(0.3)


# --- calibration and behaviour ------------------------------------------------------------


def test_ece_over_the_ceiling_fails():
    ok = calibration_check({"ece": 0.03, "ece_uncalibrated": 0.12, "temperature": 1.7}, CONFIG)
    assert ok.passed and ok.relation == "<="
    assert "before temperature scaling 0.1200" in ok.reason
    bad = calibration_check({"ece": 0.25, "ece_uncalibrated": 0.3, "temperature": 1.0}, CONFIG)
    assert not bad.passed
    assert bad.reason.startswith("ece 0.2500 > ceiling 0.1000")
    assert not calibration_check({}, CONFIG).passed


def test_behaviour_rate_below_its_floor_fails():
    rates = {"casing": 1.0, "punctuation": 0.97, "typos": 0.6, "filler": 1.0, "must_pass": 1.0}
    checks = behaviour_checks(rates, CONFIG)
    assert [c.name for c in checks if not c.passed] == ["behaviour[typos]"]


def test_behaviour_may_not_fall_under_productions_rate_beyond_the_margin():
    rates = {"casing": 1.0, "punctuation": 0.97, "typos": 0.86, "filler": 0.9, "must_pass": 1.0}
    production = {"typos": 0.92, "filler": 0.91, "must_pass": 1.0}
    config = gate_config(behaviour={"typos": 0.75, "filler": 0.8})
    checks = {c.name: c for c in behaviour_checks(rates, config, production)}
    assert not checks["behaviour[typos]"].passed  # 0.86 < 0.92 - 0.03
    assert checks["behaviour[typos]"].threshold == pytest.approx(0.89)
    assert "production 0.9200" in checks["behaviour[typos]"].reason
    assert checks["behaviour[filler]"].passed  # 0.90 >= 0.91 - 0.03, and over its floor
    assert all(c.passed for c in behaviour_checks(rates, config, production | {"typos": 0.88}))


def test_failing_must_pass_case_fails_the_gate():
    rates = {"casing": 1.0, "punctuation": 1.0, "typos": 1.0, "filler": 1.0, "must_pass": 0.95}
    checks = behaviour_checks(rates, CONFIG)
    assert [c.name for c in checks if not c.passed] == ["behaviour[must_pass]"]


def test_unmeasurable_behaviour_does_not_apply_but_a_missing_one_fails():
    checks = behaviour_checks({"casing": None}, CONFIG)
    by_name = {c.name: c for c in checks}
    assert by_name["behaviour[casing]"].passed and not by_name["behaviour[casing]"].applied
    assert not by_name["behaviour[typos]"].passed
    assert not any(c.passed for c in behaviour_checks(None, CONFIG) if c.applied)


# --- the served bento ---------------------------------------------------------------------


def report(**overrides):
    base = {"n": 40, "matched": 40, "mismatches": [], "errors": [], "p50_ms": 12.0, "p95_ms": 20.0}
    return {**base, **overrides}


def test_served_bento_that_answers_like_offline_passes():
    assert all(check.passed for check in served_checks(report(), CONFIG))


def test_served_answers_that_differ_from_offline_fail():
    mismatch = {
        "text": "my card is gone",
        "served_label": "refund",
        "served_score": 0.51,
        "offline_label": "lost_card",
        "offline_score": 0.9,
    }
    answers, latency = served_checks(report(matched=39, mismatches=[mismatch]), CONFIG)
    assert not answers.passed and latency.passed
    assert "39/40 golden requests" in answers.reason
    assert "served refund (0.5100), offline lost_card (0.9000)" in answers.reason


def test_slow_served_bento_fails_the_latency_budget():
    answers, latency = served_checks(report(p95_ms=900.0), CONFIG)
    assert answers.passed and not latency.passed
    assert "900.0000 > ceiling 300.0000" in latency.reason


def test_bento_that_cannot_be_served_fails():
    (check,) = served_checks(None, CONFIG, error="bentoml serve exited with 1")
    assert not check.passed and "exited with 1" in check.reason
    assert not served_checks(report(n=0, matched=0), CONFIG)[0].passed


# --- the verdict --------------------------------------------------------------------------


def passing_metrics():
    rates = dict.fromkeys(("casing", "punctuation", "typos", "filler", "must_pass"), 1.0)
    return {
        "accuracy": 0.95,
        "macro_f1": 0.94,
        "ece": 0.02,
        "ece_uncalibrated": 0.05,
        "temperature": 1.3,
        "behaviour": rates,
    }


def test_verdict_passes_only_when_every_check_passes():
    truth, predicted = predictions(wrong={1, 2})
    champion = champion_checks(truth, predicted, predicted, CONFIG, champion_tag="t:1")
    verdict = evaluate_gate(
        passing_metrics(), per_class({"a": 0.9}), CONFIG, champion=champion, champion_tag="t:1"
    )
    assert verdict.passed, verdict.summary()
    kinds = {check.kind for check in verdict.checks}
    assert kinds == {
        "floor",
        "quantization",
        "champion",
        "class_recall",
        "calibration",
        "behaviour",
    }

    served = verdict.with_checks(served_checks(report(p95_ms=999.0), CONFIG))
    assert not served.passed and [c.name for c in served.failed] == ["served_p95_latency"]
    rejected = verdict.with_checks([approval_check(False, "ana", "wait for the launch")])
    assert not rejected.passed
    assert rejected.failed[0].reason == "rejected by ana: wait for the launch"
    assert verdict.with_checks([approval_check(True, "ana", "")]).passed


def test_verdict_explains_itself_in_text_markdown_and_json():
    truth, champion = predictions(wrong={1, 2})
    _, candidate = predictions(wrong=set(range(0, 300, 5)))
    checks = champion_checks(truth, candidate, champion, CONFIG, champion_tag="t:1")
    verdict = evaluate_gate(
        passing_metrics(),
        per_class({"a": 0.9}),
        CONFIG,
        champion=checks,
        champion_tag="t:1",
        confusions=worst_confusions(truth, candidate),
    )
    assert not verdict.passed
    summary = verdict.summary().splitlines()
    assert summary[0] == "gate FAILED (2 check(s))"
    assert summary[1].startswith("- [FAIL] champion_accuracy")  # failures come first
    assert len(summary) == 1 + len(verdict.checks)
    markdown = verdict.to_markdown()
    assert markdown.count("**FAIL**") == 2
    assert "CI low >= -0.03" in markdown and "Worst confusions" in markdown
    restored = Verdict.model_validate(json.loads(verdict.model_dump_json()))
    assert restored == verdict


def test_a_behaviour_test_that_does_not_apply_is_shown_as_n_a_not_as_passed():
    rates = {"casing": None, "punctuation": 1.0, "typos": 1.0, "filler": 1.0, "must_pass": 1.0}
    verdict = Verdict.of(behaviour_checks(rates, CONFIG))
    casing = next(c for c in verdict.checks if c.name == "behaviour[casing]")
    assert casing.reason.startswith("not applicable")
    assert "letters with case" in casing.reason
    assert "- [n/a] behaviour[casing]: not applicable" in verdict.summary()
    assert "- [pass] behaviour[typos]" in verdict.summary()
    assert "| n/a | not applicable" in verdict.to_markdown()
