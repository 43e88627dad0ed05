"""Fixtures and helpers shared by the flow tests."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from bench.workspace import LENIENT_GATE, PROJECT_FILES
from tests.conftest import make_rows, write_csv
from tests.helpers import MUST_PASS_ROWS, copy_project, merge


@pytest.fixture(scope="module")
def harness():
    """A temporary Prefect server and database for one test module (`prefect_test_harness`)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def git(workspace: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=workspace, check=True, capture_output=True)


def set_params(workspace: Path, overrides: dict[str, Any]) -> None:
    """Merge `overrides` into the workspace's params.yaml."""
    path = workspace / "params.yaml"
    path.write_text(yaml.safe_dump(merge(yaml.safe_load(path.read_text()), overrides)))


def make_workspace(
    root: Path, base_model: Path, *, per_class: int, overrides: dict[str, Any]
) -> Path:
    """A git + DVC copy of the project in `root`: the sample's rows replaced by `per_class`
    synthetic rows a label, the tiny `base_model`, a lenient gate, then `overrides`."""
    copy_project(root, PROJECT_FILES)
    write_csv(root / "data" / "raw" / "train.csv", make_rows(per_class=per_class))
    write_csv(root / "data" / "must_pass.csv", MUST_PASS_ROWS)
    common = {
        "data": {"train_file": "train.csv"},
        "validate": {"min_examples_per_class": 5},
        "prepare": {"val_fraction": 0.2, "test_fraction": 0.2},
        "train": {"base_model": str(base_model), "batch_size": 8, "max_length": 32},
        "gate": LENIENT_GATE,
    }
    set_params(root, merge(common, overrides))
    git(root, "init", "-q")
    git(root, "-c", "user.email=t@example.com", "-c", "user.name=t", "add", "-A")
    git(root, "-c", "user.email=t@example.com", "-c", "user.name=t", "commit", "-qm", "init")
    return root
