"""Pipeline runs in one workspace take turns: they never collide on DVC's lock.

Real `textgate run` processes on a temporary git + DVC workspace: two started together against
a Prefect server queue on the global concurrency limit (the second waits, then finds
everything up to date); without a server, a run waits on the workspace file lock while
another process holds it, and gives up with a clear message after `deploy.lock_timeout_s`.
On the same workspace, a failed gate sends its alert to a webhook on loopback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
import yaml

from flows.lock import LOCK_FILE, file_lock
from tests.flows.conftest import make_workspace, set_params
from tests.serving import local_http_server
from textgate.registry import Registry

pytestmark = pytest.mark.slow

RUN_TIMEOUT_S = 900


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_base_model) -> Path:
    return make_workspace(
        tmp_path_factory.mktemp("concurrency-workspace"),
        tiny_base_model,
        per_class=20,
        overrides={
            "train": {"epochs": 2, "learning_rate": 1.0e-3},
            "evaluate": {"golden_requests": 5, "behaviour_examples": 20},
            "notify": {"block": None},
        },
    )


def start_run(workspace: Path, log: Path, api_url: str | None) -> subprocess.Popen:
    """`textgate run` in its own process, as a user or a worker starts it.

    Without `api_url` it starts its own temporary server, on a database in the workspace.
    """
    env = {**os.environ, "PREFECT_API_URL": api_url or ""}
    env["PREFECT_HOME"] = str(workspace / ".prefect-home")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    command = [sys.executable, "-m", "flows.cli", "run", "--params", "params.yaml"]
    with log.open("w") as out:
        return subprocess.Popen(command, cwd=workspace, env=env, stdout=out, stderr=out)


def wait_for_holder(workspace: Path, pid: int, timeout_s: float = 300) -> None:
    """Until the process `pid` holds the workspace lock (it writes itself into the file)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if json.loads((workspace / LOCK_FILE).read_text())["pid"] == pid:
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.2)
    pytest.fail(f"process {pid} never took the workspace lock")


def finish(process: subprocess.Popen, log: Path) -> str:
    try:
        process.wait(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail(f"run did not finish:\n{log.read_text()[-4000:]}")
    return log.read_text()


def dvc_status(workspace: Path) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(
        [sys.executable, "-m", "dvc", "status"],
        cwd=workspace,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def test_two_runs_with_a_server_queue_and_end_consistently(harness, workspace, tmp_path):
    from prefect.settings import PREFECT_API_URL

    api_url = PREFECT_API_URL.value()
    first_log, second_log = tmp_path / "first.log", tmp_path / "second.log"
    first = start_run(workspace, first_log, api_url)
    wait_for_holder(workspace, first.pid)
    second = start_run(workspace, second_log, api_url)
    first_out = finish(first, first_log)
    second_out = finish(second, second_log)

    assert first.returncode == 0, first_out[-4000:]
    assert second.returncode == 0, second_out[-4000:]
    assert "Running stage 'train'" in first_out
    assert "pipeline Completed: promoted textgate:" in first_out
    # The second waited for the first, then found nothing to do: no DVC lock error, no retrain.
    assert "waiting for a slot of concurrency limit 'textgate-pipeline'" in second_out
    assert "stages ran: none" in second_out
    assert "unchanged:" in second_out and "stays in production" in second_out
    for out in (first_out, second_out):
        assert "Unable to acquire lock" not in out and "is busy" not in out
    assert len(Registry(workspace / ".textgate" / "registry.json").history()) == 1
    assert "up to date" in dvc_status(workspace)
    lock = yaml.safe_load((workspace / "dvc.lock").read_text())
    assert set(lock["stages"]) == {"validate", "prepare", "train", "evaluate"}


class Receiver(BaseHTTPRequestHandler):
    received: list[dict] = []

    def do_POST(self) -> None:  # noqa: N802 (the stdlib's name)
        self.received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def test_a_failed_gate_sends_an_alert_and_keeps_its_summary(harness, workspace):
    from flows.notify import save_webhook_block
    from flows.pipeline import PipelineFailed, pipeline

    before = (workspace / ".textgate" / "registry.json").read_bytes()
    set_params(workspace, {"gate": {"min_accuracy": 1.0}, "notify": {"block": "textgate-alerts"}})
    try:
        with local_http_server(Receiver) as url:
            save_webhook_block("textgate-alerts", url)
            state = pipeline(params_path="params.yaml", repo_dir=str(workspace), return_state=True)
    finally:
        set_params(workspace, {"gate": {"min_accuracy": 0.0}, "notify": {"block": None}})
    assert state.is_failed() and state.message.startswith("gate FAILED")
    # validate reads gate.min_accuracy (the majority class must stay under the floor), so it
    # reruns, and prepare after it; their outputs are the same, so nothing is retrained.
    ran = state.result(raise_on_failure=False)["stages_ran"]
    assert "train" not in ran and "evaluate" not in ran
    with pytest.raises(PipelineFailed, match="accuracy_floor"):
        state.result()  # what a worker re-raises: the verdict, not a bare dict
    (alert,) = Receiver.received
    assert alert["title"].startswith("textgate: gate FAILED, nothing promoted (")
    assert "[FAIL] accuracy_floor" in alert["text"] and "[pass]" not in alert["text"]
    assert (workspace / ".textgate" / "registry.json").read_bytes() == before


WAITING = "waiting for the pipeline run that holds"
FREE = "the workspace is free: this run goes on"


def test_without_a_server_a_run_waits_for_the_file_lock(workspace, tmp_path):
    log = tmp_path / "waiting.log"
    holder = {"flow_run": "someone-else", "pid": os.getpid(), "host": "here", "since": "now"}
    with file_lock(workspace / LOCK_FILE, 10, holder, _Quiet()):
        run = start_run(workspace, log, None)
        deadline = time.monotonic() + 300
        while WAITING not in log.read_text():
            assert run.poll() is None, log.read_text()[-4000:]
            assert time.monotonic() < deadline, "the run never said it was waiting"
            time.sleep(0.2)
        held = log.read_text()
        assert run.poll() is None
        assert FREE not in held and "dvc status" not in held
    out = finish(run, log)
    assert run.returncode == 0, out[-4000:]
    # Nothing ran while the lock was held, however long that was: the run's own log goes from
    # "waiting" straight to "free" (said once it holds the lock), and only then to its work.
    waiting, free = out.index(WAITING), out.index(FREE)
    assert waiting < free < out.index("dvc status")
    assert "dvc" not in out[out.index("\n", waiting) : free], out[waiting:free]
    assert "flow run someone-else" in out  # it said whom it waited for
    assert "the workspace is free: this run goes on" in out
    # The last test changed gate.min_accuracy, which validate reads: at most validate and
    # prepare rerun (same outputs), nothing trains.
    assert "stages ran:" in out and "Running stage 'train'" not in out


def test_a_run_that_waits_too_long_fails_with_the_holder(workspace, tmp_path):
    set_params(workspace, {"deploy": {"lock_timeout_s": 2}})
    log = tmp_path / "timeout.log"
    holder = {"flow_run": "long-runner", "pid": 4242, "host": "here", "since": "earlier"}
    try:
        with file_lock(workspace / LOCK_FILE, 10, holder, _Quiet()):
            out = finish(start_run(workspace, log, None), log)
    finally:
        set_params(workspace, {"deploy": {"lock_timeout_s": 86400}})
    assert "another pipeline run has held" in out and "for over 2 s" in out
    assert "flow run long-runner, pid 4242" in out
    assert "pipeline Failed" in out


class _Quiet:
    def info(self, *args) -> None:
        pass
