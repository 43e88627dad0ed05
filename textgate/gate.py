"""The promotion gate: pure functions from evidence and thresholds to an explained verdict.

Every check says what was measured, against what (a threshold, and the production model's
value where there is one), by how much, with what confidence, and why it passed or failed.
The verdict passes only if every check passes. Checks come in groups, each from its own
function, so the flow can add the ones that need the served bento or a person later:

- `floor_checks`: test accuracy and macro-F1 floors;
- `out_of_scope_checks`: with an out-of-scope label, floors on the served "unknown" answers
  (in-scope accuracy, out-of-scope recall and precision, AUROC of the unknown score);
- `quantization_check`: the int8 model served on CPUs within a margin of fp32 accuracy;
- `champion_checks`: non-inferiority to the production model on the same test set (paired
  bootstrap confidence interval of the difference; a margin per metric);
- `class_recall_checks`: a recall floor per intent where its test support is large enough;
- `class_recall_champion_checks`: each intent's recall against production's (non-regression);
- `calibration_check`: expected calibration error after temperature scaling;
- `behaviour_checks`: invariance to casing, punctuation, typos and filler, and the must-pass
  file;
- `served_checks`: the packaged bento, really served, answers as the offline model does and
  fast enough;
- `approval_check`: a person's decision, when approval is required.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from textgate.config import BehaviourConfig, GateConfig
from textgate.stats import BootstrapResult, mcnemar_p_value, paired_bootstrap
from textgate.text import text_fingerprint

CheckKind = Literal[
    "floor",
    "out_of_scope",
    "quantization",
    "champion",
    "class_recall",
    "calibration",
    "behaviour",
    "served",
    "approval",
    "shadow",
]
Relation = Literal[">=", "<="]

# (check name, metric key, params field): each is a floor, value >= threshold to pass.
FLOORS = (
    ("accuracy_floor", "accuracy", "min_accuracy"),
    ("macro_f1_floor", "macro_f1", "min_macro_f1"),
)
COMPARED = ("accuracy", "macro_f1")
# (metric in metrics["abstention"], gate.out_of_scope field): floors on the served "unknown"
# answers, applied when the model declares an out-of-scope label.
OUT_OF_SCOPE_FLOORS = (
    ("in_scope_accuracy", "min_in_scope_accuracy"),
    ("oos_recall", "min_oos_recall"),
    ("oos_precision", "min_oos_precision"),
    ("unknown_auroc", "min_unknown_auroc"),
)


class Check(BaseModel):
    """One gate check: what was measured, against what, and why it passed or failed.

    `threshold` applies to `value` with `relation`, except for champion checks, where it
    applies to the lower end of `ci` (the confidence interval of `delta`, candidate minus
    production). `applied` is False for a check that did not apply (it then passes, and its
    reason says why).
    """

    model_config = ConfigDict(frozen=True)

    name: str
    kind: CheckKind
    metric: str
    value: float | None
    threshold: float | None
    relation: Relation = ">="
    passed: bool
    reason: str
    baseline: float | None = None
    delta: float | None = None
    ci: tuple[float, float] | None = None
    applied: bool = True


class ConfusionPair(BaseModel):
    """An (actual, predicted) pair of different intents and how often the model confused them."""

    model_config = ConfigDict(frozen=True)

    actual: str
    predicted: str
    count: int
    share: float  # of the actual intent's test examples


class Verdict(BaseModel):
    """Every check of the gate; the model passes only if all of them pass."""

    model_config = ConfigDict(frozen=True)

    passed: bool
    checks: list[Check]
    champion: str | None = None
    confusions: list[ConfusionPair] = Field(default_factory=list)
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))

    @classmethod
    def of(cls, checks: Sequence[Check], **info: Any) -> Verdict:
        return cls(passed=all(check.passed for check in checks), checks=list(checks), **info)

    def with_checks(self, checks: Sequence[Check]) -> Verdict:
        """This verdict with more checks (e.g. of the served bento), re-decided."""
        merged = [*self.checks, *checks]
        return self.model_copy(
            update={"checks": merged, "passed": all(check.passed for check in merged)}
        )

    @property
    def failed(self) -> list[Check]:
        return [check for check in self.checks if not check.passed]

    def summary(self) -> str:
        """One line per check, led by the overall outcome (used as the flow's message)."""
        head = "gate PASSED" if self.passed else f"gate FAILED ({len(self.failed)} check(s))"
        lines = [head]
        # Failed checks first, so a long verdict still shows why at the top.
        for check in sorted(self.checks, key=lambda check: check.passed):
            mark = ("pass" if check.applied else "n/a") if check.passed else "FAIL"
            lines.append(f"- [{mark}] {check.name}: {check.reason}")
        return "\n".join(lines)

    def to_markdown(self) -> str:
        """A table of every check and the worst confusions, for the Prefect UI."""
        rows = [
            f"| {check.name} | {_fmt(check.value)} | {_fmt(check.baseline)} | "
            f"{_threshold(check)} | {_delta(check)} | "
            f"{_result(check)} | {check.reason} |"
            for check in self.checks
        ]
        outcome = "PASSED" if self.passed else f"FAILED ({len(self.failed)} check(s))"
        lines = [
            f"## Gate verdict: {outcome}",
            "",
            f"Production model compared against: `{self.champion or 'none (first release)'}`",
            "",
            "| check | value | baseline | threshold | delta [CI] | result | reason |",
            "|---|---|---|---|---|---|---|",
            *rows,
        ]
        if self.confusions:
            lines += [
                "",
                "### Worst confusions (test set)",
                "",
                "| actual | predicted as | count | share of actual |",
                "|---|---|---|---|",
                *(
                    f"| {pair.actual} | {pair.predicted} | {pair.count} | {pair.share:.1%} |"
                    for pair in self.confusions
                ),
            ]
        return "\n".join(lines)


def _result(check: Check) -> str:
    if not check.passed:
        return "**FAIL**"
    return "pass" if check.applied else "n/a"


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def _threshold(check: Check) -> str:
    if check.threshold is None:
        return ""
    subject = "CI low " if check.kind == "champion" else ""
    return f"{subject}{check.relation} {check.threshold:.4g}"


def _delta(check: Check) -> str:
    if check.delta is None:
        return ""
    if check.ci is None:
        return f"{check.delta:+.4f}"
    return f"{check.delta:+.4f} [{check.ci[0]:+.4f}, {check.ci[1]:+.4f}]"


def _number(value: object) -> float | None:
    if not isinstance(value, int | float) or isinstance(value, bool) or math.isnan(value):
        return None
    return float(value)


def _bound_check(
    name: str,
    kind: CheckKind,
    metric: str,
    raw: object,
    threshold: float,
    relation: Relation = ">=",
    baseline: float | None = None,
) -> Check:
    """value >= threshold (a floor) or value <= threshold (a ceiling); a missing value fails."""
    value = _number(raw)
    if value is None:
        return Check(
            name=name,
            kind=kind,
            metric=metric,
            value=None,
            threshold=threshold,
            relation=relation,
            passed=False,
            reason=f"{metric} is missing or not a number ({raw!r}); cannot pass",
        )
    passed = value >= threshold if relation == ">=" else value <= threshold
    word = "floor" if relation == ">=" else "ceiling"
    shown = relation if passed else {">=": "<", "<=": ">"}[relation]
    return Check(
        name=name,
        kind=kind,
        metric=metric,
        value=value,
        threshold=threshold,
        relation=relation,
        passed=passed,
        baseline=baseline,
        delta=None if baseline is None else value - baseline,
        reason=f"{metric} {value:.4f} {shown} {word} {threshold:.4f}",
    )


def floor_checks(metrics: Mapping[str, object], config: GateConfig) -> list[Check]:
    """Test accuracy and macro-F1 against their floors."""
    return [
        _bound_check(name, "floor", metric, metrics.get(metric), getattr(config, field))
        for name, metric, field in FLOORS
    ]


def out_of_scope_checks(metrics: Mapping[str, Any], config: GateConfig) -> list[Check]:
    """The served "unknown" answers against `gate.out_of_scope`'s floors; none without a
    declared out-of-scope label (`metrics["abstention"]["out_of_scope_label"]`)."""
    abstention = metrics.get("abstention") or {}
    if not abstention.get("out_of_scope_label"):
        return []
    return [
        _bound_check(
            f"out_of_scope[{metric}]",
            "out_of_scope",
            metric,
            abstention.get(metric),
            getattr(config.out_of_scope, field),
        )
        for metric, field in OUT_OF_SCOPE_FLOORS
    ]


def champion_checks(
    y_true: Sequence[str],
    candidate: Sequence[str],
    champion: Sequence[str] | None,
    config: GateConfig,
    *,
    champion_tag: str | None = None,
    champion_error: str | None = None,
    excluded: int = 0,
    seed: int = 0,
    new_data: str | None = None,
) -> list[Check]:
    """Non-inferiority of the candidate to the production model, per compared metric.

    Both models' predicted labels are for the same test examples. For each metric the
    paired bootstrap gives a confidence interval of the difference (candidate minus
    production); the check passes when its lower end is at least minus the margin, i.e.
    the data rule out a regression larger than the margin. A candidate equal to production
    within noise passes; one worse by more than the margin fails.

    With no production model, or one trained on other labels (`new_data` says so), the
    outcome is `config.no_champion`; when the production model cannot be scored
    (`champion_error`) the check fails, since nothing rules out a regression.
    `excluded` is how many test examples were left out because the production model was
    trained on them (see `unseen_mask`); the reason says so.
    """
    if champion_error is not None:
        return [_not_compared(False, f"cannot compare with the production model: {champion_error}")]
    if champion is None:
        return [_first_release(config, new_data)]
    if not (len(y_true) == len(candidate) == len(champion)) or not y_true:
        raise ValueError("y_true, candidate and champion must be non-empty and of one length")
    labels = sorted(set(y_true) | set(candidate) | set(champion))
    index = {label: i for i, label in enumerate(labels)}
    truth = [index[label] for label in y_true]
    ours = [index[label] for label in candidate]
    theirs = [index[label] for label in champion]
    p_value = mcnemar_p_value(truth, ours, theirs)
    production = f"production {champion_tag}" if champion_tag else "production"
    checks = []
    for metric in COMPARED:
        result = paired_bootstrap(
            truth,
            ours,
            theirs,
            len(labels),
            metric=metric,
            n_resamples=config.bootstrap_resamples,
            confidence=config.confidence,
            seed=seed,
        )
        notes = []
        if metric == "accuracy":
            notes.append(f" (McNemar p = {p_value:.3g})")
        if excluded:
            notes.append(
                f"; on {len(truth)} test examples, {excluded} left out because production "
                "was trained on them"
            )
        checks.append(_non_inferiority_check(metric, result, config, production, "".join(notes)))
    return checks


def _first_release(config: GateConfig, new_data: str | None) -> Check:
    """A first release, or the first on new data: the floors alone decide, if no_champion
    is `pass`."""
    policy = config.no_champion
    first = new_data or "no model in production yet (first release)"
    return _not_compared(policy == "pass", f"{first}; gate.no_champion is '{policy}'", False)


def _not_compared(passed: bool, reason: str, applied: bool = True) -> Check:
    """The champion check when no comparison was made (no production model, or unscorable)."""
    return Check(
        name="champion",
        kind="champion",
        metric="accuracy",
        value=None,
        threshold=None,
        passed=passed,
        applied=applied,
        reason=reason,
    )


def _non_inferiority_check(
    metric: str, result: BootstrapResult, config: GateConfig, production: str, notes: str
) -> Check:
    """One metric's champion check: the CI's lower end against minus the metric's margin.

    `production` names the production model in the reason; `notes` is appended to it.
    """
    margin = getattr(config.margins, metric)
    passed = result.low >= -margin
    level = f"{config.confidence:.0%} CI"
    reason = (
        f"{metric} {result.value_a:.4f} vs {production} {result.value_b:.4f}: "
        f"delta {result.delta:+.4f}, {level} [{result.low:+.4f}, {result.high:+.4f}]; "
    )
    if passed:
        reason += f"lower bound >= -{margin:.4f} margin: not worse beyond the margin"
    else:
        reason += (
            f"lower bound < -{margin:.4f} margin: a regression beyond the margin is not ruled out"
        )
    return Check(
        name=f"champion_{metric}",
        kind="champion",
        metric=metric,
        value=result.value_a,
        baseline=result.value_b,
        threshold=-margin,
        delta=result.delta,
        ci=(result.low, result.high),
        passed=passed,
        reason=reason + notes,
    )


def unseen_mask(texts: Sequence[str], seen: set[str] | None) -> list[bool]:
    """True for each test text the production model was not trained on.

    The test split can change when the data does, so an example in today's test set may
    have been in the production model's training set; comparing on it would favour
    production. `seen` holds the production model's text fingerprints (None: not recorded,
    every example is kept).
    """
    if seen is None:
        return [True] * len(texts)
    return [text_fingerprint(text) not in seen for text in texts]


def class_recall_checks(
    per_class: Mapping[str, Mapping[str, Any]],
    config: GateConfig,
    out_of_scope_label: str | None = None,
) -> list[Check]:
    """A recall floor per intent, applied only where its test support is at least the minimum.

    A label in `gate.class_recall_floors` that the model does not know fails (a misspelt
    label would otherwise silently switch its floor off). The out-of-scope label is no intent:
    its recall is `gate.out_of_scope.min_oos_recall`'s (unless class_recall_floors names it).
    """
    checks = []
    for label in sorted(set(config.class_recall_floors) - set(per_class)):
        checks.append(
            Check(
                name=f"recall[{label}]",
                kind="class_recall",
                metric="recall",
                value=None,
                threshold=config.class_recall_floors[label],
                passed=False,
                reason=f"gate.class_recall_floors names {label!r}, which is not a label of "
                f"this model ({sorted(per_class)})",
            )
        )
    for label, scores in per_class.items():
        floor = config.class_recall_floors.get(label, config.min_class_recall)
        support = int(scores.get("support", 0))
        if label == out_of_scope_label and label not in config.class_recall_floors:
            checks.append(
                _not_applied_recall(
                    label,
                    scores,
                    floor,
                    "the out-of-scope label: gate.out_of_scope.min_oos_recall floors it",
                )
            )
            continue
        if support < config.min_class_support:
            why = f"test support {support} < gate.min_class_support {config.min_class_support}"
            checks.append(_not_applied_recall(label, scores, floor, why))
            continue
        check = _bound_check(
            f"recall[{label}]", "class_recall", "recall", scores.get("recall"), floor
        )
        checks.append(check.model_copy(update={"reason": f"{check.reason} (support {support})"}))
    return checks


def _not_applied_recall(label: str, scores: Mapping[str, Any], floor: float, why: str) -> Check:
    return Check(
        name=f"recall[{label}]",
        kind="class_recall",
        metric="recall",
        value=_number(scores.get("recall")),
        threshold=floor,
        passed=True,
        applied=False,
        reason=f"not applied: {why}",
    )


def class_recall_champion_checks(
    y_true: Sequence[str], candidate: Sequence[str], champion: Sequence[str], config: GateConfig
) -> list[Check]:
    """Each intent's recall against the production model's on the same test examples.

    An absolute recall floor cannot suit every dataset (a hard intent of a 150-intent set is
    fine at 0.6); a candidate that loses more than `gate.margins.class_recall` of an intent's
    recall production had is a regression. Applied where the intent has at least
    `gate.min_class_support` examples.
    """
    margin = config.margins.class_recall
    checks = []
    for label in sorted(set(y_true)):
        rows = [i for i, gold in enumerate(y_true) if gold == label]
        if len(rows) < config.min_class_support:
            continue
        ours = sum(candidate[i] == label for i in rows) / len(rows)
        theirs = sum(champion[i] == label for i in rows) / len(rows)
        check = _bound_check(
            f"recall_vs_production[{label}]",
            "class_recall",
            "recall",
            ours,
            round(theirs - margin, 10),
            baseline=theirs,
        )
        reason = (
            f"recall {ours:.4f} vs production {theirs:.4f} on the same {len(rows)} examples: "
            + ("within" if check.passed else "worse than")
            + f" the margin {margin:.4f}"
        )
        checks.append(check.model_copy(update={"reason": reason}))
    return checks


def calibration_check(metrics: Mapping[str, object], config: GateConfig) -> Check:
    """Expected calibration error of the calibrated test probabilities under a ceiling."""
    check = _bound_check(
        "calibration_ece",
        "calibration",
        "ece",
        metrics.get("ece"),
        config.max_ece,
        relation="<=",
        baseline=_number(metrics.get("ece_uncalibrated")),
    )
    temperature = _number(metrics.get("temperature"))
    if check.value is not None and check.baseline is not None and temperature is not None:
        check = check.model_copy(
            update={
                "reason": f"{check.reason} (before temperature scaling {check.baseline:.4f}; "
                f"temperature {temperature:.3f})"
            }
        )
    return check


def quantization_check(metrics: Mapping[str, object], config: GateConfig) -> Check:
    """The served (int8) model's test accuracy at most `max_quantization_drop` under fp32.

    Applies only when the evaluated runtime is quantised (metrics carry `accuracy_fp32`).
    """
    fp32 = _number(metrics.get("accuracy_fp32"))
    runtime = metrics.get("runtime", "torch")
    if "accuracy_fp32" not in metrics:
        return Check(
            name="quantization",
            kind="quantization",
            metric="accuracy_drop",
            value=None,
            threshold=config.max_quantization_drop,
            relation="<=",
            passed=True,
            applied=False,
            reason=f"not applied: the served runtime ({runtime}) is not quantised",
        )
    served = _number(metrics.get("accuracy"))
    drop = None if fp32 is None or served is None else fp32 - served
    check = _bound_check(
        "quantization",
        "quantization",
        "accuracy_drop",
        drop,
        config.max_quantization_drop,
        relation="<=",
    )
    if drop is None:
        return check
    return check.model_copy(
        update={
            "baseline": fp32,
            "delta": -drop,
            "reason": f"{runtime} accuracy {served:.4f} vs fp32 {fp32:.4f}: drop {drop:.4f} "
            f"{'<=' if check.passed else '>'} {config.max_quantization_drop:.4f}",
        }
    )


def behaviour_checks(
    rates: Mapping[str, object] | None,
    config: GateConfig,
    production: Mapping[str, object] | None = None,
) -> list[Check]:
    """Each behavioural test's pass rate against its floor in `gate.behaviour`, raised to
    production's rate minus `gate.margins.behaviour` where production has one.

    The floors are what any usable model reaches on real data; how invariant a good model is
    depends on the data (typos change more in short texts), so against a production model
    trained on the same labels the rule is non-regression. A rate of None means the test could
    not be measured (no text could be perturbed that way); the check then does not apply. A
    test missing from `rates` fails.
    """
    rates = rates or {}
    production = production or {}
    checks = []
    for kind in BehaviourConfig.model_fields:
        floor = getattr(config.behaviour, kind)
        theirs = _number(production.get(kind))
        if theirs is not None and kind != "must_pass":
            floor = max(floor, round(theirs - config.margins.behaviour, 10))
        name = f"behaviour[{kind}]"
        if kind in rates and rates[kind] is None:
            checks.append(
                Check(
                    name=name,
                    kind="behaviour",
                    metric=f"{kind}_pass_rate",
                    value=None,
                    threshold=floor,
                    passed=True,
                    applied=False,
                    reason=(
                        "not applicable: no test text could be perturbed this way"
                        + (" (none is written in letters with case)" if kind == "casing" else "")
                    ),
                )
            )
            continue
        check = _bound_check(
            name, "behaviour", f"{kind}_pass_rate", rates.get(kind), floor, baseline=theirs
        )
        if theirs is not None and kind != "must_pass":
            check = check.model_copy(
                update={
                    "reason": f"{check.reason} (production {theirs:.4f}, margin "
                    f"{config.margins.behaviour:.4f}; floor {getattr(config.behaviour, kind):.4f})"
                }
            )
        checks.append(check)
    return checks


def served_checks(
    report: Mapping[str, Any] | None, config: GateConfig, error: str | None = None
) -> list[Check]:
    """The served bento's answers against the offline ones, and its p95 latency."""
    if error is not None or report is None:
        return [
            Check(
                name="served_answers",
                kind="served",
                metric="served_match_rate",
                value=None,
                threshold=1.0,
                passed=False,
                reason=f"the bento could not be served and checked: {error or 'no report'}",
            )
        ]
    n, matched = int(report["n"]), int(report["matched"])
    rate = matched / n if n else None
    mismatches, errors = report.get("mismatches") or [], report.get("errors") or []
    if n == 0:
        answers = Check(
            name="served_answers",
            kind="served",
            metric="served_match_rate",
            value=None,
            threshold=1.0,
            passed=False,
            reason="no golden requests were replayed; the served bento is unchecked",
        )
    else:
        answers = _bound_check("served_answers", "served", "served_match_rate", rate, 1.0)
        detail = f"{matched}/{n} golden requests answered as offline"
        if mismatches:
            first = mismatches[0]
            detail += (
                f"; e.g. {first['text'][:60]!r}: served {first['served_label']} "
                f"({first['served_score']:.4f}), offline {first['offline_label']} "
                f"({first['offline_score']:.4f})"
            )
        if errors:
            detail += f"; {len(errors)} request error(s), first: {errors[0][:120]}"
        answers = answers.model_copy(
            update={"reason": f"{detail} (tolerance {config.served_score_tolerance:g})"}
        )
    latency = _bound_check(
        "served_p95_latency",
        "served",
        "p95_latency_ms",
        report.get("p95_ms"),
        config.max_p95_latency_ms,
        relation="<=",
    )
    latency = latency.model_copy(
        update={"reason": latency.reason.replace("p95_latency_ms", "p95 latency (ms)")}
    )
    return [answers, latency]


def approval_check(approved: bool, reviewer: str, comment: str) -> Check:
    """A person's decision on a run that passed every other check."""
    decision = "approved" if approved else "rejected"
    return Check(
        name="approval",
        kind="approval",
        metric="approved",
        value=1.0 if approved else 0.0,
        threshold=1.0,
        passed=approved,
        reason=f"{decision} by {reviewer}" + (f": {comment}" if comment else ""),
    )


def worst_confusions(
    y_true: Sequence[str], y_pred: Sequence[str], top: int = 5
) -> list[ConfusionPair]:
    """The most frequent (actual, predicted) pairs of different labels, most frequent first."""
    support = Counter(y_true)
    pairs = Counter((a, p) for a, p in zip(y_true, y_pred, strict=True) if a != p)
    ranked = sorted(pairs.items(), key=lambda item: (-item[1], item[0]))[:top]
    return [
        ConfusionPair(actual=a, predicted=p, count=count, share=count / support[a])
        for (a, p), count in ranked
    ]


def evaluate_gate(
    metrics: Mapping[str, Any],
    per_class: Mapping[str, Mapping[str, Any]],
    config: GateConfig,
    *,
    champion: Sequence[Check],
    champion_tag: str | None = None,
    confusions: Sequence[ConfusionPair] = (),
    production_behaviour: Mapping[str, object] | None = None,
) -> Verdict:
    """Every offline check on the evaluate stage's outputs, plus the champion comparison
    (`champion`: its checks; `production_behaviour`: its behavioural pass rates)."""
    checks = [
        *floor_checks(metrics, config),
        *out_of_scope_checks(metrics, config),
        quantization_check(metrics, config),
        *champion,
        *class_recall_checks(
            per_class, config, (metrics.get("abstention") or {}).get("out_of_scope_label")
        ),
        calibration_check(metrics, config),
        *behaviour_checks(metrics.get("behaviour"), config, production_behaviour),
    ]
    return Verdict.of(checks, champion=champion_tag, confusions=list(confusions))
