"""An unreachable registry database or DVC remote stops the pipeline before any stage runs,
with an error that names it and shows no credential."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.remote import add_remote
from tests.flows.conftest import git, make_workspace
from tests.shared_state import S3_SECRET_KEY
from textgate.process import free_port

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_base_model) -> Path:
    return make_workspace(
        tmp_path_factory.mktemp("faults"),
        tiny_base_model,
        per_class=10,
        overrides={"train": {"epochs": 1}, "notify": {"block": None}},
    )


def run_flow(workspace: Path):
    from flows.pipeline import pipeline

    return pipeline(params_path="params.yaml", repo_dir=str(workspace), return_state=True)


def assert_nothing_ran(workspace: Path) -> None:
    for stage in ("validate", "prepare", "train"):
        assert not (workspace / "data" / stage).exists(), f"stage {stage} ran"


def test_an_unreachable_registry_database_stops_the_run_before_training(
    harness, workspace, monkeypatch, capfd
):
    url = f"postgresql://team:db-password-xyz@127.0.0.1:{free_port()}/registry"
    monkeypatch.setenv("TEXTGATE_REGISTRY", url)

    state = run_flow(workspace)

    assert state.is_failed()
    with pytest.raises(Exception, match="registry database .*127.0.0.1.* cannot be reached"):
        state.result()
    assert_nothing_ran(workspace)
    captured = capfd.readouterr()
    assert "db-password-xyz" not in captured.out + captured.err + str(state.message)


def test_an_unreachable_dvc_remote_stops_the_run_before_training(
    harness, workspace, s3_env, monkeypatch, capfd
):
    endpoint = f"http://127.0.0.1:{free_port()}"
    add_remote(workspace, "s3://team-bucket/data", endpoint)
    try:
        state = run_flow(workspace)
    finally:
        git(workspace, "checkout", "--", ".dvc/config")

    assert state.is_failed()
    with pytest.raises(Exception, match=f"DVC remote 'storage' .*{endpoint}.* cannot be reached"):
        state.result()
    assert_nothing_ran(workspace)
    captured = capfd.readouterr()
    assert S3_SECRET_KEY not in captured.out + captured.err
