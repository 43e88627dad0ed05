"""tasks/params.py: a run's params file written into the workspace's params.yaml."""

from __future__ import annotations

import pytest
import yaml

from tasks.params import apply_params
from tests.helpers import merge, raw_params
from textgate.config import load_params
from textgate.errors import ConfigError


@pytest.fixture
def workspace(tmp_path):
    root = tmp_path / "repo"
    root.mkdir()
    (root / "params.yaml").write_text(yaml.safe_dump(raw_params()))
    return root


def test_another_file_outside_the_repository_replaces_params_yaml(workspace, tmp_path):
    other = tmp_path / "other.yaml"
    one_epoch = merge(raw_params(), {"train": {"epochs": 1}})
    other.write_text("# one epoch\n" + yaml.safe_dump(one_epoch))

    assert apply_params(other, workspace)

    assert (workspace / "params.yaml").read_text() == other.read_text()  # comments kept
    assert load_params(workspace / "params.yaml").train.epochs == 1


def test_an_invalid_file_leaves_params_yaml_untouched(workspace, tmp_path):
    before = (workspace / "params.yaml").read_bytes()
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump(merge(raw_params(), {"train": {"epochs": "one"}})))

    with pytest.raises(ConfigError, match="train.epochs"):
        apply_params(other, workspace)

    assert (workspace / "params.yaml").read_bytes() == before
    assert [path.name for path in workspace.iterdir()] == ["params.yaml"]  # no temp file left


def test_params_yaml_itself_is_not_rewritten(workspace):
    path = workspace / "params.yaml"
    mtime = path.stat().st_mtime_ns

    assert not apply_params(path, workspace)
    assert path.stat().st_mtime_ns == mtime
