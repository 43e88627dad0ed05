"""The supervisor's switch logic with stand-in bentos: small aiohttp servers in processes of
their own, answering like a bento (`/readyz`, `/classify` with the model header). Each test
runs twice: with every connection on the proxy (bentos on private ports), and with the port
steered (textgate.reuseport: bentos accept on slots of the public port, shedding their direct
clients while the shed file exists). The real `bentoml serve` path is
tests/bentos/test_switch.py (slow)."""

from __future__ import annotations

import dataclasses
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from flows import serving
from tasks.served import GoldenCase
from textgate.errors import TextgateError
from textgate.process import free_port, start_process
from textgate.proxy import Backend
from textgate.registry import Registry, Release
from textgate.reuseport import SHED_FILE_ENV, SUPERVISOR_ADDRESS_ENV, Slot, Steering

FAKE_BENTO = """
import os, socket, sys
from aiohttp import web
tag, label, where, crash_after = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
shed = os.environ.get("TEXTGATE_SHED_FILE")
supervisor = os.environ.get("TEXTGATE_SUPERVISOR_ADDRESS")
if label == "crash":
    sys.exit(3)
answered = 0
async def ready(request):
    return web.Response(text="ok")
async def classify(request):
    global answered
    answered += 1
    if answered > crash_after:
        os._exit(4)
    texts = (await request.json())["texts"]
    body = [{"label": label, "score": 0.5, "abstained": False} for _ in texts]
    response = web.json_response(body, headers={"X-Textgate-Model": tag})
    if shed and os.path.exists(shed) and request.remote != supervisor:
        response.force_close()
    return response
app = web.Application()
app.router.add_get("/readyz", ready)
app.router.add_post("/classify", classify)
if where.startswith("fd:"):  # a slot of the steered port
    web.run_app(app, sock=socket.socket(fileno=int(where[3:])), print=None)
else:
    web.run_app(app, host="127.0.0.1", port=int(where), print=None)
"""
# What each stand-in bento answers, and what its model answers offline.
ANSWERS = {
    "textgate:a": "refund",
    "textgate:b": "login",
    "textgate:crash": "crash",
    "textgate:fragile": "login",  # crashes once the golden requests (7) and 3 more answered
}
OFFLINE = dict(ANSWERS)
CRASH_AFTER = {"textgate:fragile": 10}


def launch(
    release: Release, options: serving.ServeOptions, workdir: Path, slot: Slot | None = None
) -> serving.Served:
    command = [sys.executable, "-c", FAKE_BENTO, release.bento_tag, ANSWERS[release.bento_tag]]
    crash_after = str(CRASH_AFTER.get(release.bento_tag, 1 << 30))
    if slot is None:
        port = free_port()
        process = start_process([*command, str(port), crash_after], log_path=workdir / f"{port}")
        backend = Backend(release.bento_tag, f"http://127.0.0.1:{port}")
        return serving.Served(release, process, backend)
    shed_file = workdir / f"shed-{slot.index}-{time.time_ns()}"
    env = {**os.environ, SHED_FILE_ENV: str(shed_file), SUPERVISOR_ADDRESS_ENV: slot.source}
    process = start_process(
        [*command, f"fd:{slot.sock.fileno()}", crash_after],
        env=env,
        log_path=workdir / f"slot-{slot.index}-{time.time_ns()}.log",
        pass_fds=(slot.sock.fileno(),),
    )
    url = f"http://127.0.0.1:{slot.sock.getsockname()[1]}"
    backend = Backend(release.bento_tag, url, local_addr=slot.source)
    return serving.Served(release, process, backend, slot=slot, shed_file=shed_file)


@contextmanager
def offline(bento_tag: str, options: serving.ServeOptions, cache: Path) -> Iterator:
    label = OFFLINE[bento_tag]
    yield lambda: [GoldenCase(text, label, 0.5) for text in serving.FALLBACK_TEXTS]


def servable(release: Release) -> None:
    if release.bento_tag not in ANSWERS:
        raise TextgateError(f"{release.bento_tag} cannot be served: no such bento in the store")


def release(tag: str) -> Release:
    return Release.create(bento_tag=tag, model_tag=f"m-{tag}", reason="test")


@pytest.fixture(params=["proxy", "steered"])
def supervisor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> Iterator[serving.Supervisor]:
    monkeypatch.setattr(serving, "launch_bento", launch)
    monkeypatch.setattr(serving, "offline_answers", offline)
    options = serving.ServeOptions(
        host="127.0.0.1",
        port=free_port(),
        registry=Registry(tmp_path / "registry.json"),
        state_dir=tmp_path,
        env={},
        golden_file=tmp_path / "none.json",
        score_tolerance=0.01,
        poll_s=0.1,
        ready_timeout_s=30,
        drain_timeout_s=5,
    )
    alerts: list[tuple[str, str]] = []
    supervisor = serving.Supervisor(options, lambda *alert: alerts.append(alert), servable)
    supervisor.alerts = alerts  # type: ignore[attr-defined]
    if request.param == "steered":
        if not sys.platform.startswith("linux"):
            pytest.skip("the port is steered on Linux only")
        supervisor.steering = Steering.open(options.host, options.port)
        sock = supervisor.steering.proxy
    else:
        sock = serving.listen(options.host, options.port)
    supervisor.proxy_thread = serving.ProxyThread(supervisor.proxy, sock)
    try:
        yield supervisor
    finally:
        supervisor.proxy_thread.stop()
        for served in supervisor._running():
            served.stop()
        if supervisor.steering is not None:
            supervisor.steering.close()
        sock.close()


def steered_to(supervisor: serving.Supervisor) -> str | None:
    """The bento new connections go to directly ("proxy": to the proxy; None: not steered)."""
    if supervisor.steering is None:
        return None
    default = supervisor.steering.default
    if default is None:
        return "proxy"
    [served] = [s for s in supervisor._running() if s.slot is default]
    return served.tag


def follow_promotion(supervisor: serving.Supervisor, tag: str) -> None:
    """Promote `tag` in the supervisor's registry, and let it see the change."""
    supervisor.options.registry.promote(release(tag))
    supervisor.follow()


def answered_by(supervisor: serving.Supervisor) -> str | None:
    url = f"http://127.0.0.1:{supervisor.options.port}/classify"
    response = httpx.post(url, json={"texts": ["hi"]}, timeout=10, trust_env=False)
    assert response.status_code == 200, response.text
    return response.headers.get("x-textgate-model")


def test_a_promotion_switches_traffic_and_stops_the_old_bento(
    supervisor: serving.Supervisor,
) -> None:
    registry = supervisor.options.registry
    follow_promotion(supervisor, "textgate:a")
    assert answered_by(supervisor) == "textgate:a"
    assert steered_to(supervisor) in (None, "textgate:a")
    old = supervisor.serving
    registry.promote(release("textgate:b"))
    errors: list[str] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            try:
                answered_by(supervisor)
            except (AssertionError, httpx.HTTPError) as error:
                errors.append(str(error))

    thread = threading.Thread(target=load)
    thread.start()
    supervisor.follow()
    stop.set()
    thread.join()
    assert errors == []
    assert answered_by(supervisor) == "textgate:b"
    assert steered_to(supervisor) in (None, "textgate:b")
    assert old is not None and supervisor.standby is old  # ready to take traffic back
    supervisor.follow()  # serve.standby_s (0 here) is over
    assert not old.process.running()
    state = serving.read_serve_states(supervisor.options.state_dir)[0]
    assert state["serving"] == "textgate:b" and state["problem"] is None
    assert state["connections"] == ("proxy" if supervisor.steering is None else "direct")
    assert [bento["tag"] for bento in state["bentos"]] == ["textgate:b"]


@pytest.mark.parametrize(
    ("tag", "problem"),
    [
        ("textgate:gone", "no such bento in the store"),
        ("textgate:crash", "exited with code 3 before it was ready"),
    ],
)
def test_a_candidate_that_cannot_serve_leaves_production_serving_and_alerts(
    supervisor: serving.Supervisor, tag: str, problem: str
) -> None:
    registry = supervisor.options.registry
    follow_promotion(supervisor, "textgate:a")
    registry.promote(release(tag))
    supervisor.follow()
    assert answered_by(supervisor) == "textgate:a"
    [(subject, body)] = supervisor.alerts  # type: ignore[attr-defined]
    assert tag in subject and problem in body and "still serving textgate:a" in body
    state = serving.read_serve_states(supervisor.options.state_dir)[0]
    assert state["serving"] == "textgate:a" and problem in state["problem"]
    supervisor.follow()  # the same release is not tried again every poll
    assert len(supervisor.alerts) == 1  # type: ignore[attr-defined]


def test_a_candidate_answering_unlike_offline_gets_no_traffic(
    supervisor: serving.Supervisor, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(OFFLINE, "textgate:b", "refund")  # offline it says refund, served login
    follow_promotion(supervisor, "textgate:a")
    follow_promotion(supervisor, "textgate:b")
    assert answered_by(supervisor) == "textgate:a"
    assert "answered 0/4 golden requests as offline" in supervisor.problem
    assert supervisor.candidates == []


def test_a_corrupt_registry_keeps_serving_then_clears_once_readable(
    supervisor: serving.Supervisor,
) -> None:
    registry = supervisor.options.registry
    follow_promotion(supervisor, "textgate:a")
    good = registry.path.read_bytes()
    registry.path.write_text('{"schema_version": 1, "releases": [')
    supervisor.follow()
    assert "is corrupt" in supervisor.problem and answered_by(supervisor) == "textgate:a"
    registry.path.write_bytes(good)
    supervisor.follow()
    assert supervisor.problem is None


def test_a_serving_bento_that_dies_is_started_again(supervisor: serving.Supervisor) -> None:
    follow_promotion(supervisor, "textgate:a")
    first = supervisor.serving
    assert first is not None
    first.process.popen.kill()
    first.process.popen.wait()
    time.sleep(0.1)
    supervisor.follow()
    assert supervisor.serving is not first
    assert answered_by(supervisor) == "textgate:a"
    assert "textgate:a exited" in supervisor.alerts[0][1]  # type: ignore[attr-defined]


def test_a_new_bento_crashing_under_load_hands_traffic_back_to_the_standby(
    supervisor: serving.Supervisor, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        supervisor,
        "options",
        dataclasses.replace(supervisor.options, standby_s=60.0),
    )
    follow_promotion(supervisor, "textgate:a")
    follow_promotion(supervisor, "textgate:fragile")
    assert [answered_by(supervisor) for _ in range(3)] == ["textgate:fragile"] * 3
    # The fourth crashes it: that request fails (502 from the proxy; a reset connection
    # when the bento was reached directly).
    with pytest.raises((AssertionError, httpx.HTTPError)):
        answered_by(supervisor)
    time.sleep(0.2)
    supervisor.follow()
    assert answered_by(supervisor) == "textgate:a"
    assert "textgate:fragile exited (code 4); back to serving textgate:a" in supervisor.problem
    supervisor.follow()  # the release that crashed is not tried again
    assert answered_by(supervisor) == "textgate:a"
    assert steered_to(supervisor) in (None, "textgate:a")


def test_clients_kept_alive_see_the_model_change_once_then_reach_it_directly(
    supervisor: serving.Supervisor,
) -> None:
    follow_promotion(supervisor, "textgate:a")
    url = f"http://127.0.0.1:{supervisor.options.port}/classify"
    stop = threading.Event()
    seen: list[list[str | None]] = [[] for _ in range(4)]

    def client(index: int) -> None:
        with httpx.Client(timeout=10, trust_env=False) as http:  # one kept-alive connection
            while not stop.is_set():
                try:
                    response = http.post(url, json={"texts": ["hi"]})
                    seen[index].append(response.headers.get("x-textgate-model"))
                except httpx.HTTPError as error:
                    seen[index].append(type(error).__name__)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(0.5)
    follow_promotion(supervisor, "textgate:b")
    time.sleep(0.5)
    proxied = supervisor.proxy.requests
    time.sleep(0.5)
    stop.set()
    for thread in threads:
        thread.join()
    for answers in seen:
        collapsed = [tag for i, tag in enumerate(answers) if i == 0 or answers[i - 1] != tag]
        assert collapsed == ["textgate:a", "textgate:b"]  # no error, no answer from a after b
    if supervisor.steering is not None:  # the clients left the proxy: nothing goes through it
        assert steered_to(supervisor) == "textgate:b"
        assert supervisor.proxy.requests == proxied


def test_while_a_shadow_is_mirrored_every_connection_goes_through_the_proxy(
    supervisor: serving.Supervisor, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(supervisor, "options", dataclasses.replace(supervisor.options, shadow=True))
    follow_promotion(supervisor, "textgate:a")
    state_dir = supervisor.options.state_dir
    serving.write_shadow_target(state_dir, release("textgate:b"))
    supervisor.follow()
    assert supervisor.shadowing is not None and supervisor.shadowing.tag == "textgate:b"
    assert steered_to(supervisor) in (None, "proxy")
    before = supervisor.proxy.requests
    assert answered_by(supervisor) == "textgate:a"  # production answers; the shadow gets a copy
    assert supervisor.proxy.requests == before + 1
    serving.write_shadow_target(state_dir, None)
    supervisor.follow()
    assert supervisor.shadowing is None
    assert steered_to(supervisor) in (None, "textgate:a")
    assert answered_by(supervisor) == "textgate:a"
