"""`textgate run --params FILE` with a file outside the repository: every DVC stage runs with
that file's values, and dvc.lock records them (real `dvc repro` in a temporary git + DVC copy).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.flows.conftest import make_workspace
from tests.helpers import merge

pytestmark = pytest.mark.slow

RUN_TIMEOUT_S = 900


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_base_model) -> Path:
    return make_workspace(
        tmp_path_factory.mktemp("params-file-workspace"),
        tiny_base_model,
        per_class=20,
        overrides={
            "train": {"epochs": 1, "quantize": "off"},
            "evaluate": {"golden_requests": 5, "behaviour_examples": 20},
            # Nothing in production and no_champion: fail: the gate stops each run before
            # packaging, which this test is not about.
            "gate": {"no_champion": "fail"},
            "notify": {"block": None},
        },
    )


def textgate_run(workspace: Path, params: Path | str) -> str:
    """`textgate run --params PARAMS` in the workspace (temporary server); its output."""
    env = {**os.environ, "PREFECT_HOME": str(workspace / ".prefect-home")}
    env.pop("PREFECT_API_URL", None)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    completed = subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", "--params", str(params)],
        cwd=workspace,
        env=env,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )
    return completed.stdout + completed.stderr


def locked_train_params(workspace: Path) -> dict:
    lock = yaml.safe_load((workspace / "dvc.lock").read_text())
    return lock["stages"]["train"]["params"]["params.yaml"]["train"]


def test_a_params_file_outside_the_repository_is_what_every_stage_runs_with(
    workspace, tmp_path_factory
):
    first = textgate_run(workspace, "params.yaml")
    assert "Running stage 'train'" in first, first[-4000:]
    assert locked_train_params(workspace)["epochs"] == 1

    other = tmp_path_factory.mktemp("elsewhere") / "two-epochs.yaml"
    declared = yaml.safe_load((workspace / "params.yaml").read_text())
    other.write_text(yaml.safe_dump(merge(declared, {"train": {"epochs": 2}})))
    second = textgate_run(workspace, other)

    assert "every stage is up to date" not in second
    assert "Running stage 'train'" in second, second[-4000:]
    assert locked_train_params(workspace)["epochs"] == 2
    assert (workspace / "params.yaml").read_text() == other.read_text()
    assert "params.yaml now holds this run's parameters" in second
