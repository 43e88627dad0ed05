"""dvc.yaml lists, for each stage, every first-party module its `python -m tasks.<x>` runs.

DVC re-runs a stage only when one of its deps changes: a module the stage imports but does not
list (directly or through another module, at module or function level) is a change that leaves
a stale output. A module the stage no longer imports is a dep that re-runs it for nothing.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

from tests.helpers import REPO_ROOT, first_party_closure

FIRST_PARTY = {"textgate", "tasks"}
STAGE_COMMAND = re.compile(r"python -m (tasks\.\w+)(\s|$)")

DVC = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text(encoding="utf-8"))
TASK_STAGES = {
    name: match.group(1)
    for name, stage in DVC["stages"].items()
    if (match := STAGE_COMMAND.match(stage["cmd"].strip()))
}


def imported_code(module: str) -> set[str]:
    """The repository files the stage's module runs, package `__init__`s left out.

    The `__init__`s hold a docstring and `__version__` only: a version bump must not retrain.
    """
    start = REPO_ROOT / (module.replace(".", "/") + ".py")
    return {
        path.relative_to(REPO_ROOT).as_posix()
        for path in first_party_closure(start, FIRST_PARTY)
        if path.name != "__init__.py"
    }


def listed_code(stage: str) -> set[str]:
    deps = {str(dep) for dep in DVC["stages"][stage].get("deps", [])}
    return {dep for dep in deps if Path(dep).suffix == ".py"}


def test_the_pipeline_stages_are_recognised_as_task_modules():
    # Else a changed `cmd` would leave the stage out of the checks below, silently.
    assert {"validate", "prepare", "train", "evaluate"} <= set(TASK_STAGES)


@pytest.mark.parametrize("stage", sorted(TASK_STAGES))
def test_stage_deps_list_every_module_it_imports(stage):
    missing = sorted(imported_code(TASK_STAGES[stage]) - listed_code(stage))
    assert not missing, f"dvc.yaml stage {stage!r} imports but does not list in deps: {missing}"


@pytest.mark.parametrize("stage", sorted(TASK_STAGES))
def test_stage_deps_list_no_module_it_does_not_import(stage):
    stale = sorted(listed_code(stage) - imported_code(TASK_STAGES[stage]))
    assert not stale, f"dvc.yaml stage {stage!r} lists code it does not import: {stale}"


def test_package_inits_hold_only_a_docstring_and_constants():
    """Why the `__init__.py` files may stay out of deps: they hold no code a stage runs."""
    for package in sorted(FIRST_PARTY):
        tree = ast.parse((REPO_ROOT / package / "__init__.py").read_text(encoding="utf-8"))
        for node in tree.body:
            constant = isinstance(node, ast.Expr | ast.Assign) and isinstance(
                node.value, ast.Constant
            )
            assert constant, f"{package}/__init__.py line {node.lineno}: code stages would run"
