"""Running the DVC stages from a flow: `dvc status` once, then `dvc repro` one stage at a time.

Plain functions that log through a callback (a Prefect task passes its run logger's `info`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel

DVC_STAGES = ("validate", "prepare", "train", "evaluate")
# DVC's advice after each stage, noise in a flow's log.
DVC_HINTS = (
    "To track the changes with git",
    "git add dvc.lock",
    "To enable auto staging",
    "dvc config core.autostage",
    "Use `dvc push`",
)
# How many of a failed stage's last output lines its error quotes.
ERROR_LINES = 40

Log = Callable[[str], None]


class StageRun(BaseModel):
    stage: str
    ran: bool


class StageError(RuntimeError):
    """A DVC stage exited non-zero; the message carries the stage's own explanation."""


def stage_env() -> dict[str, str]:
    """The environment of a DVC command: its stages' `python` is this interpreter."""
    # Stage commands say `python`: make it this interpreter, whatever the caller's PATH.
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def _repro_lines(
    stage: str, root: Path, log: Log, preexec_fn: Callable[[], None] | None
) -> tuple[list[str], int]:
    """Run `dvc repro --single-item <stage>`; its output lines (hints left out) and exit code."""
    command = [sys.executable, "-m", "dvc", "repro", "--single-item", stage]
    process = subprocess.Popen(
        command,
        cwd=root,
        env=stage_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
        preexec_fn=preexec_fn,
    )
    lines: list[str] = []
    assert process.stdout is not None
    for raw in process.stdout:
        line = raw.rstrip()
        if line and not line.lstrip().startswith(DVC_HINTS):
            lines.append(line)
            log(line)
    return lines, process.wait()


def run_dvc_stage(
    stage: str, root: Path, log: Log, preexec_fn: Callable[[], None] | None = None
) -> StageRun:
    """`dvc repro --single-item <stage>`: runs the stage only if its deps or params changed.

    `preexec_fn` runs in the child before DVC starts (e.g. to die with its parent).

    Raises:
        StageError: the stage failed; the message quotes its own explanation.
    """
    lines, returncode = _repro_lines(stage, root, log, preexec_fn)
    if returncode != 0:
        details = [line for line in lines if not line.startswith(("Running stage", "> python"))]
        raise StageError(f"stage '{stage}' failed:\n" + "\n".join(details[-ERROR_LINES:]))
    ran = any(line.startswith(f"Running stage '{stage}'") for line in lines)
    log(f"stage {stage}: {'ran' if ran else 'up to date, skipped'}")
    return StageRun(stage=stage, ran=ran)


def dvc_up_to_date(root: Path, log: Log) -> bool:
    """`dvc status`: True when no stage would run (one DVC start instead of one per stage).

    Anything else (changes, or status failing) leaves the decision to each stage's repro.
    """
    completed = subprocess.run(
        [sys.executable, "-m", "dvc", "status", "--json"],
        cwd=root,
        env=stage_env(),
        capture_output=True,
        text=True,
    )
    try:
        status = json.loads(completed.stdout) if completed.returncode == 0 else None
    except ValueError:
        status = None
    if status == {}:
        log("dvc status: every stage is up to date")
        return True
    if isinstance(status, dict):
        log(f"dvc status: changed: {', '.join(status)}")
    return False
