"""The promotion gate: a pure function from metrics and thresholds to an explained verdict."""

from __future__ import annotations

import math
from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict

from textgate.config import GateConfig

# (check name, metric key, params field): each is a floor, value >= threshold to pass.
FLOORS = (
    ("accuracy_floor", "accuracy", "min_accuracy"),
    ("macro_f1_floor", "macro_f1", "min_macro_f1"),
)


class Check(BaseModel):
    """One gate check: what was measured, against what, and why it passed or failed."""

    model_config = ConfigDict(frozen=True)

    name: str
    metric: str
    value: float | None
    threshold: float
    passed: bool
    reason: str


class Verdict(BaseModel):
    """Every check of the gate; the model passes only if all of them pass."""

    model_config = ConfigDict(frozen=True)

    passed: bool
    checks: list[Check]

    @property
    def failed(self) -> list[Check]:
        return [check for check in self.checks if not check.passed]

    def summary(self) -> str:
        """One line per check, led by the overall outcome (used as the flow's message)."""
        head = "gate PASSED" if self.passed else f"gate FAILED ({len(self.failed)} check(s))"
        return "\n".join([head] + [f"- {check.reason}" for check in self.checks])

    def to_markdown(self) -> str:
        """A table of every check, for the Prefect UI."""
        rows = [
            f"| {check.name} | {check.metric} | "
            f"{'n/a' if check.value is None else f'{check.value:.4f}'} | "
            f">= {check.threshold:.4f} | {'pass' if check.passed else '**FAIL**'} | "
            f"{check.reason} |"
            for check in self.checks
        ]
        outcome = "PASSED" if self.passed else "FAILED"
        return "\n".join(
            [
                f"## Gate verdict: {outcome}",
                "",
                "| check | metric | value | threshold | result | reason |",
                "|---|---|---|---|---|---|",
                *rows,
            ]
        )


def _floor_check(name: str, metric: str, value: object, threshold: float) -> Check:
    if not isinstance(value, int | float) or isinstance(value, bool) or math.isnan(value):
        return Check(
            name=name,
            metric=metric,
            value=None,
            threshold=threshold,
            passed=False,
            reason=f"{metric} is missing or not a number ({value!r}); cannot pass",
        )
    passed = value >= threshold
    relation = ">=" if passed else "<"
    return Check(
        name=name,
        metric=metric,
        value=float(value),
        threshold=threshold,
        passed=passed,
        reason=f"{metric} {value:.4f} {relation} floor {threshold:.4f}",
    )


def evaluate_gate(metrics: Mapping[str, object], config: GateConfig) -> Verdict:
    """Check test metrics against the floors in `config`; a missing metric fails its check."""
    checks = [
        _floor_check(name, metric, metrics.get(metric), getattr(config, field))
        for name, metric, field in FLOORS
    ]
    return Verdict(passed=all(check.passed for check in checks), checks=checks)
