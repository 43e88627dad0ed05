"""What a pipeline run shows in the Prefect UI, built from the stages' outputs.

Plain content (markdown, table rows); the flow hands it to Prefect's artifact functions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tasks.stages import StageRun
from textgate.artifacts import (
    EvaluateMetrics,
    PerClass,
    ValidationReport,
    read_artifact,
    validate_outputs,
)
from textgate.config import Params
from textgate.validation import describe_repairs


def validation_markdown(params: Params) -> str | None:
    """Each validation check as a markdown table, or None if validate wrote no report."""
    outputs = validate_outputs(params)
    if not outputs.report.is_file():
        return None
    report = read_artifact(ValidationReport, outputs.report)
    rows = [
        f"| {check.name} | {'pass' if check.success else '**FAIL**'} | {check.summary} |"
        for check in report.checks
    ]
    outcome = "PASSED" if report.success else "FAILED"
    return "\n".join(
        [
            f"## Data validation: {outcome}",
            f"{report.n_rows} rows, {len(report.labels)} labels ({report.label_source}). "
            + describe_repairs(report.repairs),
            "",
            "| check | result | detail |",
            "|---|---|---|",
            *rows,
            "",
            f"Report page (opens offline): `{outputs.page}`",
        ]
    )


def metrics_description(metrics: EvaluateMetrics) -> str:
    """The test metrics artifact's one-line description."""
    return (
        f"Test metrics: accuracy {metrics.accuracy:.4f}, "
        f"macro-F1 {metrics.macro_f1:.4f} on {metrics.n_test} examples"
    )


def metrics_table(per_class: PerClass) -> list[dict[str, Any]]:
    """One row per label with its scores, rounded to 4 places."""
    return [
        {"label": label, **{k: round(v, 4) for k, v in scores.model_dump().items()}}
        for label, scores in per_class.root.items()
    ]


def stages_table(runs: Sequence[StageRun]) -> list[dict[str, str]]:
    """One row per DVC stage: whether it ran or was up to date."""
    return [{"stage": run.stage, "outcome": "ran" if run.ran else "up to date"} for run in runs]
