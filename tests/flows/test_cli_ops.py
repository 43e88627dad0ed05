"""The operations commands' early errors, without any Prefect server (none is started)."""

from __future__ import annotations

import pytest
import yaml

from flows.cli import main
from tests.helpers import raw_params


@pytest.mark.parametrize("command", ["deploy", "worker", "notify-setup"])
def test_commands_that_need_a_server_say_so(tmp_path, capsys, monkeypatch, command):
    monkeypatch.setenv("PREFECT_API_URL", "")
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw_params()))
    argv = [command, "--params", str(path)]
    if command == "notify-setup":
        argv += ["--url", "http://127.0.0.1:9/hook"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"`textgate {command}` needs a Prefect server: start one with `make ui`" in err


def test_notify_setup_rejects_a_url_that_is_not_http(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["notify-setup", "--url", "ftp://example.com/x", "--params", str(tmp_path / "p.yaml")])
    assert "expected an http(s) URL" in capsys.readouterr().err
