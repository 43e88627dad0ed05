"""Fixtures shared by the stage tests: tiny raw data for prepare/train/evaluate, packaged bentos."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import make_rows, write_csv
from tests.helpers import MUST_PASS_ROWS, REPO_ROOT, make_params, tiny_overrides
from textgate.config import Params, load_params

METRICS = {"accuracy": 0.91, "macro_f1": 0.9}
LINEAGE = {"data": "md5:0123", "commit": "abc123", "run": "test"}


@pytest.fixture
def params(tmp_path, tiny_base_model):
    rows = make_rows(per_class=15)
    rows.append(("mail me at jane.doe@example.com about my refund", "refund"))
    rows.append(rows[0])  # an exact duplicate
    write_csv(tmp_path / "raw" / "train.csv", rows)
    write_csv(tmp_path / "must_pass.csv", MUST_PASS_ROWS)
    params = make_params(tiny_overrides(tmp_path, tiny_base_model))
    params.validate_.output_dir.mkdir(parents=True)
    labels = sorted({label for _, label in rows})
    (params.validate_.output_dir / "report.json").write_text(json.dumps({"labels": labels}))
    return params


@pytest.fixture(scope="module")
def registry_params(tmp_path_factory: pytest.TempPathFactory) -> Params:
    """The project's params with a registry of the module's own (package and promote tests)."""
    base = load_params(REPO_ROOT / "params.yaml")
    registry = tmp_path_factory.mktemp("registry") / "registry.json"
    return base.model_copy(update={"registry": base.registry.model_copy(update={"path": registry})})


@pytest.fixture(scope="module")
def packaged_twice(bentoml_home: Path, tiny_model_dir: Path, registry_params: Params):
    from tasks.package import package_model

    params = registry_params
    first = package_model(tiny_model_dir, params=params, metrics=METRICS, lineage=LINEAGE)
    # JSON nulls are common in metrics and lineage; BentoML metadata cannot hold them.
    second = package_model(
        tiny_model_dir,
        params=params,
        metrics={"accuracy": 0.95, "loss": None},
        lineage={"run": "second", "test_file": None},
    )
    return first, second
