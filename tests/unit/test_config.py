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
        ({"data": {"label_column": "text"}}, "text_column and label_column are both 'text'"),
        (
            {"validate": {"min_examples_per_class": 2}},
            "validate.min_examples_per_class=2 lets through classes that prepare cannot split: "
            "use at least 3",
        ),
        ({"serve": {"request_log_backups": 0}}, "serve.request_log_backups"),
        ({"serve": {"request_log_max_bytes": 1000}}, "serve.request_log_max_bytes"),
        (
            {"prepare": {"pii_phone_regions": ["CN", "uk"]}},
            "pii_phone_regions: unknown region code(s) ['uk']; use ISO 3166 codes in capitals",
        ),
        ({"prepare": {"chinese_script": "cantonese"}}, "prepare.chinese_script"),
        ({"validate": {"max_unknown_char_share": 1.5}}, "validate.max_unknown_char_share"),
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


def test_a_float_written_without_a_dot_is_a_float(tmp_path):
    # PyYAML (YAML 1.1) reads `2e-4` as the string "2e-4"; YAML 1.2, and so DVC, as a number.
    text = (REPO_ROOT / "params.yaml").read_text(encoding="utf-8")
    assert "learning_rate: 2.0e-4" in text
    path = tmp_path / "params.yaml"
    path.write_text(text.replace("learning_rate: 2.0e-4", "learning_rate: 2e-4"))
    path.write_text(path.read_text().replace("weight_decay: 0.01", "weight_decay: 1E-2"))
    params = load_params(path)
    assert params.train.learning_rate == 2e-4
    assert params.train.weight_decay == 0.01
    assert params.train.epochs == 3  # integers stay integers


def test_a_quoted_number_is_still_refused(tmp_path):
    path = tmp_path / "params.yaml"
    text = (REPO_ROOT / "params.yaml").read_text(encoding="utf-8")
    path.write_text(text.replace("learning_rate: 2.0e-4", "learning_rate: '2e-4'"))
    with pytest.raises(ConfigError, match="train.learning_rate: Input should be a valid number"):
        load_params(path)


def test_two_examples_per_class_are_enough_with_a_fixed_test_file():
    raw = merge(raw_params(), {"data": {"test_file": "test.csv"}})
    params = parse_params(merge(raw, {"validate": {"min_examples_per_class": 2}}))
    assert params.validate_.min_examples_per_class == 2
