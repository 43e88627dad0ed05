"""flows/serving.py without bentos: the port lock, leftovers of a killed supervisor, the
public socket, the state `textgate status` reads (tests/bentos/test_switch.py serves bentos)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

import psutil
import pytest

from flows.serving import (
    ServeState,
    listen,
    open_port,
    port_lock,
    read_serve_states,
    stop_leftovers,
)
from textgate.errors import TextgateError


def test_a_second_supervisor_on_the_port_is_refused_naming_the_first(tmp_path: Path) -> None:
    with port_lock(tmp_path, 3000):
        refused = rf"\(pid {os.getpid()}\) already serves port 3000"
        with pytest.raises(TextgateError, match=refused), port_lock(tmp_path, 3000):
            pass
        with port_lock(tmp_path, 3001):  # another port is another lock
            pass
    with port_lock(tmp_path, 3000):  # released
        pass


def test_a_busy_port_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(TextgateError, match=rf"cannot listen on 127.0.0.1:{port}.*--port"):
            listen("127.0.0.1", port)
        # The steered port too: a port held without SO_REUSEPORT is never joined.
        with pytest.raises(TextgateError, match=rf"cannot listen on 127.0.0.1:{port}.*--port"):
            open_port("127.0.0.1", port, print)


def test_without_steering_every_connection_goes_to_the_proxy_and_says_why(
    capsys: pytest.CaptureFixture[str],
) -> None:
    sock, steering = open_port("::1", 0, print)
    sock.close()
    assert steering is None
    assert "every request goes through the proxy: ::1 is not an IPv4 address" in (
        capsys.readouterr().out
    )


def test_the_next_start_stops_what_a_killed_supervisor_recorded_and_only_that(
    tmp_path: Path,
) -> None:
    left = subprocess.Popen(["sleep", "60"])
    other = subprocess.Popen(["sleep", "60"])  # its pid recorded with another start time
    try:
        started = psutil.Process(left.pid).create_time()
        state = ServeState(tmp_path, 3000)
        processes = [[left.pid, started], [other.pid, started - 100], [2**22 + 7, started]]
        state.write(bentos=[{"tag": "textgate:a", "processes": processes}])
        assert stop_leftovers(ServeState(tmp_path, 3000)) == 1
        assert left.wait(timeout=30) is not None
        assert other.poll() is None
    finally:
        for process in (left, other):
            process.kill()
            process.wait()


def test_status_reads_the_state_of_live_supervisors_only(tmp_path: Path) -> None:
    ServeState(tmp_path, 3000).write(serving="textgate:a")
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / "serve-3001.json").write_text(json.dumps({"pid": dead.pid, "serving": "x"}))
    (tmp_path / "serve-3002.json").write_text("{torn")
    assert [state["serving"] for state in read_serve_states(tmp_path)] == ["textgate:a"]


def shadow_line(labels: list[str], theirs: list[str]) -> str:
    return json.dumps(
        {
            "ts": "2026-01-01T00:00:00+00:00",
            "production": "textgate:a",
            "candidate": "textgate:b",
            "production_ms": 10.0,
            "candidate_ms": 11.0,
            "production_labels": labels,
            "production_abstained": [False] * len(labels),
            "candidate_labels": theirs,
            "candidate_abstained": [False] * len(theirs),
        }
    )


@pytest.mark.parametrize(
    ("theirs", "failed"), [(["refund"], set()), (["login"], {"shadow_agreement"})]
)
def test_the_pipeline_waits_for_shadow_evidence_then_checks_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, theirs: list[str], failed: set[str]
) -> None:
    from flows import serving
    from tests.helpers import make_params
    from textgate.registry import Release

    config = make_params({}).shadow.model_copy(update={"min_requests": 3})
    candidate = Release.create(bento_tag="textgate:b", model_tag="m:b", reason="shadow")
    named: list[object] = []
    waits: list[str] = []

    def traffic(seconds: float) -> None:  # while the pipeline waits, serve mirrors requests
        named.append(serving.read_shadow_target(tmp_path))
        with (tmp_path / serving.SHADOW_LOG).open("a") as log:
            log.write(shadow_line(["refund"], theirs) + "\n")

    monkeypatch.setattr(serving.time, "sleep", traffic)
    checks = serving.shadow_evidence(tmp_path, candidate, config, waits.append)
    assert {check.name for check in checks if not check.passed} == failed
    assert len(waits) == 3 and "0/3 mirrored requests" in waits[0]
    assert named[0] == candidate  # `textgate serve` was told which bento to shadow
    assert serving.read_shadow_target(tmp_path) is None  # and the shadow ended


def test_without_evidence_by_max_hours_the_shadow_check_fails(tmp_path: Path) -> None:
    from flows import serving
    from tests.helpers import make_params
    from textgate.registry import Release

    config = make_params({}).shadow.model_copy(update={"max_hours": 1e-9})
    candidate = Release.create(bento_tag="textgate:b", model_tag="m:b", reason="shadow")
    checks = serving.shadow_evidence(tmp_path, candidate, config, print, poll_s=0)
    assert not next(check for check in checks if check.name == "shadow").passed


def test_the_proxy_runs_on_uvloop_where_installed_and_on_asyncio_without(monkeypatch) -> None:
    import asyncio
    import sys

    import uvloop

    from flows.serving import new_event_loop

    loop = new_event_loop()
    try:
        assert isinstance(loop, uvloop.Loop)
    finally:
        loop.close()
    monkeypatch.setitem(sys.modules, "uvloop", None)  # `import uvloop` raises ImportError
    loop = new_event_loop()
    try:
        assert isinstance(loop, asyncio.BaseEventLoop) and not isinstance(loop, uvloop.Loop)
    finally:
        loop.close()


def test_status_says_where_connections_go(capsys: pytest.CaptureFixture[str]) -> None:
    from flows.cli import _print_serving

    state = {"port": 3000, "pid": 1, "serving": "textgate:a", "since": "now"}
    _print_serving({**state, "connections": "direct"}, None)
    assert "connections: straight to the bento" in capsys.readouterr().out
    _print_serving({**state, "connections": "proxy"}, None)
    assert "connections: through textgate serve's proxy" in capsys.readouterr().out
