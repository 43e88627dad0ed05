"""The textgate pipeline: validate, prepare, train, evaluate (DVC), then gate, package, promote.

DVC decides which stages are up to date; Prefect adds what DVC lacks: the gate, packaging,
promotion, and artifacts in the UI. Run it with `textgate run` or `python -m flows.pipeline`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed, Failed
from pydantic import BaseModel

from textgate.config import Params, load_params, resolve_paths
from textgate.gate import Verdict, evaluate_gate
from textgate.io import read_json

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
                f"Great Expectations Data Docs: `{path.parent / 'data_docs' / 'index.html'}`",
            ]
        ),
    )


@task(name="gate", cache_policy=NO_CACHE)
def gate(params: Params) -> Verdict:
    """Compare the evaluate stage's test metrics with the floors in params.gate."""
    metrics = read_json(params.evaluate.output_dir / "metrics.json")
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
    verdict = evaluate_gate(metrics, params.gate)
    create_markdown_artifact(
        key="gate-verdict", description="Promotion gate", markdown=verdict.to_markdown()
    )
    get_run_logger().info(verdict.summary())
    return verdict


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


@task(name="promote", cache_policy=NO_CACHE)
def promote(params: Params, packaged: PackageResult, lineage: dict[str, Any]) -> Release:
    """Record the bento as production; the previous one stays in the history."""
    from tasks.promote import promote as promote_release

    metrics = read_json(params.evaluate.output_dir / "metrics.json")
    return promote_release(
        params, packaged, metrics=metrics, lineage=lineage, reason="passed the gate"
    )


@flow(name="textgate-pipeline", log_prints=True)
def pipeline(params_path: str = "params.yaml", repo_dir: str = ".") -> dict[str, Any]:
    """Validate, prepare, train and evaluate through DVC; gate; package and promote on a pass."""
    from tasks.lineage import collect_lineage
    from textgate.registry import Registry

    logger = get_run_logger()
    root = Path(repo_dir).resolve()
    # Absolute paths, so in-process steps do not depend on the current directory.
    declared = load_params(root / params_path)
    params = resolve_paths(declared, root)

    runs: list[StageRun] = []
    try:
        runs.append(run_stage("validate", root))
    finally:
        publish_validation(params)
    for stage in DVC_STAGES[1:]:
        runs.append(run_stage(stage, root))
    ran = [run.stage for run in runs if run.ran]
    skipped = [run.stage for run in runs if not run.ran]
    logger.info("stages ran: %s; up to date: %s", ran or "none", skipped or "none")
    create_table_artifact(
        key="pipeline-stages",
        description="DVC stages: which ran and which were up to date",
        table=[{"stage": run.stage, "outcome": "ran" if run.ran else "up to date"} for run in runs],
    )

    verdict = gate(params)
    summary: dict[str, Any] = {
        "stages_ran": ran,
        "stages_skipped": skipped,
        "verdict": verdict.model_dump(),
    }
    if not verdict.passed:
        return Failed(message=verdict.summary(), data=summary)

    lineage = collect_lineage(root, declared)
    registry = Registry(params.registry.path)
    current = registry.production()
    if (
        current is not None
        and lineage["model_md5"]
        and (current.lineage.get("model_md5") == lineage["model_md5"])
    ):
        logger.info(
            "this model is already in production as %s; nothing to promote", current.bento_tag
        )
        summary["bento_tag"] = current.bento_tag
        summary["promoted"] = False
        return Completed(
            message=f"unchanged: {current.bento_tag} stays in production", data=summary
        )

    packaged = package(root, params, lineage)
    release = promote(params, packaged, lineage)
    summary["bento_tag"] = release.bento_tag
    summary["promoted"] = True
    logger.info("promoted %s to production", release.bento_tag)
    return Completed(message=f"promoted {release.bento_tag}", data=summary)


if __name__ == "__main__":
    pipeline()
