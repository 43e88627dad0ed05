"""textgate.process: free ports, process groups started, waited for and stopped."""

from __future__ import annotations

import signal
import socket
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from textgate.process import (
    ProcessStartError,
    free_port,
    start_process,
    stop,
    wait_ready,
)

READY_TIMEOUT_S = 30.0


def python(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def gone(pid: int, timeout_s: float = 10.0) -> bool:
    """True once `pid` no longer runs (a zombie waiting for its reaper counts as gone)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


def test_free_port_can_be_bound_and_listened_on():
    port = free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", port))
        sock.listen()
        assert sock.getsockname()[1] == port


def test_stop_takes_the_whole_group_with_it(tmp_path: Path):
    # The child starts a grandchild, records its pid, and both sleep.
    pid_file = tmp_path / "grandchild.pid"
    code = f"""
        import subprocess, sys, time
        grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
        open({str(pid_file)!r}, "w").write(str(grandchild.pid))
        time.sleep(300)
    """
    with start_process(python(code), log_path=tmp_path / "child.log", grace_s=5) as process:
        wait_ready(
            process, lambda: pid_file.is_file() and pid_file.read_text() != "", READY_TIMEOUT_S
        )
        grandchild = int(pid_file.read_text())
        assert psutil.Process(grandchild).ppid() == process.pid

        stop(process, grace_s=5)

        assert process.popen.returncode == -signal.SIGTERM
        assert gone(grandchild), "the grandchild outlived stop()"


def test_leaving_the_with_block_stops_the_process(tmp_path: Path):
    with start_process(python("import time; time.sleep(300)"), grace_s=5) as process:
        assert process.running()
    assert not process.running()
    assert process.popen.returncode == -signal.SIGTERM


def test_wait_ready_fails_fast_with_the_log_tail_when_the_process_dies(tmp_path: Path):
    log = tmp_path / "server.log"
    code = "import sys; print('config broken: no model at /nowhere', flush=True); sys.exit(3)"
    process = start_process(python(code), log_path=log, name="the test server")
    started = time.monotonic()
    with pytest.raises(ProcessStartError) as caught:
        # Nothing will ever listen there: only the exit can end the wait early.
        wait_ready(process, f"http://127.0.0.1:{free_port()}/readyz", timeout_s=120)
    assert time.monotonic() - started < 30  # not the 120 s deadline
    message = str(caught.value)
    assert "the test server exited with code 3 before it was ready" in message
    assert str(log) in message and "config broken: no model at /nowhere" in message


def test_wait_ready_gives_up_at_the_deadline_and_says_the_process_still_runs(tmp_path: Path):
    with start_process(python("import time; time.sleep(300)"), log_path=tmp_path / "log") as p:
        with pytest.raises(ProcessStartError, match=r"was not ready after 0 s \(still running\)"):
            wait_ready(p, lambda: False, timeout_s=0.2, poll_s=0.05)
        assert p.running()


def test_stop_escalates_to_sigkill_for_a_process_that_ignores_sigterm(tmp_path: Path):
    ready_file = tmp_path / "ready"
    code = f"""
        import signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        open({str(ready_file)!r}, "w").close()
        time.sleep(300)
    """
    with start_process(python(code), log_path=tmp_path / "stubborn.log", grace_s=0.5) as process:
        wait_ready(process, ready_file.is_file, READY_TIMEOUT_S, poll_s=0.05)

        started = time.monotonic()
        stop(process, grace_s=0.5)

        assert process.popen.returncode == -signal.SIGKILL
        assert time.monotonic() - started < 10


def test_stopping_a_process_that_already_exited_does_nothing(tmp_path: Path):
    process = start_process(python("pass"), log_path=tmp_path / "log")
    process.popen.wait(timeout=30)
    stop(process, grace_s=0.5)
    assert process.popen.returncode == 0
