"""The no-op benchmark's figures, verdict and JSON last line, on scripted command timings
(no workspace is built, nothing runs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import noop

FLOW_OUTPUT = "stages ran: none; up to date: [...]\npipeline Completed: unchanged"


@pytest.fixture
def scripted(monkeypatch, tmp_path):
    """`timed` answers from a script: (seconds, output, code) per command kind, in turn."""
    answers: dict[str, list[tuple[float, str, int]]] = {"flow": [], "dvc": []}

    def fake_timed(command, cwd, env):
        kind = "flow" if "flows.cli" in command else "dvc"
        if "status" in command:
            return 0.5, "Data and pipelines are up to date.", 0
        return answers[kind].pop(0)

    monkeypatch.setattr(noop, "timed", fake_timed)
    (tmp_path / "params.yaml").write_text("{}")
    return answers, tmp_path


def run(capsys, workspace: Path, repeats: int) -> tuple[int, list[str], dict]:
    code = noop.main(["--workspace", str(workspace), "--repeats", str(repeats)])
    lines = capsys.readouterr().out.strip().splitlines()
    return code, lines, json.loads(lines[-1])


def test_medians_overhead_and_pass(scripted, capsys):
    answers, workspace = scripted
    answers["flow"] += [(7.0, FLOW_OUTPUT, 0), (6.0, FLOW_OUTPUT, 0), (9.0, FLOW_OUTPUT, 0)]
    answers["dvc"] += [(1.0, "", 0), (1.5, "", 0), (1.2, "", 0)]
    code, lines, report = run(capsys, workspace, 3)
    assert code == 0
    assert report["flow_s"] == 7.0 and report["dvc_repro_s"] == 1.2
    assert report["overhead_s"] == pytest.approx(5.8)
    assert report["target"] == {"overhead_s": 5.8, "threshold_s": 10.0, "passed": True}
    assert report["prefect_server"] == "temporary per run"
    assert "target: overhead <= 10 s: PASS" in lines


def test_overhead_over_the_target_fails(scripted, capsys):
    answers, workspace = scripted
    answers["flow"].append((14.0, FLOW_OUTPUT, 0))
    answers["dvc"].append((1.0, "", 0))
    code, lines, report = run(capsys, workspace, 1)
    assert code == 1 and not report["passed"]
    assert "target: overhead <= 10 s: FAIL" in lines


def test_a_rerun_that_retrains_is_refused(scripted, capsys):
    answers, workspace = scripted
    answers["flow"].append((60.0, "stages ran: ['train']", 0))
    answers["dvc"].append((1.0, "", 0))
    with pytest.raises(SystemExit, match="the flow rerun was not a no-op"):
        noop.main(["--workspace", str(workspace), "--repeats", "1"])
