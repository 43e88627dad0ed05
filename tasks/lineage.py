"""Lineage of a trained model: the git commit, DVC's hashes of data and model, and params."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import yaml

from textgate.artifacts import train_outputs
from textgate.config import Params


def _git(root: Path, *args: str) -> str | None:
    try:
        completed = subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return completed.stdout.strip()


def _hash_of(entries: list[dict[str, Any]], path: Path) -> str | None:
    for entry in entries or []:
        if Path(entry.get("path", "")) == path:
            return entry.get("md5") or entry.get("hash")
    return None


def collect_lineage(root: Path, params: Params) -> dict[str, Any]:
    """Where a model came from, read from git and dvc.lock (no DVC import needed)."""
    lock_path = root / "dvc.lock"
    lock = yaml.safe_load(lock_path.read_text(encoding="utf-8")) if lock_path.is_file() else {}
    stages = (lock or {}).get("stages", {})
    status = _git(root, "status", "--porcelain", "--untracked-files=no")
    return {
        "git_commit": _git(root, "rev-parse", "HEAD"),
        "git_dirty": bool(status) if status is not None else None,
        "data_md5": _hash_of(stages.get("validate", {}).get("deps"), params.data.raw_dir),
        "model_md5": _hash_of(stages.get("train", {}).get("outs"), train_outputs(params).model_dir),
        "params": params.model_dump(mode="json", by_alias=True),
    }
