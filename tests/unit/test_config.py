from pathlib import Path

import pytest
import yaml

from tests.helpers import REPO_ROOT, merge, raw_params
from textgate.config import load_params, parse_params, resolve_paths
from textgate.errors import ConfigError


def test_repository_params_are_valid():
    params = load_params(REPO_ROOT / "params.yaml")
    assert params.data.train_path == Path("data/raw/support_messages.csv")
    assert params.validate_.output_dir == Path("data/validate")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"train": {"epochs": "3"}}, "train.epochs: Input should be a valid integer"),
        ({"train": {"learning_rate": "fast"}}, "train.learning_rate"),
        ({"gate": {"min_acuracy": 0.9}}, "gate.min_acuracy: unknown key"),
        ({"surprise": {}}, "surprise: unknown key"),
        ({"train": {"device": "tpu"}}, "train.device"),
        ({"gate": {"min_accuracy": 1.5}}, "gate.min_accuracy"),
        ({"validate": {"min_text_chars": 50, "max_text_chars": 10}}, "min_text_chars"),
        ({"prepare": {"val_fraction": 0.5, "test_fraction": 0.45}}, "val_fraction"),
        ({"serve": {"request_log_backups": 0}}, "serve.request_log_backups"),
        ({"serve": {"request_log_max_bytes": 1000}}, "serve.request_log_max_bytes"),
    ],
)
def test_bad_params_name_the_key_at_fault(overrides, message):
    with pytest.raises(ConfigError, match="params.yaml is invalid") as error:
        parse_params(merge(raw_params(), overrides))
    assert message in str(error.value)


def test_missing_section_is_named():
    raw = raw_params()
    del raw["gate"]
    with pytest.raises(ConfigError, match="gate: required key is missing"):
        parse_params(raw)


def test_missing_or_malformed_file(tmp_path):
    with pytest.raises(ConfigError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "params.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_params(bad)


def test_params_are_frozen_and_paths_resolve(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw_params()))
    params = load_params(path)
    with pytest.raises(ValueError):
        params.train.epochs = 1
    resolved = resolve_paths(params, tmp_path)
    assert resolved.registry.path == tmp_path / ".textgate/registry.json"
    assert resolved.train.base_model == params.train.base_model
