"""Helpers shared by tests: params built from the real params.yaml with overrides.

`merge` and `copy_project` come from bench/workspace.py, which the benchmarks share.
"""

from __future__ import annotations

import ast
from collections.abc import Collection
from pathlib import Path
from typing import Any

import yaml

from bench.workspace import copy_project, merge
from textgate.config import Params, parse_params

__all__ = [
    "MUST_PASS_ROWS",
    "REPO_ROOT",
    "copy_project",
    "first_party_closure",
    "first_party_imports",
    "make_params",
    "merge",
    "raw_params",
    "tiny_overrides",
]

REPO_ROOT = Path(__file__).resolve().parents[1]


def raw_params() -> dict[str, Any]:
    return yaml.safe_load((REPO_ROOT / "params.yaml").read_text(encoding="utf-8"))


def tiny_overrides(work: Path, base_model: Path) -> dict[str, Any]:
    """Paths under `work`, a tiny model and settings that train in seconds."""
    return {
        "data": {"raw_dir": str(work / "raw"), "train_file": "train.csv"},
        "validate": {"output_dir": str(work / "validate"), "min_examples_per_class": 5},
        "prepare": {"output_dir": str(work / "prepare"), "val_fraction": 0.2, "test_fraction": 0.2},
        "train": {
            "output_dir": str(work / "train"),
            "base_model": str(base_model),
            "epochs": 2,
            "batch_size": 8,
            "max_length": 32,
            "learning_rate": 1.0e-3,
            "checkpoint_dir": str(work / "checkpoints"),
        },
        "evaluate": {
            "output_dir": str(work / "evaluate"),
            "must_pass_file": str(work / "must_pass.csv"),
            "golden_requests": 10,
        },
        "registry": {"path": str(work / "registry.json")},
    }


# Cases the tiny model learns (tests.conftest.INTENT_WORDS); a must-pass file needs rows.
MUST_PASS_ROWS = [("hello stolen card thanks", "lost_card"), ("hi refund today", "refund")]


def make_params(overrides: dict[str, Any]) -> Params:
    return parse_params(merge(raw_params(), overrides))


def module_file(name: str) -> Path | None:
    """The repository file of module `name` (`a.b` -> a/b.py or a/b/__init__.py), if any."""
    base = REPO_ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imported_names(node: ast.AST, path: Path) -> list[str]:
    """Dotted names an import statement may load: `from a import b` may load `a` or `a.b`."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    module = node.module or ""
    if node.level:  # relative: resolved against the importing file's package
        package = path.parent.relative_to(REPO_ROOT).parts
        package = package[: len(package) - (node.level - 1)]
        module = ".".join([*package, module] if module else package)
    return [module, *(f"{module}.{alias.name}" for alias in node.names)]


def first_party_imports(path: Path, packages: Collection[str]) -> set[Path]:
    """The files of `packages` that a Python file imports, at module or function level."""
    found: set[Path] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        for name in _imported_names(node, path):
            if name.split(".")[0] in packages and (file := module_file(name)):
                found.add(file)
    return found


def first_party_closure(path: Path, packages: Collection[str]) -> set[Path]:
    """`path` and every file of `packages` it imports, directly or through another."""
    seen: set[Path] = set()
    todo = [path]
    while todo:
        current = todo.pop()
        if current not in seen:
            seen.add(current)
            todo += first_party_imports(current, packages)
    return seen
