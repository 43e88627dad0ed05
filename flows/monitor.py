"""The drift monitor flow: serving traffic since the last check vs production's training data.

Run it with `textgate monitor`, or on the interval `deploy.monitor_interval_minutes` once
`textgate deploy` has registered it. Each run publishes a `drift-report` artifact. On drift it
starts a run of the pipeline deployment (unless `monitor.retrain` is false or a drift-triggered
run started within `monitor.retrain_cooldown_hours`) and sends an alert through `notify.block`.

Outcomes, as the run's state name and message: "No production model", "No data" and "Not
enough data" (fewer than `monitor.min_requests` new requests; nothing is judged and the window
keeps growing), "No drift", "Drift detected". A check that cannot be made (the production
model or its reference cannot be loaded) fails the run with the reason.
"""

from __future__ import annotations

from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import get_run_context
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound
from prefect.states import Completed

from flows.deploy import PIPELINE_DEPLOYMENT
from flows.label_flow import label_export
from flows.notify import send_alert
from flows.server import configured_api_url
from tasks.label import production_live_accuracy
from tasks.monitor import MonitorResult, check_drift, record_retrain, retrain_cooldown_left
from textgate.config import PARAMS_FILE, Params, load_params, resolve_paths

STATE_NAMES = {
    "no_production": "No production model",
    "no_log": "No data",
    "not_enough_data": "Not enough data",
    "no_drift": "No drift",
    "drift": "Drift detected",
}


@task(name="check-drift", cache_policy=NO_CACHE)
def check(params: Params) -> MonitorResult:
    """Read the log since the last check and compare it with the reference."""
    return check_drift(params)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def report_markdown(result: MonitorResult) -> str:
    """The drift report: outcome, window, every check, notes."""
    lines = [f"## Drift monitor: {STATE_NAMES[result.status]}", "", result.message, ""]
    lines.append(f"- production model: `{result.model_tag or '(none)'}`")
    lines.append(f"- request log: `{result.log_path}`")
    window = result.window
    if window is not None:
        lines.append(
            f"- window: {window.n} requests (bytes {window.start_offset}-{window.end_offset}), "
            f"{window.first_ts or '-'} to {window.last_ts or '-'}; "
            f"{window.malformed} malformed line(s) skipped"
        )
        if window.model_tags:
            served = ", ".join(f"`{tag}` {count}" for tag, count in window.model_tags.items())
            lines.append(f"- served by: {served}")
    if result.reference is not None:
        lines.append(f"- reference: {result.reference.source}")
    if result.report is not None:
        lines += ["", "| check | value | threshold | result | detail |", "|---|---|---|---|---|"]
        for item in result.report.checks:
            verdict = "**DRIFT**" if item.drifted else "ok"
            lines.append(
                f"| {item.name} | {_fmt(item.value)} | {_fmt(item.threshold)} | {verdict} "
                f"| {item.detail} |"
            )
    if result.notes:
        lines += ["", "Notes:", *[f"- {note}" for note in result.notes]]
    return "\n".join(lines)


def _flow_run() -> Any:
    return getattr(get_run_context(), "flow_run", None)


def trigger_retraining(params: Params) -> tuple[str | None, str]:
    """Start a run of the pipeline deployment; (its name, what happened) for the report."""
    logger = get_run_logger()
    if not params.monitor.retrain:
        return None, "retraining is off (monitor.retrain: false)"
    now = datetime.now(UTC)
    left = retrain_cooldown_left(params, now)
    if left is not None:
        return None, (
            f"retraining not triggered: a drift-triggered run started less than "
            f"{params.monitor.retrain_cooldown_hours:g} h ago (again in "
            f"{left.total_seconds() / 3600:.1f} h)"
        )
    if not configured_api_url():
        return None, (
            f"retraining not triggered: no Prefect server (PREFECT_API_URL) with the "
            f"{PIPELINE_DEPLOYMENT} deployment; run `textgate run` by hand"
        )
    current = _flow_run()
    try:
        run = run_deployment(
            PIPELINE_DEPLOYMENT,
            timeout=0,
            flow_run_name=f"retrain-on-drift-{now:%Y%m%d-%H%M%S}",
            tags=["drift"],
            idempotency_key=f"drift-{current.id}" if current else None,
        )
    except ObjectNotFound:
        return None, (
            f"retraining not triggered: no deployment {PIPELINE_DEPLOYMENT} on this Prefect "
            "server; run `textgate deploy`"
        )
    record_retrain(params, now, run.name)
    logger.info("started %s (flow run %s) of %s", run.name, run.id, PIPELINE_DEPLOYMENT)
    return run.name, f"started flow run {run.name} of {PIPELINE_DEPLOYMENT}"


def _alert_body(result: MonitorResult, retrain: str) -> str:
    assert result.report is not None
    lines = [result.message, f"production model: {result.model_tag}", retrain]
    lines += [f"- {item.name}: {item.detail}" for item in result.report.fired]
    current = _flow_run()
    if current is not None:
        lines.append(f"monitor run: {current.name} ({current.id})")
    return "\n".join(lines)


def review_and_live_accuracy(
    params: Params, root: Path, params_path: str, result: MonitorResult, summary: dict[str, Any]
) -> None:
    """On drift, export the review queue (a subflow); always, production's live accuracy
    from the labelled random sample, with an alert when it is under gate.min_accuracy."""
    logger = get_run_logger()
    if result.status == "drift":
        try:
            summary["review"] = label_export(params_path=params_path, repo_dir=str(root))
        except Exception as error:  # noqa: BLE001 - the drift verdict stands without it
            summary["review"] = {"exported": 0, "message": f"review export failed: {error}"}
        result.notes.append(summary["review"]["message"])
    estimate, line = production_live_accuracy(params)
    summary["live_accuracy"] = None if estimate is None else estimate.accuracy
    result.notes.append(line)
    logger.info(line)
    if estimate is not None and estimate.accuracy < params.gate.min_accuracy:
        logger.warning("live accuracy below the gate's floor %.3f", params.gate.min_accuracy)
        summary["live_accuracy_alerted"] = send_alert(
            params.notify.block,
            subject=f"textgate: live accuracy of {result.model_tag} below the floor",
            body=f"{line}; gate.min_accuracy is {params.gate.min_accuracy:.3f}",
        )


@flow(name="textgate-drift-monitor", log_prints=True)
def drift_monitor(params_path: str = PARAMS_FILE, repo_dir: str = ".") -> Any:
    """Compare the requests logged since the last check with production's training data."""
    logger = get_run_logger()
    root = Path(repo_dir).resolve()
    params = resolve_paths(load_params(root / params_path), root)
    result = check(params)
    summary: dict[str, Any] = {
        "status": result.status,
        "message": result.message,
        "model_tag": result.model_tag,
        "requests": result.window.n if result.window else 0,
        "malformed": result.window.malformed if result.window else 0,
        "notes": list(result.notes),
        "checks": [asdict(item) for item in result.report.checks] if result.report else [],
    }
    for note in result.notes:
        logger.warning(note)
    logger.info(result.message)
    if result.status == "drift":
        flow_run, retrain = trigger_retraining(params)
        summary["retrain_flow_run"] = flow_run
        summary["retrain"] = retrain
        result.notes.append(retrain)
        logger.warning("drift detected: %s", retrain)
        summary["alerted"] = send_alert(
            params.notify.block,
            subject=f"textgate: drift detected for {result.model_tag}",
            body=_alert_body(result, retrain),
        )
    review_and_live_accuracy(params, root, params_path, result, summary)
    create_markdown_artifact(
        key="drift-report",
        description=f"Drift monitor: {STATE_NAMES[result.status]}",
        markdown=report_markdown(result),
    )
    message = result.message + (f"; {summary['retrain']}" if "retrain" in summary else "")
    return Completed(name=STATE_NAMES[result.status], message=message, data=summary)


if __name__ == "__main__":
    drift_monitor()
