"""Helpers shared by tests: params built from the real params.yaml with overrides.

`merge` and `copy_project` come from bench/workspace.py, which the benchmarks share.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from bench.workspace import copy_project, merge
from textgate.config import Params, parse_params

__all__ = [
    "MUST_PASS_ROWS",
    "REPO_ROOT",
    "copy_project",
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
