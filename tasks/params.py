"""A run's parameters into the workspace's params.yaml, the file every DVC stage reads.

`dvc repro` reads params.yaml only, so a run on another file writes that file's values there
first (what `dvc exp run --set-param` does): every stage then runs with them, and dvc.lock
records which values produced each output. Nothing restores params.yaml afterwards, or
dvc.lock would disagree with it; `git diff params.yaml` shows what the run changed.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from textgate.config import load_params
from textgate.io import atomic_path

# The params file of a workspace: the one dvc.yaml's `params:` entries read.
PARAMS_FILE = "params.yaml"


def apply_params(source: Path, root: Path) -> bool:
    """Make `root`/params.yaml hold the parameters of `source` (which may lie anywhere).

    `source` is validated in full first, so a bad file changes nothing; then its text,
    comments included, replaces params.yaml atomically. Nothing is written when `source`
    is params.yaml itself or says the same.

    Returns:
        True if params.yaml changed.

    Raises:
        ConfigError: `source` is missing or not valid params.
    """
    load_params(source)
    target = root / PARAMS_FILE
    text = source.read_bytes()
    if target.is_file() and (source.resolve() == target.resolve() or target.read_bytes() == text):
        return False
    with atomic_path(target) as tmp:
        tmp.write_bytes(text)
        if target.is_file():
            shutil.copymode(target, tmp)
    return True
