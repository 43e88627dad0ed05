"""The whole flow under prefect_test_harness, in a temporary git + DVC copy of the project.

The tests in this module run in order and share one workspace: a first run that trains and
promotes, an unchanged rerun, a real `bentoml serve` of the promoted bento, a failed gate,
and a validation failure.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import make_rows, write_csv
from tests.helpers import REPO_ROOT, merge
from tests.serving import bentoml_serve
from textgate.registry import Registry

pytestmark = pytest.mark.slow

COPIED = [
    "dvc.yaml",
    "params.yaml",
    ".dvcignore",
    ".gitignore",
    ".dvc/config",
    ".dvc/.gitignore",
    "tasks",
    "textgate",
    "flows",
    "bentos",
]


def _git(workspace: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=workspace, check=True, capture_output=True)


def _set_params(workspace: Path, overrides: dict) -> None:
    path = workspace / "params.yaml"
    path.write_text(yaml.safe_dump(merge(yaml.safe_load(path.read_text()), overrides)))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_base_model) -> Path:
    root = tmp_path_factory.mktemp("workspace")
    for name in COPIED:
        source = REPO_ROOT / name
        target = root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, target)
    write_csv(root / "data" / "raw" / "train.csv", make_rows(per_class=15))
    _set_params(
        root,
        {
            "data": {"train_file": "train.csv"},
            "validate": {"min_examples_per_class": 5},
            "prepare": {"val_fraction": 0.2, "test_fraction": 0.2},
            "train": {
                "base_model": str(tiny_base_model),
                "epochs": 2,
                "batch_size": 8,
                "max_length": 32,
                "learning_rate": 1.0e-3,
            },
            "gate": {"min_accuracy": 0.0, "min_macro_f1": 0.0},
        },
    )
    _git(root, "init", "-q")
    _git(root, "-c", "user.email=t@example.com", "-c", "user.name=t", "add", "-A")
    _git(root, "-c", "user.email=t@example.com", "-c", "user.name=t", "commit", "-qm", "init")
    return root


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def run_flow(workspace: Path):
    from flows.pipeline import pipeline

    return pipeline(params_path="params.yaml", repo_dir=str(workspace), return_state=True)


def registry(workspace: Path) -> Registry:
    return Registry(workspace / ".textgate" / "registry.json")


def test_first_run_trains_gates_packages_and_promotes(harness, workspace):
    state = run_flow(workspace)
    assert state.is_completed(), state.message
    summary = state.result()
    assert summary["stages_ran"] == ["validate", "prepare", "train", "evaluate"]
    assert summary["promoted"] is True
    production = registry(workspace).production()
    assert production is not None and production.bento_tag == summary["bento_tag"]
    assert production.lineage["data_md5"] and production.lineage["model_md5"]
    assert production.lineage["git_commit"]
    assert "accuracy" in production.metrics

    import bentoml

    bento = bentoml.bentos.get(production.bento_tag)
    assert production.model_tag in [str(model.tag) for model in bento.info.all_models]
    model = bentoml.models.get(production.model_tag)
    assert model.info.metadata["lineage"]["model_md5"] == production.lineage["model_md5"]

    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        keys = {artifact.key for artifact in client.read_artifacts()}
    assert {"validation-summary", "pipeline-stages", "test-metrics", "gate-verdict"} <= keys


def test_unchanged_rerun_retrains_nothing(harness, workspace):
    model_file = workspace / "data" / "train" / "model" / "model.safetensors"
    before = model_file.stat().st_mtime_ns
    releases = len(registry(workspace).history())
    state = run_flow(workspace)
    assert state.is_completed(), state.message
    summary = state.result()
    assert summary["stages_ran"] == []
    assert summary["stages_skipped"] == ["validate", "prepare", "train", "evaluate"]
    assert summary["promoted"] is False
    assert model_file.stat().st_mtime_ns == before
    assert len(registry(workspace).history()) == releases


def test_promoted_bento_answers_over_http(harness, workspace, tmp_path):
    production = registry(workspace).production()
    with bentoml_serve(production.bento_tag, tmp_path) as url:
        response = httpx.post(
            f"{url}/classify", json={"texts": ["my card was stolen", "refund please"]}, timeout=30
        )
    assert response.status_code == 200, response.text
    answers = response.json()
    assert len(answers) == 2
    for answer in answers:
        assert answer["label"] in {"lost_card", "login", "refund"}
        assert 0.0 <= answer["score"] <= 1.0


def test_failed_gate_leaves_production_untouched(harness, workspace):
    registry_file = workspace / ".textgate" / "registry.json"
    before = registry_file.read_bytes()
    accuracy = registry(workspace).production().metrics["accuracy"]
    assert accuracy < 1.0, "precondition: the tiny model is not perfect, so a floor of 1 fails"
    _set_params(workspace, {"gate": {"min_accuracy": 1.0}})
    state = run_flow(workspace)
    assert state.is_failed()
    assert "gate FAILED (1 check(s))" in state.message
    assert f"accuracy {accuracy:.4f} < floor 1.0000" in state.message
    assert registry_file.read_bytes() == before
    _set_params(workspace, {"gate": {"min_accuracy": 0.0}})


def test_validation_failure_stops_the_flow_before_training(harness, workspace):
    registry_file = workspace / ".textgate" / "registry.json"
    before = registry_file.read_bytes()
    model_file = workspace / "data" / "train" / "model" / "model.safetensors"
    model_before = model_file.stat().st_mtime_ns
    rows = make_rows(per_class=15) + [("a lonely message about shipping", "shipping")]
    write_csv(workspace / "data" / "raw" / "train.csv", rows)
    state = run_flow(workspace)
    assert state.is_failed()
    assert "stage 'validate' failed" in state.message
    assert "min_examples_per_class" in state.message
    assert "shipping" in state.message
    assert model_file.stat().st_mtime_ns == model_before
    assert registry_file.read_bytes() == before


def test_bad_params_fail_with_a_clear_message(harness, workspace):
    _set_params(workspace, {"train": {"epochs": "three"}})
    state = run_flow(workspace)
    assert state.is_failed()
    with pytest.raises(Exception, match="train.epochs: Input should be a valid integer"):
        state.result()
