"""The `textgate` command line: status, serve and run's early errors (no flow is started)."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
import yaml

from flows.cli import main
from tests.helpers import raw_params
from textgate.registry import Registry, Release


@pytest.fixture
def params_file(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw_params()))
    return path


def promote(params_file, bento: str, accuracy: float, when: int) -> None:
    Registry(params_file.parent / ".textgate" / "registry.json").promote(
        Release.create(
            bento_tag=bento,
            model_tag=f"textgate-classifier:{bento[-1]}",
            reason="passed the gate",
            metrics={"accuracy": accuracy, "macro_f1": accuracy - 0.01, "n_test": 90},
            lineage={"git_commit": "abc123", "git_dirty": False, "data_md5": "d41d8.dir"},
            now=datetime(2026, 11, when, tzinfo=UTC),
            actor="ci@host",
        )
    )


def test_status_without_production(params_file, capsys):
    assert main(["status", "--params", str(params_file)]) == 0
    assert "no production model yet" in capsys.readouterr().out


def test_status_shows_production_metrics_lineage_and_history(params_file, capsys):
    promote(params_file, "textgate:a", 0.91, 1)
    promote(params_file, "textgate:b", 0.93, 2)
    assert main(["status", "--params", str(params_file)]) == 0
    out = capsys.readouterr().out
    assert "production bento: textgate:b" in out
    assert "accuracy 0.9300" in out and "n_test 90" in out
    assert "git commit:       abc123" in out
    assert "history (2 release(s), newest first)" in out
    assert out.index("textgate:b  passed") < out.index("textgate:a  passed")

    assert main(["status", "--json", "--params", str(params_file)]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["production"]["bento_tag"] == "textgate:b"
    assert [r["bento_tag"] for r in payload["history"]] == ["textgate:a", "textgate:b"]


def test_status_reports_a_corrupt_registry(params_file, capsys):
    registry = params_file.parent / ".textgate" / "registry.json"
    registry.parent.mkdir()
    registry.write_text("{not json")
    assert main(["status", "--params", str(params_file)]) == 2
    err = capsys.readouterr().err
    assert "textgate: error:" in err and "registry.json" in err
    assert registry.read_text() == "{not json"


def test_serve_without_production_is_a_clear_error(params_file, capsys):
    assert main(["serve", "--params", str(params_file)]) == 2
    assert "no production model to serve: run `textgate run` first" in capsys.readouterr().err


def test_serve_passes_the_port_and_the_request_log_rotation_from_params(params_file, monkeypatch):
    params = raw_params()
    params["serve"].update(request_log_max_bytes=2_000_000, request_log_backups=3)
    params_file.write_text(yaml.safe_dump(params))
    promote(params_file, "textgate:a", 0.91, 1)
    started = {}

    def run(self, on_ready=print):
        started.update(options=self.options)

    monkeypatch.setattr("flows.serving.Supervisor.run", run)
    assert main(["serve", "--params", str(params_file)]) == 0
    options = started["options"]
    assert (options.host, options.port) == ("127.0.0.1", params["serve"]["port"])
    assert options.poll_s == params["serve"]["follow_poll_s"]
    assert options.env["TEXTGATE_REQUEST_LOG_MAX_BYTES"] == "2000000"
    assert options.env["TEXTGATE_REQUEST_LOG_BACKUPS"] == "3"


def test_serve_with_a_blank_api_key_is_a_clear_error_before_bentoml(
    params_file, monkeypatch, capsys
):
    promote(params_file, "textgate:a", 0.91, 1)
    monkeypatch.setenv("TEXTGATE_API_KEY", "   ")
    monkeypatch.setattr("flows.serving.Supervisor.run", lambda *a: pytest.fail("it was served"))
    assert main(["serve", "--params", str(params_file)]) == 2
    assert "TEXTGATE_API_KEY is set but blank" in capsys.readouterr().err


def test_run_rejects_bad_params_before_starting_prefect(tmp_path, capsys):
    bad = tmp_path / "params.yaml"
    params = raw_params()
    params["train"]["epochs"] = "many"
    bad.write_text(yaml.safe_dump(params))
    assert main(["run", "--params", str(bad)]) == 2
    assert "train.epochs: Input should be a valid integer" in capsys.readouterr().err
    assert main(["run", "--params", str(tmp_path / "missing.yaml")]) == 2
    assert "params file not found" in capsys.readouterr().err


def test_run_with_approval_but_no_prefect_server_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    path = tmp_path / "params.yaml"
    params = raw_params()
    params["gate"]["require_approval"] = True
    path.write_text(yaml.safe_dump(params))
    assert main(["run", "--params", str(path)]) == 2
    assert "gate.require_approval is true, which needs a Prefect server" in capsys.readouterr().err


def test_run_with_an_invalid_other_params_file_leaves_params_yaml_untouched(
    params_file, tmp_path_factory, capsys, monkeypatch
):
    (params_file.parent / "dvc.yaml").write_text("stages: {}\n")
    before = params_file.read_bytes()
    other = tmp_path_factory.mktemp("elsewhere") / "other.yaml"
    params = raw_params()
    params["train"]["epochs"] = "one"
    other.write_text(yaml.safe_dump(params))
    monkeypatch.chdir(params_file.parent)

    assert main(["run", "--params", str(other)]) == 2

    assert "train.epochs: Input should be a valid integer" in capsys.readouterr().err
    assert params_file.read_bytes() == before


def test_run_with_a_params_file_outside_any_workspace_says_where_to_run(
    params_file, tmp_path_factory, capsys, monkeypatch
):
    other = tmp_path_factory.mktemp("elsewhere") / "other.yaml"
    other.write_text(params_file.read_text())
    monkeypatch.chdir(other.parent)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)

    assert main(["run", "--params", str(other)]) == 2

    assert "no dvc.yaml next to" in capsys.readouterr().err
