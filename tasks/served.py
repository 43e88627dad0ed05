"""Served check: start a built bento with a real `bentoml serve` and replay golden requests.

Promotion checks the artifact that will actually be served, not the model directory: the
bento is started from an unrelated working directory on a free loopback port, without the
project on PYTHONPATH (a bento must be self-contained), and each golden text is sent as its
own request. Every answer must equal the offline prediction recorded in the golden case
(same label, score within a tolerance); the per-request latencies give p50 and p95.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil

from textgate.artifacts import evaluate_outputs
from textgate.config import Params
from textgate.errors import DataError, TextgateError
from textgate.gate import Check, served_checks
from textgate.io import read_json, write_json
from textgate.process import (
    ManagedProcess,
    ProcessStartError,
    free_port,
    start_process,
    stop,
    terminate_then_kill,
    url_ready,
    wait_ready,
)

LOG_FILE = "bentoml-serve.log"
STOP_GRACE_S = 20.0
POLL_INTERVAL_S = 0.1  # /readyz is cheap; bench.serve times start-to-ready with it
# How much of an error response body an error message quotes.
BODY_EXCERPT_CHARS = 300


class ServedCheckError(TextgateError):
    """The bento could not be started, or did not become ready to answer."""


@dataclass(frozen=True)
class GoldenCase:
    """One golden request: a text and the offline prediction the served bento must repeat."""

    text: str
    label: str
    score: float


def load_golden(path: str | Path) -> list[GoldenCase]:
    """Read a golden file: a JSON list of {"text", "label", "score"} objects.

    Raises:
        DataError: the file is missing, not JSON, empty, or an entry has the wrong shape.
    """
    raw = read_json(path)
    if not isinstance(raw, list):
        raise DataError(
            f"{path}: a golden file is a JSON list of {{text, label, score}} objects, "
            f"not a {type(raw).__name__}"
        )
    if not raw:
        raise DataError(f"{path}: the golden file has no cases")
    return [_golden_case(entry, f"{path}: case {index}") for index, entry in enumerate(raw)]


def write_golden(path: str | Path, golden: Sequence[GoldenCase]) -> None:
    """Write golden cases in the format `load_golden` reads (atomically)."""
    write_json(path, [asdict(case) for case in golden])


def _golden_case(entry: Any, where: str) -> GoldenCase:
    if not isinstance(entry, dict):
        raise DataError(f"{where}: expected an object, got {type(entry).__name__}")
    keys = {"text", "label", "score"}
    if set(entry) != keys:
        missing, unknown = sorted(keys - set(entry)), sorted(set(entry) - keys)
        raise DataError(
            f"{where}: keys must be text, label, score (missing {missing}, unknown {unknown})"
        )
    text, label, score = entry["text"], entry["label"], entry["score"]
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"{where}: text must be a non-blank string, got {text!r}")
    if not isinstance(label, str) or not label:
        raise DataError(f"{where}: label must be a non-empty string, got {label!r}")
    # bool is an int subclass: true/false is not a score.
    if isinstance(score, bool) or not isinstance(score, int | float) or not 0.0 <= score <= 1.0:
        raise DataError(f"{where}: score must be a number in [0, 1], got {score!r}")
    return GoldenCase(text=text, label=label, score=float(score))


@contextmanager
def serve_bento(
    bento_tag: str,
    *,
    workdir: Path,
    env: dict[str, str] | None = None,
    ready_timeout_s: float = 120,
    port: int | None = None,
) -> Iterator[str]:
    """Run `bentoml serve <bento_tag>` on 127.0.0.1; yield its base URL once it is ready.

    The server runs from `workdir` (its log is `workdir/bentoml-serve.log`) in its own
    process group, with this process's environment plus `env`, minus PYTHONPATH. On exit
    the server and its workers are stopped: SIGTERM, then SIGKILL after 20 s.

    Args:
        bento_tag: a bento in the BentoML store (`BENTOML_HOME`), e.g. `textgate:abc123`.
        workdir: an existing directory, best one unrelated to the project.
        env: extra environment variables for the server.
        ready_timeout_s: how long the server may take to answer `GET /readyz` with 200.
        port: the port to listen on; a free one by default.

    Raises:
        ServedCheckError: the server exited or was not ready in time; the message has the
            exit code and the end of the log.
    """
    workdir = Path(workdir)
    port = free_port() if port is None else port
    full_env = {**os.environ, "BENTOML_DO_NOT_TRACK": "True", **(env or {})}
    full_env.pop("PYTHONPATH", None)
    command = [sys.executable, "-m", "bentoml", "serve", bento_tag]
    command += ["--host", "127.0.0.1", "--port", str(port)]
    process = start_process(
        command,
        env=full_env,
        cwd=workdir,
        log_path=workdir / LOG_FILE,
        name=f"bentoml serve {bento_tag}",
    )
    server = _BentoServer(process)
    try:
        url = f"http://127.0.0.1:{port}"
        server.wait_ready(url, ready_timeout_s)
        yield url
    finally:
        server.stop()


class _BentoServer:
    """A `bentoml serve` process and the workers it starts.

    The server has a process group of its own, but its process manager (circus) starts each
    worker in a new session, out of that group: a worker is only found as a descendant of
    the server, so the workers seen are remembered, in case the server dies first.
    """

    def __init__(self, process: ManagedProcess) -> None:
        self.process = process
        self.workers: dict[int, psutil.Process] = {}

    def note_workers(self) -> None:
        """Remember the server's current descendants."""
        with suppress(psutil.Error):
            for child in psutil.Process(self.process.pid).children(recursive=True):
                self.workers.setdefault(child.pid, child)

    def wait_ready(self, url: str, timeout_s: float) -> None:
        """Wait until `GET {url}/readyz` answers 200, noting the workers as they start.

        Raises:
            ServedCheckError: the server exited first, or was not ready in time.
        """

        def ready() -> bool:
            self.note_workers()
            return url_ready(f"{url}/readyz")

        try:
            wait_ready(self.process, ready, timeout_s, poll_s=POLL_INTERVAL_S)
        except ProcessStartError as error:
            raise ServedCheckError(str(error)) from error
        self.note_workers()

    def stop(self) -> None:
        """Stop the server and its workers: SIGTERM, then SIGKILL after the grace period."""
        if self.process.running():
            self.note_workers()
        stop(self.process, STOP_GRACE_S)
        left = [worker for worker in self.workers.values() if worker.is_running()]
        terminate_then_kill(left, STOP_GRACE_S)


@dataclass(frozen=True)
class ServedReport:
    """The outcome of replaying golden cases against a served bento.

    `mismatches` holds answered cases whose label or score differs from the offline one;
    `errors` the cases that got no valid answer (HTTP error or transport failure). Both count
    as not matched. Latencies are those of the valid answers, in milliseconds; the
    percentiles are NaN when there are none.
    """

    bento_tag: str
    n: int
    matched: int
    mismatches: list[dict[str, Any]]
    errors: list[str]
    latencies_ms: list[float]
    p50_ms: float
    p95_ms: float
    max_ms: float

    @property
    def passed(self) -> bool:
        """Every golden case was answered and matched."""
        return self.n > 0 and self.matched == self.n

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (NaN percentiles become None)."""
        out = asdict(self)
        for key in ("p50_ms", "p95_ms", "max_ms"):
            if math.isnan(out[key]):
                out[key] = None
        out["passed"] = self.passed
        return out


def replay(
    url: str,
    golden: Sequence[GoldenCase],
    *,
    score_tolerance: float,
    timeout_s: float = 30,
    warmup: int = 3,
    bento_tag: str = "",
    local_address: str | None = None,
) -> ServedReport:
    """Send each golden text as its own request, in order, and compare with the offline answer.

    A case matches when the served label equals the golden label and the served score is
    within `score_tolerance` of the golden score. Requests are sequential, so a latency is
    one request's round trip with no queueing behind others. The first `warmup` texts are
    sent once, untimed, before the timed pass.

    Args:
        url: the server's base URL (`POST {url}/classify` with {"texts": [text]}).
        golden: the cases to replay; at least one.
        score_tolerance: the largest accepted |served score - offline score|.
        timeout_s: per-request timeout.
        warmup: untimed requests sent first.
        bento_tag: recorded in the report.
        local_address: the address to connect from (a bento on a slot of `textgate serve`'s
            port is reached through its slot's source address).
    """
    if not golden:
        raise DataError("replay needs at least one golden case")
    endpoint = f"{url.rstrip('/')}/classify"
    outcome = _ReplayOutcome()
    transport = httpx.HTTPTransport(local_address=local_address)
    with httpx.Client(trust_env=False, timeout=timeout_s, transport=transport) as client:
        for case in golden[:warmup]:
            with suppress(httpx.HTTPError):  # the timed pass reports it
                client.post(endpoint, json={"texts": [case.text]})
        for case in golden:
            _replay_case(client, endpoint, case, score_tolerance, outcome)
    return outcome.report(bento_tag, len(golden))


@dataclass
class _ReplayOutcome:
    """What the timed pass of `replay` has seen so far."""

    matched: int = 0
    mismatches: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list)

    def report(self, bento_tag: str, n: int) -> ServedReport:
        """The report of `n` replayed cases, with latency percentiles (NaN when none)."""
        if self.latencies_ms:
            p50, p95 = (
                float(v) for v in np.percentile(self.latencies_ms, [50, 95], method="linear")
            )
            slowest = max(self.latencies_ms)
        else:
            p50 = p95 = slowest = math.nan
        return ServedReport(
            bento_tag=bento_tag,
            n=n,
            matched=self.matched,
            mismatches=self.mismatches,
            errors=self.errors,
            latencies_ms=self.latencies_ms,
            p50_ms=p50,
            p95_ms=p95,
            max_ms=slowest,
        )


def _replay_case(
    client: httpx.Client,
    endpoint: str,
    case: GoldenCase,
    score_tolerance: float,
    outcome: _ReplayOutcome,
) -> None:
    """Send one golden text, time it, and record the answer as matched, mismatched or error."""
    start = time.perf_counter()
    try:
        response = client.post(endpoint, json={"texts": [case.text]})
    except httpx.HTTPError as error:
        outcome.errors.append(f"{case.text!r}: {type(error).__name__}: {error}")
        return
    elapsed_ms = (time.perf_counter() - start) * 1000
    parsed = parse_answers(response, 1)
    answer = parsed if isinstance(parsed, str) else parsed[0]
    if isinstance(answer, str):
        outcome.errors.append(f"{case.text!r}: {answer}")
        return
    outcome.latencies_ms.append(elapsed_ms)
    label, score = answer
    if label == case.label and abs(score - case.score) <= score_tolerance:
        outcome.matched += 1
    else:
        outcome.mismatches.append(
            {
                "text": case.text,
                "offline_label": case.label,
                "served_label": label,
                "offline_score": case.score,
                "served_score": score,
            }
        )


def parse_answers(response: httpx.Response, expected: int) -> list[tuple[str, float]] | str:
    """The (label, score) per text of a `/classify` answer for `expected` texts, or a
    description of what is wrong with the response (also used by bench/serve.py)."""
    if response.status_code != 200:
        return f"HTTP {response.status_code}: {response.text[:BODY_EXCERPT_CHARS]}"
    try:
        body = response.json()
    except ValueError:
        return f"HTTP 200 but not JSON: {response.text[:BODY_EXCERPT_CHARS]}"
    if (
        isinstance(body, list)
        and len(body) == expected
        and all(
            isinstance(item, dict)
            and isinstance(item.get("label"), str)
            and isinstance(item.get("score"), int | float)
            and not isinstance(item.get("score"), bool)
            for item in body
        )
    ):
        return [(item["label"], float(item["score"])) for item in body]
    noun = "answer" if expected == 1 else "answers"
    return (
        f"HTTP 200 but not {expected} {{label, score}} {noun}: {response.text[:BODY_EXCERPT_CHARS]}"
    )


def check_served_bento(
    bento_tag: str,
    golden: Sequence[GoldenCase],
    *,
    workdir: Path,
    score_tolerance: float,
    ready_timeout_s: float = 120,
) -> ServedReport:
    """Serve `bento_tag` (see `serve_bento`), replay `golden` against it, then stop it.

    Raises:
        ServedCheckError: the bento could not be started or did not become ready.
    """
    if not golden:
        raise DataError("a served check needs at least one golden case")
    with serve_bento(bento_tag, workdir=workdir, ready_timeout_s=ready_timeout_s) as url:
        return replay(url, golden, score_tolerance=score_tolerance, bento_tag=bento_tag)


def served_gate_checks(params: Params, bento_tag: str, log: Callable[[str], None]) -> list[Check]:
    """Serve the bento for real, replay the golden requests, compare with offline answers."""
    golden = load_golden(evaluate_outputs(params).golden)
    with tempfile.TemporaryDirectory(prefix="textgate-served-") as workdir:
        try:
            report = check_served_bento(
                bento_tag,
                golden,
                workdir=Path(workdir),
                score_tolerance=params.gate.served_score_tolerance,
            )
        except ServedCheckError as error:
            return served_checks(None, params.gate, error=str(error))
    log(
        f"served bento {bento_tag}: {report.matched}/{report.n} golden answers match, "
        f"p50 {report.p50_ms:.1f} ms, p95 {report.p95_ms:.1f} ms"
    )
    return served_checks(report.to_dict(), params.gate)
