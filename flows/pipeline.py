"""The textgate pipeline: validate, prepare, train, evaluate (DVC), then gate, package, promote.

DVC decides which stages are up to date; Prefect adds what DVC lacks: the gate, packaging,
promotion, and artifacts in the UI. Run it with `textgate run` or `python -m flows.pipeline`,
or as the deployment `textgate-pipeline/default` (flows/deploy.py).

One `dvc status` first: when every stage is up to date no `dvc repro` is started at all.
Runs in one workspace take turns (flows/lock.py), so none meets DVC's repo lock. A failed gate
or stage sends an alert through `notify.block` (flows/notify.py). This module only wires: the
work is in tasks/ (stages, gate, package, served, promote, publish).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import get_run_context
from prefect.states import Completed, State

from flows.approval import request_approval
from flows.lock import workspace_lock
from flows.processes import die_with_parent
from flows.runs import PipelineFailed, alert, failed_state, run_info
from flows.server import check_approval_possible
from tasks import gate as gate_tasks
from tasks import publish, stages
from tasks import remote as remote_tasks
from tasks.params import apply_params
from tasks.stages import DVC_STAGES, StageError, StageRun
from textgate.config import PARAMS_FILE, Params, load_params, resolve_paths
from textgate.gate import Check, Verdict

if TYPE_CHECKING:  # BentoML is imported only when a model is packaged
    from tasks.package import PackageResult
    from textgate.registry import Release

__all__ = ["PipelineFailed", "pipeline"]  # PipelineFailed: what a stopped run's state carries


@task(name="dvc-stage", task_run_name="{stage}", cache_policy=NO_CACHE)
def run_stage(stage: str, root: Path) -> StageRun:
    """`dvc repro --single-item <stage>`: runs the stage only if its deps or params changed."""
    return stages.run_dvc_stage(stage, root, get_run_logger().info, preexec_fn=die_with_parent())


@task(name="dvc-status", cache_policy=NO_CACHE)
def dvc_up_to_date(root: Path) -> bool:
    """`dvc status`: True when no stage would run (one DVC start instead of one per stage)."""
    return stages.dvc_up_to_date(root, get_run_logger().info)


def publish_validation(params: Params) -> None:
    """A markdown artifact with each validation check, if the validate stage wrote its report."""
    markdown = publish.validation_markdown(params)
    if markdown is not None:
        create_markdown_artifact(
            key="validation-summary",
            description="Great Expectations checks on the raw data",
            markdown=markdown,
        )


@task(name="shared-state", cache_policy=NO_CACHE)
def prepare_shared_state(root: Path, params: Params) -> remote_tasks.Remote | None:
    """Before any stage: the registry answers; a DVC remote answers and data is pulled."""
    return remote_tasks.prepare_run(root, params.registry.path, get_run_logger().info)


@task(name="dvc-push", cache_policy=NO_CACHE)
def push_data(root: Path) -> None:
    """`dvc push` what the run produced to the DVC remote."""
    remote_tasks.sync(root, "push", get_run_logger().info)


@task(name="gate", cache_policy=NO_CACHE)
def gate(params: Params, model_md5: str | None) -> Verdict:
    """Every offline check: floors, the production model, intents, calibration, behaviour."""
    inputs = gate_tasks.read_gate_inputs(params)
    create_table_artifact(
        key="test-metrics",
        description=publish.metrics_description(inputs.metrics),
        table=publish.metrics_table(inputs.per_class),
    )
    return gate_tasks.decide(params, inputs, model_md5, get_run_logger().info)


@task(name="package", cache_policy=NO_CACHE)
def package(root: Path, params: Params, lineage: dict[str, Any]) -> PackageResult:
    """Save the model with its lineage to the BentoML store and build the bento."""
    from tasks.package import package_candidate

    packaged = package_candidate(root, params, lineage)
    # Exported before promotion: production never names a bento the store lacks.
    remote_tasks.export_if_remote(root, packaged.bento_tag, get_run_logger().info)
    return packaged


@task(name="check-served-bento", cache_policy=NO_CACHE)
def check_served(params: Params, packaged: PackageResult) -> list[Check]:
    """Serve the bento for real, replay the golden requests, compare with offline answers."""
    from tasks.served import served_gate_checks

    return served_gate_checks(params, packaged.bento_tag, get_run_logger().info)


@task(name="shadow-evidence", cache_policy=NO_CACHE)
def shadow(params: Params, packaged: PackageResult) -> list[Check]:
    """Serve the candidate in shadow beside production (`textgate serve`, serve.shadow) and
    wait for shadow.min_requests mirrored requests, or shadow.max_hours; the shadow checks."""
    from flows.serving import shadow_evidence
    from textgate.registry import Release

    candidate = Release.create(
        bento_tag=packaged.bento_tag, model_tag=packaged.model_tag, reason="shadow candidate"
    )
    logger = get_run_logger()
    return shadow_evidence(params.registry.path.parent, candidate, params.shadow, logger.info)


@task(name="promote", cache_policy=NO_CACHE)
def promote(
    params: Params, packaged: PackageResult, lineage: dict[str, Any], verdict: Verdict
) -> Release:
    """Record the bento as production; the previous one stays in the history."""
    from tasks.promote import promote_passed

    return promote_passed(params, packaged, lineage, verdict)


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
        params = resolve_paths(declared, root)
        remote = prepare_shared_state(root, params)
        state = _run_pipeline(root, declared, params)
        if remote is not None and state.is_completed():
            push_data(root)
        return state


def _run_pipeline(root: Path, declared: Params, params: Params) -> State:
    """The pipeline's steps, under the workspace lock."""
    from tasks.lineage import collect_lineage

    summary = _stages_summary(_run_stages(root, params))
    lineage = collect_lineage(root, declared)
    verdict = gate(params, lineage["model_md5"])
    if not verdict.passed:
        _finish(params, verdict, lineage, summary)
        return failed_state(verdict.summary(), summary)
    current = gate_tasks.already_in_production(params, lineage["model_md5"])
    if current is not None:
        get_run_logger().info(
            "this model is already in production as %s; nothing to promote", current.bento_tag
        )
        _finish(params, verdict, lineage, summary, bento_tag=current.bento_tag, promoted=False)
        summary["bento_tag"] = current.bento_tag
        return Completed(
            message=f"unchanged: {current.bento_tag} stays in production", data=summary
        )
    return _release(root, params, lineage, verdict, summary)


def _run_stages(root: Path, params: Params) -> list[StageRun]:
    """Each DVC stage in order (none when `dvc status` finds them all up to date)."""
    up_to_date = dvc_up_to_date(root)

    def stage_run(stage: str) -> StageRun:
        return StageRun(stage=stage, ran=False) if up_to_date else run_stage(stage, root)

    runs: list[StageRun] = []
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
    return runs


def _stages_summary(runs: list[StageRun]) -> dict[str, Any]:
    """Log and show which stages ran; the run's summary starts with them."""
    ran = [run.stage for run in runs if run.ran]
    skipped = [run.stage for run in runs if not run.ran]
    get_run_logger().info("stages ran: %s; up to date: %s", ran or "none", skipped or "none")
    create_table_artifact(
        key="pipeline-stages",
        description="DVC stages: which ran and which were up to date",
        table=publish.stages_table(runs),
    )
    return {"stages_ran": ran, "stages_skipped": skipped, "promoted": False}


def _finish(
    params: Params, verdict: Verdict, lineage: dict[str, Any], summary: dict[str, Any], **extra: Any
) -> None:
    """Show and keep the verdict (in `summary` too), log it, and alert when it failed."""
    summary["verdict"] = verdict.model_dump(mode="json")
    run = run_info(lineage, **extra)
    create_markdown_artifact(
        key="gate-verdict", description="Promotion gate", markdown=verdict.to_markdown()
    )
    summary["verdict_file"] = str(gate_tasks.write_verdict(verdict, params, run))
    get_run_logger().info(verdict.summary())
    if not verdict.passed:
        alert(params, "textgate: gate FAILED, nothing promoted", gate_tasks.failed_lines(verdict))


def _release(
    root: Path, params: Params, lineage: dict[str, Any], verdict: Verdict, summary: dict[str, Any]
) -> State:
    """Package, check the served bento, ask for approval if required, then promote."""
    packaged = package(root, params, lineage)
    summary["bento_tag"] = packaged.bento_tag
    verdict = verdict.with_checks(check_served(params, packaged))
    if not verdict.passed:
        _finish(params, verdict, lineage, summary, bento_tag=packaged.bento_tag, promoted=False)
        return failed_state(
            f"{verdict.summary()}\nbento {packaged.bento_tag} was built but not promoted", summary
        )
    if params.serve.shadow and verdict.passed:
        verdict = verdict.with_checks(shadow(params, packaged))
        if not verdict.passed:
            _finish(params, verdict, lineage, summary, bento_tag=packaged.bento_tag, promoted=False)
            return failed_state(f"{verdict.summary()}\nthe shadow checks failed", summary)
    if params.gate.require_approval:
        verdict = verdict.with_checks([request_approval(verdict, params)])
        if not verdict.passed:
            _finish(params, verdict, lineage, summary, bento_tag=packaged.bento_tag, promoted=False)
            return failed_state(verdict.summary(), summary, name="Rejected")
    release = promote(params, packaged, lineage, verdict)
    summary["promoted"] = True
    _finish(params, verdict, lineage, summary, bento_tag=release.bento_tag, promoted=True)
    get_run_logger().info("promoted %s to production", release.bento_tag)
    return Completed(message=f"promoted {release.bento_tag}", data=summary)


if __name__ == "__main__":
    pipeline()
