"""`textgate serve` follows the registry: real `bentoml serve` processes behind the switch.

Bentos A (decisive_model_dir) and B (tiny_model_dir) answer differently; a third bento has
its service broken in the store, so it cannot start. Every test here is slow: each starts
bentos on loopback ports.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from tests.helpers import REPO_ROOT, merge, raw_params
from textgate.config import load_params
from textgate.process import free_port
from textgate.registry import Registry, Release

pytestmark = pytest.mark.slow

START_TIMEOUT_S = 240.0
SWITCH_TIMEOUT_S = 180.0


@dataclass(frozen=True)
class Bentos:
    a: Release
    b: Release
    broken: Release
    twin: Release  # A's weights, packaged again
    shuffled: Release  # A's weights with its labels permuted


def release_of(packaged: object, reason: str) -> Release:
    return Release.create(
        bento_tag=packaged.bento_tag,  # type: ignore[attr-defined]
        model_tag=packaged.model_tag,  # type: ignore[attr-defined]
        reason=reason,
    )


@pytest.fixture(scope="module")
def bentos(
    bentoml_home: Path,
    decisive_model_dir: Path,
    tiny_model_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Bentos:
    import bentoml

    from tasks.package import package_model
    from textgate.artifacts import LABEL_MAP_FILE

    params = load_params(REPO_ROOT / "params.yaml")
    a = package_model(decisive_model_dir, params=params, metrics={}, lineage={})
    b = package_model(tiny_model_dir, params=params, metrics={}, lineage={})
    broken = package_model(tiny_model_dir, params=params, metrics={}, lineage={})
    service = Path(bentoml.bentos.get(broken.bento_tag).path) / "src" / "bentos" / "service.py"
    service.write_text(service.read_text() + "\nraise RuntimeError('broken on purpose')\n")
    twin = package_model(decisive_model_dir, params=params, metrics={}, lineage={})
    shuffled_dir = tmp_path_factory.mktemp("shuffled") / "model"
    shutil.copytree(decisive_model_dir, shuffled_dir)
    label_map = shuffled_dir / LABEL_MAP_FILE
    labels = json.loads(label_map.read_text())["labels"]
    label_map.write_text(json.dumps({"labels": labels[1:] + labels[:1]}))
    shuffled = package_model(shuffled_dir, params=params, metrics={}, lineage={})
    return Bentos(
        release_of(a, "A"),
        release_of(b, "B"),
        release_of(broken, "broken"),
        release_of(twin, "twin"),
        release_of(shuffled, "shuffled"),
    )


@dataclass
class Serve:
    url: str
    port: int
    params_file: Path
    registry: Registry
    process: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def start_serve(tmp: Path, port: int, log_name: str = "serve.log") -> Serve:
    params_file = tmp / "params.yaml"
    if not params_file.exists():
        overrides = {
            "registry": {"path": str(tmp / "state" / "registry.json")},
            "evaluate": {"output_dir": str(tmp / "evaluate")},  # no golden.json: fixed texts
            "serve": {"follow_poll_s": 0.5, "drain_timeout_s": 10, "shadow": True},
            # A shared test machine's latency is not what these tests are about.
            "shadow": {"min_requests": 20, "max_p95_latency_ratio": 10.0},
        }
        params_file.write_text(yaml.safe_dump(merge(raw_params(), overrides)))
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO_ROOT),
        "TEXTGATE_RUNTIME": "torch",
        "TEXTGATE_WORKERS": "1",
        "TEXTGATE_THREADS": "1",
        "TEXTGATE_REQUEST_LOG": str(tmp / "requests.jsonl"),
        "TEXTGATE_API_KEY": "",
        "PREFECT_API_URL": "",  # alerts are printed, not sent
    }
    log = tmp / log_name
    command = [sys.executable, "-m", "flows.cli", "serve", "--params", str(params_file)]
    with log.open("wb") as handle:
        process = subprocess.Popen(
            [*command, "--port", str(port)], env=env, stdout=handle, stderr=subprocess.STDOUT
        )
    registry = Registry(tmp / "state" / "registry.json")
    return Serve(f"http://127.0.0.1:{port}", port, params_file, registry, process, log)


def wait_serving(serve: Serve, tag: str, timeout_s: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert serve.process.poll() is None, serve.output()
        if served_tag(serve) == tag:
            return
        time.sleep(0.5)
    pytest.fail(f"{tag} not served after {timeout_s} s:\n{serve.output()}")


def served_tag(serve: Serve) -> str | None:
    try:
        response = httpx.post(f"{serve.url}/classify", json={"texts": ["hi"]}, timeout=10)
    except httpx.HTTPError:
        return None
    return response.headers.get("x-textgate-model") if response.status_code == 200 else None


def stop_serve(serve: Serve) -> None:
    if serve.process.poll() is None:
        serve.process.send_signal(signal.SIGTERM)
        serve.process.wait(timeout=60)


@pytest.fixture(scope="module")
def serving(bentos: Bentos, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    tmp = tmp_path_factory.mktemp("follow")
    Registry(tmp / "state" / "registry.json").promote(bentos.a)
    serve = start_serve(tmp, free_port())
    try:
        wait_serving(serve, bentos.a.bento_tag)
        yield serve
    finally:
        stop_serve(serve)


class Load:
    """`clients` threads sending /classify one after another; each answer's status and header."""

    def __init__(self, url: str, clients: int = 4) -> None:
        self.url = url
        self.stop = threading.Event()
        self.answers: list[list[tuple[int, str | None]]] = [[] for _ in range(clients)]
        self.threads = [
            threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(clients)
        ]

    def _client(self, index: int) -> None:
        with httpx.Client(timeout=60) as client:
            while not self.stop.is_set():
                try:
                    response = client.post(f"{self.url}/classify", json={"texts": ["refund me"]})
                    answer = (response.status_code, response.headers.get("x-textgate-model"))
                except httpx.HTTPError as error:
                    answer = (0, type(error).__name__)
                self.answers[index].append(answer)

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=60)


def collapsed(answers: list[tuple[int, str | None]]) -> list[str | None]:
    tags: list[str | None] = []
    for _, tag in answers:
        if not tags or tags[-1] != tag:
            tags.append(tag)
    return tags


def test_a_promotion_then_a_rollback_switch_live_traffic_once_each_without_an_error(
    serving: Serve, bentos: Bentos
) -> None:
    a, b = bentos.a.bento_tag, bentos.b.bento_tag
    with Load(serving.url) as load:
        time.sleep(2)
        serving.registry.promote(bentos.b)
        wait_serving(serving, b, SWITCH_TIMEOUT_S)
        time.sleep(2)
        serving.registry.rollback("B answers differently", actor="test@host")
        wait_serving(serving, a, SWITCH_TIMEOUT_S)
        time.sleep(2)
    for answers in load.answers:
        assert [status for status, _ in answers if status != 200] == []
        assert collapsed(answers) == [a, b, a]  # the header changes exactly once per switch
    log = [json.loads(line) for line in (serving.log.parent / "requests.jsonl").open()]
    assert {record["bento_tag"] for record in log} == {a, b}


def test_a_candidate_that_is_missing_or_fails_to_start_never_gets_traffic(
    serving: Serve, bentos: Bentos, capsys: pytest.CaptureFixture[str]
) -> None:
    from flows.cli import main

    a = bentos.a.bento_tag
    missing = Release.create(bento_tag="textgate:nosuchbento", model_tag="m:1", reason="typo")
    for candidate, problem in ((missing, "no such bento"), (bentos.broken, "broken on purpose")):
        with Load(serving.url, clients=2) as load:
            serving.registry.promote(candidate)
            deadline = time.monotonic() + SWITCH_TIMEOUT_S
            while problem not in serving.output() and time.monotonic() < deadline:
                time.sleep(0.5)
        assert problem in serving.output()
        for answers in load.answers:
            assert set(answers) == {(200, a)}
        assert main(["status", "--params", str(serving.params_file)]) == 0
        out = capsys.readouterr().out
        assert f"production is {candidate.bento_tag}, but it is not served" in out
        assert problem in out and "still serving " + a in out
    serving.registry.promote(bentos.a)


def test_a_candidate_answering_unlike_offline_never_gets_traffic(
    serving: Serve, bentos: Bentos
) -> None:
    # The offline answers the switch compares with are cached per bento: make B's wrong.
    cache = serving.registry.path.parent / "serve-golden"
    cache.mkdir(exist_ok=True)
    wrong = [{"text": "hello", "label": "no-such-label", "score": 0.5}]
    b = bentos.b
    (cache / f"{b.bento_tag.replace(':', '-')}.json").write_text(json.dumps(wrong))
    try:
        serving.registry.promote(
            Release.create(bento_tag=b.bento_tag, model_tag=b.model_tag, reason="again")
        )
        deadline = time.monotonic() + SWITCH_TIMEOUT_S
        while "golden requests as offline" not in serving.output():
            assert time.monotonic() < deadline, serving.output()
            time.sleep(0.5)
        assert served_tag(serving) == bentos.a.bento_tag
    finally:
        (cache / f"{b.bento_tag.replace(':', '-')}.json").unlink()
        serving.registry.promote(bentos.a)


def test_a_corrupt_registry_keeps_production_serving_and_says_so(
    serving: Serve, bentos: Bentos
) -> None:
    good = serving.registry.path.read_bytes()
    serving.registry.path.write_text('{"schema_version": 1, "releases": [')  # cut mid-write
    try:
        deadline = time.monotonic() + 30
        while "is corrupt" not in serving.output():
            assert time.monotonic() < deadline, serving.output()
            time.sleep(0.5)
        assert served_tag(serving) == bentos.a.bento_tag
    finally:
        serving.registry.path.write_bytes(good)


def bento_processes(serve_pid: int) -> list[psutil.Process]:
    return psutil.Process(serve_pid).children(recursive=True)


def test_a_second_serve_on_the_port_is_refused_and_kill_9_leaves_no_orphans(
    bentos: Bentos, tmp_path: Path
) -> None:
    Registry(tmp_path / "state" / "registry.json").promote(bentos.a)
    port = free_port()
    first = start_serve(tmp_path, port)
    try:
        wait_serving(first, bentos.a.bento_tag)
        second = start_serve(tmp_path, port, "second.log")
        assert second.process.wait(timeout=120) == 2
        assert f"already serves port {port}" in second.output()
        children = bento_processes(first.process.pid)
        assert children
        first.process.send_signal(signal.SIGKILL)
        first.process.wait(timeout=10)
        third = start_serve(tmp_path, port, "third.log")
        try:
            wait_serving(third, bentos.a.bento_tag)
            _, alive = psutil.wait_procs(children, timeout=30)
            assert alive == []
        finally:
            stop_serve(third)
    finally:
        stop_serve(first)


@pytest.mark.parametrize(("candidate", "passes"), [("twin", True), ("shuffled", False)])
def test_the_shadow_check_passes_a_twin_and_fails_a_model_with_shuffled_labels(
    serving: Serve, bentos: Bentos, candidate: str, passes: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    from flows.cli import main

    release = getattr(bentos, candidate)
    params = ["--params", str(serving.params_file)]
    assert main(["shadow", release.bento_tag, *params]) == 0
    deadline = time.monotonic() + SWITCH_TIMEOUT_S
    while f"{release.bento_tag} answers in shadow" not in serving.output():
        assert time.monotonic() < deadline, serving.output()
        time.sleep(0.5)
    texts = ["I lost my card yesterday", "please refund my order", "cannot sign in to the app"]
    with httpx.Client(timeout=30) as client:
        for index in range(30):
            body = {"texts": [texts[index % 3], texts[(index + 1) % 3]]}
            response = client.post(f"{serving.url}/classify", json=body)
            assert response.headers["x-textgate-model"] == bentos.a.bento_tag  # never the shadow
    time.sleep(2)  # the last copies
    capsys.readouterr()
    assert main(["shadow-check", "--json", *params]) == (0 if passes else 1)
    verdict = json.loads(capsys.readouterr().out)
    print(json.dumps(verdict, indent=2))  # shown with -s: the closing note quotes it
    failed = {check["name"] for check in verdict["checks"] if not check["passed"]}
    assert failed == (set() if passes else {"shadow_agreement"})
    assert verdict["shadow"]["requests"] >= 20
    main(["shadow", "--stop", *params])
