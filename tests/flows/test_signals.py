"""A stopped `textgate run` leaves no process behind, whatever signal stopped it.

A real `textgate run` in its own session starts its temporary Prefect server (uvicorn) at
once; the test signals it as soon as the server process exists and checks that every process
below it is gone within a bounded time.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import suppress
from pathlib import Path

import psutil
import pytest
import yaml

from tests.helpers import raw_params

# Generous for a loaded machine; the server is stopped within seconds.
GONE_TIMEOUT_S = 30.0
POLL_S = 0.05


def _gone(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE  # exited; its parent has not reaped it
    except psutil.NoSuchProcess:
        return True


def _wait_for_server(run: subprocess.Popen, timeout_s: float = GONE_TIMEOUT_S) -> psutil.Process:
    """The run's temporary Prefect server process, once it exists."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert run.poll() is None, f"textgate run exited early ({run.returncode})"
        for child in psutil.Process(run.pid).children(recursive=True):
            try:
                if "uvicorn" in child.cmdline():
                    return child
            except psutil.NoSuchProcess:
                continue
        time.sleep(POLL_S)
    pytest.fail("textgate run started no temporary Prefect server")


def _wait_until_gone(processes: list[psutil.Process]) -> list[psutil.Process]:
    """The processes still alive after GONE_TIMEOUT_S (empty when all stopped)."""
    deadline = time.monotonic() + GONE_TIMEOUT_S
    alive = processes
    while alive and time.monotonic() < deadline:
        alive = [process for process in alive if not _gone(process)]
        time.sleep(POLL_S)
    return alive


class Runs:
    """`textgate run` processes (temporary server) started in their own session."""

    def __init__(self, workspace: Path) -> None:
        self.workspace = workspace
        self.env = {**os.environ, "PREFECT_HOME": str(workspace / "prefect-home")}
        self.env.pop("PREFECT_API_URL", None)
        self.env.pop("PREFECT_PROFILE", None)
        self.env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
        self.log = workspace / "run.log"
        self.seen: list[psutil.Process] = []

    def start(self) -> subprocess.Popen:
        # Output to a file: a process left behind would hold a pipe open.
        with self.log.open("w") as log:
            run = subprocess.Popen(
                [sys.executable, "-m", "flows.cli", "run", "--params", "params.yaml"],
                cwd=self.workspace,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.seen.append(psutil.Process(run.pid))
        return run

    def tree(self, run: subprocess.Popen) -> list[psutil.Process]:
        """The server and every other process below `run` now (remembered for the cleanup)."""
        server = _wait_for_server(run)
        processes = [server, *_children(psutil.Process(run.pid))]
        self.seen += processes
        return processes

    def kill_leftovers(self) -> None:
        for process in self.seen:
            with suppress(psutil.NoSuchProcess):
                process.kill()


def _children(process: psutil.Process) -> list[psutil.Process]:
    try:
        return process.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


@pytest.fixture
def runs(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw_params()))
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    runs = Runs(tmp_path)
    yield runs
    runs.kill_leftovers()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_signalled_run_stops_its_temporary_server_and_exits_128_plus_signum(runs, signum):
    run = runs.start()
    processes = runs.tree(run)

    os.kill(run.pid, signum)

    assert run.wait(timeout=GONE_TIMEOUT_S) == 128 + signum, runs.log.read_text()
    alive = _wait_until_gone(processes)
    assert not alive, f"left running: {[process.cmdline() for process in alive]}"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_killed_run_still_stops_its_temporary_server(runs):
    run = runs.start()
    server = runs.tree(run)[0]

    os.kill(run.pid, signal.SIGKILL)  # cannot be caught: the kernel signals the server

    run.wait(timeout=GONE_TIMEOUT_S)
    alive = _wait_until_gone([server])
    assert not alive, f"left running: {server.cmdline()}"
