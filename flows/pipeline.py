"""The textgate pipeline: validate, prepare, train, evaluate (DVC), then gate, package, promote.

DVC decides which stages are up to date; Prefect adds what DVC lacks: the gate, packaging,
promotion, and artifacts in the UI. Run it with `textgate run` or `python -m flows.pipeline`,
or as the deployment `textgate-pipeline/default` (flows/deploy.py).

One `dvc status` first: when every stage is up to date no `dvc repro` is started at all.
Runs in one workspace take turns (flows/lock.py), so none meets DVC's repo lock. A failed gate
or stage sends an alert through `notify.block` (flows/notify.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import get_run_context
from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from prefect.states import Completed, Failed, State
from pydantic import BaseModel, Field

from flows.lock import workspace_lock
from flows.notify import send_alert
from flows.processes import die_with_parent
from flows.server import check_approval_possible
from tasks.params import apply_params
from textgate.config import PARAMS_FILE, Params, load_params, resolve_paths
from textgate.errors import TextgateError
from textgate.gate import (
    Check,
    Verdict,
    approval_check,
    champion_checks,
    evaluate_gate,
    served_checks,
    unseen_mask,
    worst_confusions,
)
from textgate.io import read_json, write_json
from textgate.registry import Registry

if TYPE_CHECKING:  # BentoML is imported only when a model is packaged
    from tasks.package import PackageResult
    from textgate.registry import Release

DVC_STAGES = ("validate", "prepare", "train", "evaluate")
# DVC's advice after each stage, noise in a flow's log.
DVC_HINTS = (
    "To track the changes with git",
    "git add dvc.lock",
    "To enable auto staging",
    "dvc config core.autostage",
    "Use `dvc push`",
)


class StageRun(BaseModel):
    stage: str
    ran: bool


class StageError(RuntimeError):
    """A DVC stage exited non-zero; the message carries the stage's own explanation."""


class PipelineFailed(TextgateError, Mapping[str, Any]):
    """A run the gate stopped: the verdict as its message, the run's summary as a mapping.

    A failed Prefect state's data must be an exception (a worker re-raises it, with this
    message), while callers read the summary: `state.result(raise_on_failure=False)["..."]`.
    """

    def __init__(self, message: str, summary: dict[str, Any]) -> None:
        super().__init__(message)
        self.summary = summary

    def __getitem__(self, key: str) -> Any:
        return self.summary[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.summary)

    def __len__(self) -> int:
        return len(self.summary)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self), self.summary))


def _failed(message: str, summary: dict[str, Any], name: str = "Failed") -> State:
    return Failed(name=name, message=message, data=PipelineFailed(message, summary))


def _stage_env() -> dict[str, str]:
    # Stage commands say `python`: make it this interpreter, whatever the caller's PATH.
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


@task(name="dvc-stage", task_run_name="{stage}", cache_policy=NO_CACHE)
def run_stage(stage: str, root: Path) -> StageRun:
    """`dvc repro --single-item <stage>`: runs the stage only if its deps or params changed."""
    logger = get_run_logger()
    command = [sys.executable, "-m", "dvc", "repro", "--single-item", stage]
    process = subprocess.Popen(
        command,
        cwd=root,
        env=_stage_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
        preexec_fn=die_with_parent(),
    )
    lines: list[str] = []
    assert process.stdout is not None
    for raw in process.stdout:
        line = raw.rstrip()
        if line and not line.lstrip().startswith(DVC_HINTS):
            lines.append(line)
            logger.info(line)
    if process.wait() != 0:
        details = [line for line in lines if not line.startswith(("Running stage", "> python"))]
        raise StageError(f"stage '{stage}' failed:\n" + "\n".join(details[-40:]))
    ran = any(line.startswith(f"Running stage '{stage}'") for line in lines)
    logger.info("stage %s: %s", stage, "ran" if ran else "up to date, skipped")
    return StageRun(stage=stage, ran=ran)


@task(name="dvc-status", cache_policy=NO_CACHE)
def dvc_up_to_date(root: Path) -> bool:
    """`dvc status`: True when no stage would run (one DVC start instead of one per stage).

    Anything else (changes, or status failing) leaves the decision to each stage's repro.
    """
    logger = get_run_logger()
    completed = subprocess.run(
        [sys.executable, "-m", "dvc", "status", "--json"],
        cwd=root,
        env=_stage_env(),
        capture_output=True,
        text=True,
    )
    try:
        status = json.loads(completed.stdout) if completed.returncode == 0 else None
    except ValueError:
        status = None
    if status == {}:
        logger.info("dvc status: every stage is up to date")
        return True
    if isinstance(status, dict):
        logger.info("dvc status: changed: %s", ", ".join(status))
    return False


def publish_validation(params: Params) -> None:
    """A markdown artifact with each validation check, if the validate stage wrote its report."""
    path = params.validate_.output_dir / "report.json"
    if not path.is_file():
        return
    report = read_json(path)
    rows = [
        f"| {check['name']} | {'pass' if check['success'] else '**FAIL**'} | {check['summary']} |"
        for check in report["checks"]
    ]
    outcome = "PASSED" if report["success"] else "FAILED"
    create_markdown_artifact(
        key="validation-summary",
        description="Great Expectations checks on the raw data",
        markdown="\n".join(
            [
                f"## Data validation: {outcome}",
                f"{report['n_rows']} rows, {len(report['labels'])} labels "
                f"({report['label_source']}).",
                "",
                "| check | result | detail |",
                "|---|---|---|",
                *rows,
                "",
                f"Report page (opens offline): `{path.with_suffix('.html')}`",
            ]
        ),
    )


def publish_metrics(params: Params, metrics: dict[str, Any]) -> None:
    per_class = read_json(params.evaluate.output_dir / "per_class.json")
    create_table_artifact(
        key="test-metrics",
        description=f"Test metrics: accuracy {metrics['accuracy']:.4f}, "
        f"macro-F1 {metrics['macro_f1']:.4f} on {metrics['n_test']} examples",
        table=[
            {"label": label, **{k: round(v, 4) for k, v in scores.items()}}
            for label, scores in per_class.items()
        ],
    )


def _select(values: list[str], keep: list[bool]) -> list[str]:
    return [value for value, kept in zip(values, keep, strict=True) if kept]


@task(name="gate", cache_policy=NO_CACHE)
def gate(params: Params, model_md5: str | None) -> Verdict:
    """Every offline check: floors, the production model, intents, calibration, behaviour.

    The production model (from the registry) is scored on the same test examples as the
    candidate; when it is the same model (same md5) its predictions are the candidate's.
    """
    logger = get_run_logger()
    out = params.evaluate.output_dir
    metrics = read_json(out / "metrics.json")
    per_class = read_json(out / "per_class.json")
    publish_metrics(params, metrics)
    predictions = pd.read_parquet(out / "predictions.parquet")
    y_true = predictions["label"].tolist()
    candidate = predictions["predicted"].tolist()

    production = Registry(params.registry.path).production()
    champion, error, excluded = None, None, 0
    if production is not None:
        if model_md5 and production.lineage.get("model_md5") == model_md5:
            champion = candidate
        else:
            from tasks.champion import score_production

            logger.info("scoring production model %s on the test set", production.model_tag)
            try:
                scores = score_production(
                    production.model_tag, predictions["text"].tolist(), params.evaluate.batch_size
                )
            except TextgateError as failure:
                error = str(failure)
            else:
                # Only examples the production model never trained on compare fairly.
                keep = unseen_mask(predictions["text"].tolist(), scores.seen)
                excluded = len(keep) - sum(keep)
                y_true, candidate = _select(y_true, keep), _select(candidate, keep)
                champion = _select(scores.labels, keep)
                if not y_true:
                    error = "the production model was trained on every example of this test set"
    checks = champion_checks(
        y_true,
        candidate,
        champion,
        params.gate,
        champion_tag=production.bento_tag if production else None,
        champion_error=error,
        excluded=excluded,
        seed=params.evaluate.seed,
    )
    return evaluate_gate(
        metrics,
        per_class,
        params.gate,
        champion=checks,
        champion_tag=production.bento_tag if production else None,
        confusions=worst_confusions(
            predictions["label"].tolist(), predictions["predicted"].tolist()
        ),
    )


@task(name="package", cache_policy=NO_CACHE)
def package(root: Path, params: Params, lineage: dict[str, Any]) -> PackageResult:
    """Save the model with its lineage to the BentoML store and build the bento."""
    from tasks.package import package_model

    metrics = read_json(params.evaluate.output_dir / "metrics.json")
    return package_model(
        params.train.output_dir / "model",
        params=params,
        metrics=metrics,
        lineage=lineage,
        build_ctx=root,
    )


@task(name="check-served-bento", cache_policy=NO_CACHE)
def check_served(params: Params, packaged: PackageResult) -> list[Check]:
    """Serve the bento for real, replay the golden requests, compare with offline answers."""
    from tasks.served import ServedCheckError, check_served_bento, load_golden

    golden = load_golden(params.evaluate.output_dir / "golden.json")
    with tempfile.TemporaryDirectory(prefix="textgate-served-") as workdir:
        try:
            report = check_served_bento(
                packaged.bento_tag,
                golden,
                workdir=Path(workdir),
                score_tolerance=params.gate.served_score_tolerance,
            )
        except ServedCheckError as error:
            return served_checks(None, params.gate, error=str(error))
    get_run_logger().info(
        "served bento %s: %d/%d golden answers match, p50 %.1f ms, p95 %.1f ms",
        packaged.bento_tag,
        report.matched,
        report.n,
        report.p50_ms,
        report.p95_ms,
    )
    return served_checks(report.to_dict(), params.gate)


class Approval(RunInput):
    """What the reviewer fills in, in the Prefect UI, for a run that passed every check."""

    approve: bool = False
    reviewer: str = Field(min_length=1, description="who decides (name or e-mail)")
    comment: str = Field(default="", description="why; recorded with the verdict")


def request_approval(verdict: Verdict, params: Params) -> Check:
    """Pause the run until a person approves or rejects it in the Prefect UI (or it times out)."""
    logger = get_run_logger()
    logger.info(
        "waiting for approval in the Prefect UI (timeout %d s)", params.gate.approval_timeout_s
    )
    description = (
        verdict.to_markdown()
        + "\n\n**Approve** to promote this model to production, or leave it unticked to "
        "reject it; either way the reviewer and comment are recorded with the verdict."
    )
    try:
        answer = pause_flow_run(
            wait_for_input=Approval.with_initial_data(description=description),
            timeout=params.gate.approval_timeout_s,
            poll_interval=2,
            key="approval",
        )
    except FlowPauseTimeout:
        return approval_check(
            False, "nobody", f"no decision within {params.gate.approval_timeout_s} s"
        )
    return approval_check(answer.approve, answer.reviewer, answer.comment)


def publish_verdict(verdict: Verdict, params: Params, run: dict[str, Any]) -> Path:
    """The verdict as a Prefect markdown artifact and as JSON next to the registry.

    Each run writes `verdicts/<time>.json`; `verdicts/latest.json` is the newest, which
    `textgate status` shows.
    """
    create_markdown_artifact(
        key="gate-verdict", description="Promotion gate", markdown=verdict.to_markdown()
    )
    directory = params.registry.path.parent / "verdicts"
    payload = {**verdict.model_dump(mode="json"), "run": run}
    stamp = verdict.created_at.strftime("%Y%m%dT%H%M%S%fZ")
    write_json(directory / f"{stamp}.json", payload)
    write_json(directory / "latest.json", payload)
    return directory / "latest.json"


@task(name="promote", cache_policy=NO_CACHE)
def promote(
    params: Params, packaged: PackageResult, lineage: dict[str, Any], verdict: Verdict
) -> Release:
    """Record the bento as production; the previous one stays in the history."""
    from tasks.promote import promote as promote_release

    metrics = read_json(params.evaluate.output_dir / "metrics.json")
    approval = next((c for c in verdict.checks if c.kind == "approval"), None)
    return promote_release(
        params,
        packaged,
        metrics=metrics,
        lineage=lineage,
        reason="passed the gate" + (f"; {approval.reason}" if approval else ""),
        verdict=verdict.model_dump(mode="json"),
    )


def _run_info(lineage: dict[str, Any], **extra: Any) -> dict[str, Any]:
    context = get_run_context()
    flow_run = getattr(context, "flow_run", None)
    return {
        "flow_run_id": str(flow_run.id) if flow_run else None,
        "flow_run_name": flow_run.name if flow_run else None,
        "model_md5": lineage.get("model_md5"),
        "data_md5": lineage.get("data_md5"),
        "git_commit": lineage.get("git_commit"),
        **extra,
    }


def alert(params: Params, subject: str, body: str) -> None:
    """Send an alert through `notify.block`, naming this flow run; a failure is only logged."""
    flow_run = getattr(get_run_context(), "flow_run", None)
    if flow_run is not None:
        subject = f"{subject} ({flow_run.name})"
        body = f"{body}\n\nflow run: {flow_run.name} ({flow_run.id})"
    send_alert(params.notify.block, subject=subject, body=body)


@flow(name="textgate-pipeline", log_prints=True)
def pipeline(params_path: str = PARAMS_FILE, repo_dir: str = ".") -> dict[str, Any]:
    """Validate, prepare, train and evaluate through DVC; gate; package, check and promote.

    Args:
        params_path: the run's params file, relative to `repo_dir` or absolute. Another file
            than the repository's params.yaml is written into it (tasks/params.py).
        repo_dir: the workspace: the git + DVC repository the stages run in.

    One run at a time per workspace: a second run waits for the first (flows/lock.py).
    """
    logger = get_run_logger()
    root = Path(repo_dir).resolve()
    source = root / params_path  # `params_path` may also be absolute, outside the repository
    # Absolute paths, so in-process steps do not depend on the current directory. A bad
    # file stops the run here, before anything is written.
    requested = resolve_paths(load_params(source), root)
    check_approval_possible(requested)
    flow_run = getattr(get_run_context(), "flow_run", None)
    with workspace_lock(
        root,
        limit=requested.deploy.concurrency_limit,
        timeout_s=requested.deploy.lock_timeout_s,
        flow_run=flow_run.name if flow_run else None,
        log=logger,
    ):
        # DVC stages read params.yaml only: it must hold this run's parameters.
        if apply_params(source, root):
            logger.info(
                "%s now holds this run's parameters, from %s (`git diff %s` shows them)",
                PARAMS_FILE,
                source,
                PARAMS_FILE,
            )
        declared = load_params(root / PARAMS_FILE)
        return _run_pipeline(root, declared, resolve_paths(declared, root))


def _run_pipeline(root: Path, declared: Params, params: Params) -> Any:
    """The pipeline's steps, under the workspace lock."""
    from tasks.lineage import collect_lineage

    logger = get_run_logger()
    runs: list[StageRun] = []
    up_to_date = dvc_up_to_date(root)

    def stage_run(stage: str) -> StageRun:
        return StageRun(stage=stage, ran=False) if up_to_date else run_stage(stage, root)

    try:
        try:
            runs.append(stage_run("validate"))
        finally:
            publish_validation(params)
        for stage in DVC_STAGES[1:]:
            runs.append(stage_run(stage))
    except StageError as error:
        alert(params, "textgate: pipeline stage failed", str(error))
        raise
    ran = [run.stage for run in runs if run.ran]
    skipped = [run.stage for run in runs if not run.ran]
    logger.info("stages ran: %s; up to date: %s", ran or "none", skipped or "none")
    create_table_artifact(
        key="pipeline-stages",
        description="DVC stages: which ran and which were up to date",
        table=[{"stage": run.stage, "outcome": "ran" if run.ran else "up to date"} for run in runs],
    )

    lineage = collect_lineage(root, declared)
    summary: dict[str, Any] = {"stages_ran": ran, "stages_skipped": skipped, "promoted": False}

    def finish(verdict: Verdict, **extra: Any) -> dict[str, Any]:
        summary["verdict"] = verdict.model_dump(mode="json")
        summary["verdict_file"] = str(publish_verdict(verdict, params, _run_info(lineage, **extra)))
        logger.info(verdict.summary())
        if not verdict.passed:
            failed = [line for line in verdict.summary().splitlines() if "[pass]" not in line]
            alert(params, "textgate: gate FAILED, nothing promoted", "\n".join(failed))
        return summary

    verdict = gate(params, lineage["model_md5"])
    if not verdict.passed:
        finish(verdict)
        return _failed(verdict.summary(), summary)

    current = Registry(params.registry.path).production()
    if (
        current is not None
        and lineage["model_md5"]
        and (current.lineage.get("model_md5") == lineage["model_md5"])
    ):
        logger.info(
            "this model is already in production as %s; nothing to promote", current.bento_tag
        )
        finish(verdict, bento_tag=current.bento_tag, promoted=False)
        summary["bento_tag"] = current.bento_tag
        return Completed(
            message=f"unchanged: {current.bento_tag} stays in production", data=summary
        )

    packaged = package(root, params, lineage)
    summary["bento_tag"] = packaged.bento_tag
    verdict = verdict.with_checks(check_served(params, packaged))
    if not verdict.passed:
        finish(verdict, bento_tag=packaged.bento_tag, promoted=False)
        return _failed(
            f"{verdict.summary()}\nbento {packaged.bento_tag} was built but not promoted", summary
        )
    if params.gate.require_approval:
        verdict = verdict.with_checks([request_approval(verdict, params)])
        if not verdict.passed:
            finish(verdict, bento_tag=packaged.bento_tag, promoted=False)
            return _failed(verdict.summary(), summary, name="Rejected")

    release = promote(params, packaged, lineage, verdict)
    summary["promoted"] = True
    finish(verdict, bento_tag=release.bento_tag, promoted=True)
    logger.info("promoted %s to production", release.bento_tag)
    return Completed(message=f"promoted {release.bento_tag}", data=summary)


if __name__ == "__main__":
    pipeline()
