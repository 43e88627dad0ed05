"""What dvc.lock hashes must be reproducible: rerunning a stage on the same inputs gives the
same bytes, or a fresh clone's first `make run` rewrites dvc.lock and leaves the tree dirty."""

from __future__ import annotations

import hashlib
from pathlib import Path

import yaml

from tasks import validate
from tests.conftest import REPO_ROOT, make_rows, write_csv
from tests.helpers import MUST_PASS_ROWS, make_params


def _declared_outputs(stage: str, output_dir: Path) -> list[Path]:
    """The stage's outs, metrics and plots in dvc.yaml, under `output_dir`."""
    spec = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"][stage]
    entries = [e for key in ("outs", "metrics", "plots") for e in spec.get(key, [])]
    names = [next(iter(entry)) if isinstance(entry, dict) else entry for entry in entries]
    prefix = f"${{{stage}.output_dir}}/"
    assert all(name.startswith(prefix) for name in names), names
    return [output_dir / name.removeprefix(prefix) for name in names]


def _digest(path: Path) -> str:
    digest = hashlib.md5()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        digest.update(str(file.relative_to(path.parent)).encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


def test_the_validate_stage_outputs_dvc_hashes_are_the_same_on_a_rerun(tmp_path):
    write_csv(tmp_path / "raw" / "train.csv", make_rows(per_class=4))
    write_csv(tmp_path / "must_pass.csv", MUST_PASS_ROWS)
    params = make_params(
        {
            "data": {"raw_dir": str(tmp_path / "raw"), "train_file": "train.csv"},
            "validate": {"output_dir": str(tmp_path / "validate"), "min_examples_per_class": 3},
            "evaluate": {"must_pass_file": str(tmp_path / "must_pass.csv")},
        }
    )
    outputs = _declared_outputs("validate", tmp_path / "validate")

    validate.run(params)
    first = {path: _digest(path) for path in outputs}
    validate.run(params)

    assert {path: _digest(path) for path in outputs} == first
