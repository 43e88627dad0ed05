"""The Prefect flow `textgate-label-export`: the review queue, as `textgate label export` writes
it; the drift monitor runs it as a subflow on drift, so the texts that drifted reach people."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows.label import DEFAULT_OUT
from tasks import label as steps
from textgate.config import PARAMS_FILE, load_params, resolve_paths


@flow(name="textgate-label-export", log_prints=True)
def label_export(
    params_path: str = PARAMS_FILE, repo_dir: str = ".", out: str | None = None
) -> dict[str, Any]:
    """Write the review queue from the requests logged since the last export."""
    logger = get_run_logger()
    root = Path(repo_dir).resolve()
    params = resolve_paths(load_params(root / params_path), root)
    target = Path(out) if out else root / DEFAULT_OUT
    try:
        result = steps.export_for_review(params, target)
    except steps.NothingToReview as nothing:
        logger.info(str(nothing))
        return {"exported": 0, "message": str(nothing)}
    logger.info(result.line())
    create_markdown_artifact(
        key="review-queue",
        description="Texts exported for labelling",
        markdown="\n".join(
            [
                "## Review queue",
                "",
                "| reason | texts |",
                "|---|---|",
                *[f"| {reason} | {count} |" for reason, count in result.counts.items()],
                "",
                f"From {result.requests_read} requests; files `{result.tasks_path}` and "
                f"`{result.csv_path}`. Label them (`textgate label serve`, or the CSV), then "
                "`textgate label import FILE`.",
                *[f"- {note}" for note in result.notes],
            ]
        ),
    )
    return {
        "exported": result.total,
        "counts": result.counts,
        "tasks": str(result.tasks_path),
        "csv": str(result.csv_path),
        "message": result.line(),
    }
