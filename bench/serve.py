"""Serving benchmark: the promoted bento against a plain transformers pipeline, in one run.

Both servers are started for real and driven with the same load: `--concurrency` clients send
`--requests` timed requests of `--texts-per-request` test-split texts each, after untimed
warm-up requests. The timed requests are split into `--rounds` rounds in which the servers take
turns (never both under load at once), so other load on the host weighs on both alike. For
each server it prints throughput, p50/p95/p99 latency and errors, its start-to-ready time
(launch to the first 200 from `/readyz`) and the RSS of all its processes after the load,
then the bento/baseline ratios and the targets (>= 4.5x throughput, p99 no worse, no errors,
the bento's RSS <= 700 MiB and start <= 5 s); with `--soak S`, the bento is then driven alone
for S seconds and the RSS of its process tree at the start and end is reported (growth under
10%). The last line printed on stdout is one JSON object with every figure.

    python -m bench.serve [--bento TAG] [--requests 2000] [--concurrency N] [--soak 60]

The baseline is `bench.baseline_app` under uvicorn: the same fine-tuned weights (the bento's
model from the BentoML store), fp32, one request at a time. Both get the same torch thread
count (`--threads`). Progress goes to stderr, results to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import numpy as np
import pandas as pd
import psutil

from bench.common import json_line, log, machine_info, non_negative_int, positive_int
from tasks.served import ServedCheckError, parse_answers, serve_bento
from textgate.artifacts import prepare_outputs
from textgate.config import PARAMS_FILE, load_params, resolve_paths
from textgate.errors import DataError, TextgateError
from textgate.process import ProcessStartError, free_port, start_process, wait_ready
from textgate.registry import Registry
from textgate.runtime import LEGACY_THREADS_ENV, THREADS_ENV, default_workers

ROOT = Path(__file__).resolve().parents[1]
BASELINE_APP = "bench.baseline_app:app"
BASELINE_LOG = "baseline-uvicorn.log"
# Environment variables read by bench/baseline_app.py and bentos/service.py.
BASELINE_MODEL_DIR_ENV = "TEXTGATE_BASELINE_MODEL_DIR"
BASELINE_THREADS_ENV = "TEXTGATE_BASELINE_THREADS"
# Bentos built before the rename read TEXTGATE_TORCH_THREADS, later ones TEXTGATE_THREADS
# (falling back to the old name): both are set, to the same value.
BENTO_THREADS_ENVS = (THREADS_ENV, LEGACY_THREADS_ENV)

MIN_THROUGHPUT_RATIO = 4.5  # bento throughput / baseline throughput
MAX_P99_RATIO = 1.0  # bento p99 / baseline p99: no worse
MAX_ERRORS = 0
MAX_RSS_MB = 700.0  # the bento's processes together, after the load
MAX_START_S = 5.0  # `bentoml serve` launched -> /readyz answers 200
MAX_RSS_GROWTH_PCT = 10.0
# --through-serve (issue: following production must cost the steady state nothing measurable)
MIN_FOLLOWING_THROUGHPUT_RATIO = 3.0  # through `textgate serve` / baseline
MAX_FOLLOWING_CPU_INCREASE_PCT = 5.0  # through `textgate serve` vs the same bento directly

READY_TIMEOUT_S = 120.0
READY_POLL_S = 0.1
RSS_SAMPLE_INTERVAL_S = 5.0
ERROR_SAMPLES = 5
MIB = 1024 * 1024


# --- load ------------------------------------------------------------------------------------


@dataclass
class LoadResult:
    """What one load run saw.

    `latencies_ms` holds the round trips of the requests answered correctly (HTTP 200 with one
    {label, score} per text), in completion order; every other request is an error. `labels`
    maps a request's index to the labels it got, so two servers can be compared.
    """

    wall_s: float
    texts_per_request: int
    latencies_ms: list[float] = field(default_factory=list)
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    labels: dict[int, tuple[str, ...]] = field(default_factory=dict)

    def record_error(self, message: str) -> None:
        self.errors += 1
        if len(self.error_samples) < ERROR_SAMPLES:
            self.error_samples.append(message)

    def extend(self, other: LoadResult) -> None:
        """Add another run's requests (of the same shape) to this one's."""
        self.wall_s += other.wall_s
        self.latencies_ms.extend(other.latencies_ms)
        self.errors += other.errors
        self.error_samples.extend(other.error_samples[: ERROR_SAMPLES - len(self.error_samples)])
        self.labels.update(other.labels)


def request_texts(texts: Sequence[str], index: int, per_request: int) -> list[str]:
    """The texts of request `index`: the next `per_request` texts, cycling through `texts`."""
    return [texts[(index * per_request + offset) % len(texts)] for offset in range(per_request)]


def parse_labels(response: httpx.Response, expected: int) -> tuple[str, ...] | str:
    """The labels of a valid answer, or a description of what is wrong with the response."""
    answers = parse_answers(response, expected)
    return answers if isinstance(answers, str) else tuple(label for label, _ in answers)


async def drive(
    url: str,
    texts: Sequence[str],
    *,
    concurrency: int,
    requests: int | None = None,
    duration_s: float | None = None,
    texts_per_request: int = 1,
    timeout_s: float = 60.0,
    first_index: int = 0,
    source: str | None = None,
) -> LoadResult:
    """Send requests from `concurrency` concurrent clients; return what they saw.

    The clients take request indices from one shared counter, starting at `first_index`, until
    `requests` have been sent, or until `duration_s` has passed (give one or both). Each request is
    `POST {url}/classify {"texts": [...]}` with `texts_per_request` texts (`request_texts`).
    The wall time runs from the first request to the last answer. `source`: the address the
    clients connect from (None: any).
    """
    if requests is None and duration_s is None:
        raise ValueError("drive needs a number of requests, a duration, or both")
    if not texts:
        raise DataError("the benchmark needs at least one text")
    endpoint = f"{url.rstrip('/')}/classify"
    result = LoadResult(wall_s=0.0, texts_per_request=texts_per_request)
    next_index = first_index
    last_index = None if requests is None else first_index + requests
    deadline: float | None = None  # set when the clients start

    async def client_loop(session: aiohttp.ClientSession) -> None:
        nonlocal next_index
        while (last_index is None or next_index < last_index) and (
            deadline is None or time.perf_counter() < deadline
        ):
            index = next_index  # one event loop: no other client runs between these lines
            next_index += 1
            batch = request_texts(texts, index, texts_per_request)
            sent = time.perf_counter()
            try:
                async with session.post(endpoint, json={"texts": batch}) as response:
                    status, body = response.status, await response.read()
            except (TimeoutError, aiohttp.ClientError, OSError) as error:
                result.record_error(f"{type(error).__name__}: {error}")
                continue
            elapsed_ms = (time.perf_counter() - sent) * 1000
            answer = parse_labels(httpx.Response(status, content=body), len(batch))
            if isinstance(answer, str):
                result.record_error(answer)
                continue
            result.latencies_ms.append(elapsed_ms)
            result.labels[index] = answer

    # aiohttp, not httpx, drives the load: on the same cores as the server, httpx's async
    # client spent about 3 ms of CPU per request against aiohttp's 0.15 ms (measured against
    # a trivial ASGI app), which would have been taken from the server being measured.
    # trust_env=False (the default): a proxy in the environment must not see loopback requests.
    local_addr = None if source is None else (source, 0)
    connector = aiohttp.TCPConnector(limit=concurrency, local_addr=local_addr)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        start = time.perf_counter()
        deadline = None if duration_s is None else start + duration_s
        await asyncio.gather(*(client_loop(session) for _ in range(concurrency)))
        result.wall_s = time.perf_counter() - start
    return result


def summarize(result: LoadResult) -> dict[str, Any]:
    """Throughput (answered requests and texts per wall second), latency percentiles, errors.

    Percentiles are over answered requests only (NaN when there are none).
    """
    ok = len(result.latencies_ms)
    if ok:
        latencies = np.asarray(result.latencies_ms)
        p50, p95, p99 = (float(v) for v in np.percentile(latencies, [50, 95, 99]))
        mean, slowest = float(latencies.mean()), float(latencies.max())
    else:
        p50 = p95 = p99 = mean = slowest = math.nan
    wall = result.wall_s
    return {
        "requests": ok + result.errors,
        "ok": ok,
        "errors": result.errors,
        "texts_per_request": result.texts_per_request,
        "wall_s": wall,
        "throughput_rps": ok / wall if wall > 0 else math.nan,
        "texts_per_s": ok * result.texts_per_request / wall if wall > 0 else math.nan,
        "p50_ms": p50,
        "p95_ms": p95,
        "p99_ms": p99,
        "mean_ms": mean,
        "max_ms": slowest,
        "error_samples": list(result.error_samples),
    }


def label_agreement(first: LoadResult, second: LoadResult) -> float:
    """Share of requests answered by both runs with the same labels (NaN when none)."""
    common = first.labels.keys() & second.labels.keys()
    if not common:
        return math.nan
    return sum(first.labels[i] == second.labels[i] for i in common) / len(common)


# --- servers ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Server:
    """A running server: its base URL, its root process (workers are its descendants) and the
    seconds from its launch to its first 200 from `/readyz`."""

    url: str
    pid: int
    start_s: float = math.nan
    # Processes counted without their descendants: `textgate serve`'s supervisor (where its
    # proxy runs), whose descendants are the bentos it serves (counted from `pid`).
    alone: tuple[int, ...] = ()
    # The address to connect from: a bento on a slot of `textgate serve`'s steered port is
    # reached directly from its slot's source (textgate.reuseport).
    source: str | None = None

    def processes(self) -> list[psutil.Process]:
        """The server's process tree, and the `alone` processes."""
        return [*process_tree(self.pid), *(psutil.Process(pid) for pid in self.alone)]


def process_tree(pid: int) -> list[psutil.Process]:
    """A process and all its descendants (BentoML's workers run in sessions of their own)."""
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def tree_rss_bytes(processes: Sequence[psutil.Process]) -> int:
    """The summed resident set size of the processes still running (shared pages count twice)."""
    total = 0
    for process in processes:
        with suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            total += process.memory_info().rss
    return total


def tree_cpu_seconds(processes: Sequence[psutil.Process]) -> float:
    """The user + system CPU time the processes still running have used so far."""
    total = 0.0
    for process in processes:
        with suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            times = process.cpu_times()
            total += times.user + times.system
    return total


def thread_env(threads: int) -> dict[str, str]:
    """Environment that caps a server's compute threads (torch reads OMP_NUM_THREADS too)."""
    return {
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "false",
    }


@contextmanager
def serve_baseline(
    model_dir: str | Path,
    *,
    threads: int,
    workdir: Path,
    ready_timeout_s: float = READY_TIMEOUT_S,
) -> Iterator[Server]:
    """Run the baseline app under uvicorn (one worker) on a free loopback port until exit."""
    port = free_port()
    log = Path(workdir) / BASELINE_LOG
    env = {
        **os.environ,
        **thread_env(threads),
        BASELINE_MODEL_DIR_ENV: str(model_dir),
        BASELINE_THREADS_ENV: str(threads),
    }
    command = [sys.executable, "-m", "uvicorn", BASELINE_APP, "--app-dir", str(ROOT)]
    command += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    command += ["--no-access-log", "--log-level", "warning"]
    launched = time.perf_counter()
    with start_process(command, env=env, cwd=workdir, log_path=log, name="the baseline") as process:
        url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(process, f"{url}/readyz", ready_timeout_s, poll_s=READY_POLL_S)
        except ProcessStartError as error:
            raise ServedCheckError(str(error)) from error
        yield Server(url=url, pid=process.pid, start_s=time.perf_counter() - launched)


@contextmanager
def serve_bento_server(bento_tag: str, *, threads: int | None, workdir: Path) -> Iterator[Server]:
    """`tasks.served.serve_bento` with `threads` torch threads, and its server process found.

    The server is the one child of this process that appeared while the bento started.
    """
    before = {child.pid for child in psutil.Process().children()}
    # None: the bento's own defaults (workers and threads shared out over the cores).
    env = (
        {}
        if threads is None
        else {**thread_env(threads), **dict.fromkeys(BENTO_THREADS_ENVS, str(threads))}
    )
    launched = time.perf_counter()
    with serve_bento(bento_tag, workdir=workdir, env=env, ready_timeout_s=READY_TIMEOUT_S) as url:
        start_s = time.perf_counter() - launched
        started = [child for child in psutil.Process().children() if child.pid not in before]
        if len(started) != 1:
            raise ServedCheckError(
                f"expected one new `bentoml serve` process, found {[p.pid for p in started]}"
            )
        yield Server(url=url, pid=started[0].pid, start_s=start_s)


@contextmanager
def serve_following(
    bento_tag: str, model_tag: str, *, workdir: Path
) -> Iterator[tuple[Server, Server]]:
    """`textgate serve` following a throwaway registry whose production is `bento_tag`.

    Yields the bento it started, reached directly (its private port, or its slot of the
    steered port from the slot's source address; its process tree), and the same bento
    through `textgate serve`'s port (the same tree plus the supervisor, where the proxy runs):
    the cost of following, on the same bento process.
    """
    from bench.switch import serve_state, start_serve, wait_serving
    from textgate.registry import Release

    work = Path(workdir) / "following"
    work.mkdir()
    release = Release.create(
        bento_tag=bento_tag, model_tag=model_tag, reason="bench.serve --through-serve"
    )
    Registry(work / "state" / "registry.json").promote(release)
    port = free_port()
    launched = time.perf_counter()
    supervisor = start_serve(work, port)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_serving(url, bento_tag, supervisor, READY_TIMEOUT_S)
        start_s = time.perf_counter() - launched
        bento = serve_state(work, port)["bentos"][0]
        bento_pid = int(bento["processes"][0][0])
        yield (
            Server(url=bento["url"], pid=bento_pid, source=bento.get("source")),
            Server(url=url, pid=bento_pid, start_s=start_s, alone=(supervisor.pid,)),
        )
    finally:
        supervisor.send_signal(signal.SIGTERM)
        try:
            supervisor.wait(timeout=120)
        except subprocess.TimeoutExpired:
            supervisor.kill()


def following_summary(
    direct: dict[str, Any], served: dict[str, Any], baseline: dict[str, Any]
) -> dict[str, Any]:
    """What following costs: `textgate serve` against the same bento reached directly."""
    return {
        "bento_direct": direct,
        "textgate_serve": served,
        "throughput_ratio": ratio(served["throughput_rps"], baseline["throughput_rps"]),
        "cpu_increase_pct": 100
        * (ratio(served["cpu_ms_per_request"], direct["cpu_ms_per_request"]) - 1),
    }


# --- the benchmark ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    """The command line, parsed."""

    params: Path
    bento: str | None
    requests: int
    concurrency: int
    texts_per_request: int
    warmup: int
    soak_s: float
    threads: int
    timeout_s: float
    bento_threads: int | None = None
    rounds: int = 4
    through_serve: bool = False


def load_texts(params_path: Path, split: str = "test") -> list[str]:
    """A split's texts (`<prepare.output_dir>/<split>.parquet`, column `text`): the test
    split by default."""
    params = resolve_paths(load_params(params_path), params_path.resolve().parent)
    path = prepare_outputs(params).split(split)
    if not path.is_file():
        raise DataError(f"{path} not found: run the prepare stage first (`dvc repro prepare`)")
    texts = [str(text) for text in pd.read_parquet(path, columns=["text"])["text"]]
    if not texts:
        raise DataError(f"{path} has no texts")
    return texts


def production_bento(params_path: Path) -> str:
    """The production bento tag from the registry (`registry.path`, relative to params)."""
    params = resolve_paths(load_params(params_path), params_path.resolve().parent)
    release = Registry(params.registry.path).production()
    if release is None:
        raise TextgateError(
            f"nothing in production ({params.registry.path}); run the pipeline or pass --bento"
        )
    return release.bento_tag


def bento_model(bento_tag: str) -> tuple[str, str, Path]:
    """The exact bento tag, and the tag and directory of the one model it serves."""
    import bentoml  # slow to import: only when a bento is really benchmarked

    try:
        bento = bentoml.bentos.get(bento_tag)
    except bentoml.exceptions.NotFound:
        raise TextgateError(f"bento {bento_tag} is not in the BentoML store") from None
    models = [str(model.tag) for model in bento.info.all_models]
    if len(models) != 1:
        raise TextgateError(f"bento {bento.tag} should serve exactly one model, it has {models}")
    try:
        model = bentoml.models.get(models[0])
    except bentoml.exceptions.NotFound:
        raise TextgateError(f"model {models[0]} of bento {bento.tag} is not in the store") from None
    return str(bento.tag), models[0], Path(model.path)


def warm_up(name: str, server: Server, texts: Sequence[str], options: Options) -> None:
    """Untimed requests, so that lazy initialisation is not measured."""
    log(f"{name}: {options.warmup} warm-up request(s)")
    if options.warmup:
        asyncio.run(
            drive(
                server.url,
                texts,
                concurrency=options.concurrency,
                requests=options.warmup,
                texts_per_request=options.texts_per_request,
                timeout_s=options.timeout_s,
                source=server.source,
            )
        )


@dataclass
class Measured:
    """One server's timed load, accumulated over the rounds."""

    name: str
    server: Server
    result: LoadResult
    cpu_s: float = 0.0
    round_rps: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        summary = summarize(self.result)
        processes = self.server.processes()
        # CPU time per answered request: less sensitive than wall time to other load on the host.
        summary["server_cpu_s"] = self.cpu_s
        ok = summary["ok"]
        summary["cpu_ms_per_request"] = self.cpu_s * 1000 / ok if ok else math.nan
        summary["rss_mb"] = tree_rss_bytes(processes) / MIB
        summary["processes"] = len(processes)
        summary["start_s"] = self.server.start_s
        summary["round_throughput_rps"] = self.round_rps
        return summary


def round_sizes(requests: int, rounds: int) -> list[int]:
    """`requests` split into `rounds` near-equal parts (none empty)."""
    rounds = max(1, min(rounds, requests))
    return [requests // rounds + (1 if index < requests % rounds else 0) for index in range(rounds)]


def measure_rounds(
    servers: Sequence[tuple[str, Server]], texts: Sequence[str], options: Options
) -> list[Measured]:
    """Drive each server in turn, round after round, with the same requests.

    In round r every server gets the same slice of request indices, one server at a time (never
    two under load at once). Alternating in rounds spreads any other load on the host (other
    processes, thermal or frequency changes) over all servers instead of one.
    """
    measured = [
        Measured(name, server, LoadResult(0.0, options.texts_per_request))
        for name, server in servers
    ]
    first = 0
    sizes = round_sizes(options.requests, options.rounds)
    for number, size in enumerate(sizes, start=1):
        for item in measured:
            processes = item.server.processes()
            cpu_before = tree_cpu_seconds(processes)
            result = asyncio.run(
                drive(
                    item.server.url,
                    texts,
                    concurrency=options.concurrency,
                    requests=size,
                    texts_per_request=options.texts_per_request,
                    timeout_s=options.timeout_s,
                    first_index=first,
                    source=item.server.source,
                )
            )
            item.cpu_s += tree_cpu_seconds(processes) - cpu_before
            rps = len(result.latencies_ms) / result.wall_s if result.wall_s > 0 else 0.0
            item.round_rps.append(rps)
            item.result.extend(result)
            log(
                f"round {number}/{len(sizes)}: {item.name} {size} request(s), {rps:.1f} req/s, "
                f"{result.errors} error(s)"
            )
        first += size
    return measured


async def soak(server: Server, texts: Sequence[str], options: Options) -> dict[str, Any]:
    """Drive the server for `options.soak_s` seconds; its process tree's RSS at start and end."""
    processes = process_tree(server.pid)  # before the load: workers included
    start_rss = tree_rss_bytes(processes)
    samples = [start_rss]

    async def sample_rss() -> None:
        while True:
            await asyncio.sleep(RSS_SAMPLE_INTERVAL_S)
            samples.append(tree_rss_bytes(processes))

    sampler = asyncio.create_task(sample_rss())
    try:
        result = await drive(
            server.url,
            texts,
            concurrency=options.concurrency,
            duration_s=options.soak_s,
            texts_per_request=options.texts_per_request,
            timeout_s=options.timeout_s,
        )
    finally:
        sampler.cancel()
    with suppress(psutil.NoSuchProcess):  # a worker started during the soak counts too
        known = {process.pid for process in processes}
        processes += [p for p in process_tree(server.pid) if p.pid not in known]
    end_rss = tree_rss_bytes(processes)
    samples.append(end_rss)
    summary = summarize(result)
    summary.update(
        seconds=options.soak_s,
        processes=len(processes),
        rss_start_mb=start_rss / MIB,
        rss_end_mb=end_rss / MIB,
        rss_peak_mb=max(samples) / MIB,
        rss_growth_pct=(end_rss / start_rss - 1) * 100 if start_rss else math.nan,
    )
    return summary


def ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator, NaN where it is undefined."""
    if denominator == 0 or math.isnan(numerator) or math.isnan(denominator):
        return math.nan
    return numerator / denominator


def evaluate_targets(
    bento: dict[str, Any],
    baseline: dict[str, Any],
    soak_summary: dict[str, Any] | None,
    following: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Each target with its value, threshold and verdict, and whether all are met.

    A NaN value (nothing answered) fails its target.
    """

    def check(value: float, threshold: float, met: bool) -> dict[str, Any]:
        return {"value": value, "threshold": threshold, "passed": bool(met)}

    throughput = ratio(bento["throughput_rps"], baseline["throughput_rps"])
    p99 = ratio(bento["p99_ms"], baseline["p99_ms"])
    checks = {
        "throughput_ratio": check(
            throughput, MIN_THROUGHPUT_RATIO, throughput >= MIN_THROUGHPUT_RATIO
        ),
        "p99_ratio": check(p99, MAX_P99_RATIO, p99 <= MAX_P99_RATIO),
        "errors": check(bento["errors"], MAX_ERRORS, bento["errors"] <= MAX_ERRORS),
    }
    for key, limit in (("rss_mb", MAX_RSS_MB), ("start_s", MAX_START_S)):
        if key in bento:  # NaN (not measured) fails
            checks[key] = check(bento[key], limit, bento[key] <= limit)
    if following is not None:
        through = following["throughput_ratio"]
        checks["following_throughput_ratio"] = check(
            through, MIN_FOLLOWING_THROUGHPUT_RATIO, through >= MIN_FOLLOWING_THROUGHPUT_RATIO
        )
        increase = following["cpu_increase_pct"]
        checks["following_cpu_increase_pct"] = check(
            increase, MAX_FOLLOWING_CPU_INCREASE_PCT, increase <= MAX_FOLLOWING_CPU_INCREASE_PCT
        )
        served_errors = following["textgate_serve"]["errors"]
        checks["following_errors"] = check(served_errors, MAX_ERRORS, served_errors <= MAX_ERRORS)
    if soak_summary is not None:
        growth = soak_summary["rss_growth_pct"]
        checks["soak_rss_growth_pct"] = check(
            growth, MAX_RSS_GROWTH_PCT, growth < MAX_RSS_GROWTH_PCT
        )
        checks["soak_errors"] = check(
            soak_summary["errors"], MAX_ERRORS, soak_summary["errors"] <= MAX_ERRORS
        )
    return {**checks, "passed": all(c["passed"] for c in checks.values())}


def build_report(
    *,
    bento: dict[str, Any],
    baseline: dict[str, Any],
    soak_summary: dict[str, Any] | None,
    agreement: float,
    config: dict[str, Any],
    machine: dict[str, Any],
    following: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The whole result, as printed on the JSON last line."""
    return {
        "following": following,
        "bento": bento,
        "baseline": baseline,
        "throughput_ratio": ratio(bento["throughput_rps"], baseline["throughput_rps"]),
        "p99_ratio": ratio(bento["p99_ms"], baseline["p99_ms"]),
        "label_agreement": agreement,
        "targets": evaluate_targets(bento, baseline, soak_summary, following),
        "soak": soak_summary,
        "config": config,
        "machine": machine,
    }


def format_report(report: dict[str, Any]) -> str:
    """A readable table, the ratios and one [pass]/[FAIL] line per target."""
    bento, baseline = report["bento"], report["baseline"]
    rows = [  # title, key, format, whether a bento/baseline ratio is shown
        ("requests", "requests", "{:.0f}", False),
        ("errors", "errors", "{:.0f}", False),
        ("wall time (s)", "wall_s", "{:.1f}", False),
        ("throughput (req/s)", "throughput_rps", "{:.1f}", True),
        ("throughput (texts/s)", "texts_per_s", "{:.1f}", True),
        ("p50 latency (ms)", "p50_ms", "{:.1f}", True),
        ("p95 latency (ms)", "p95_ms", "{:.1f}", True),
        ("p99 latency (ms)", "p99_ms", "{:.1f}", True),
        ("max latency (ms)", "max_ms", "{:.1f}", False),
        ("server CPU/request (ms)", "cpu_ms_per_request", "{:.1f}", True),
        ("server RSS after (MiB)", "rss_mb", "{:.0f}", True),
        ("server processes", "processes", "{:.0f}", False),
        ("start to ready (s)", "start_s", "{:.1f}", True),
    ]

    def cell(summary: dict[str, Any], key: str, pattern: str) -> str:
        value = summary.get(key)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "n/a"
        return pattern.format(value)

    lines = [f"{'':24}{'baseline':>12}{'bento':>12}{'bento/baseline':>16}"]
    for title, key, pattern, compare in rows:
        relative = ""
        if compare:
            value = ratio(bento.get(key, math.nan), baseline.get(key, math.nan))
            relative = "n/a" if math.isnan(value) else f"{value:.2f}x"
        lines.append(
            f"{title:24}{cell(baseline, key, pattern):>12}{cell(bento, key, pattern):>12}"
            f"{relative:>16}"
        )
    for name, summary in (("baseline", baseline), ("bento", bento)):
        for sample in summary.get("error_samples", []):
            lines.append(f"{name} error: {sample}")
    rounds = [(report[name].get("round_throughput_rps") or []) for name in ("baseline", "bento")]
    if len(rounds[0]) > 1 and len(rounds[0]) == len(rounds[1]):
        ratios = ", ".join(
            f"{ratio(bento, baseline):.2f}x" for baseline, bento in zip(*rounds, strict=True)
        )
        lines.append(f"throughput ratio per round: {ratios}")
    agreement = report["label_agreement"]
    if not math.isnan(agreement):
        lines.append(f"label agreement (same requests): {agreement:.2%}")
    following = report.get("following")
    if following is not None:
        direct, served = following["bento_direct"], following["textgate_serve"]
        lines.append(
            "following production (the bento textgate serve started, directly | through "
            "textgate serve):"
        )
        for title, key, pattern in (
            ("  requests, errors", "errors", "{:.0f}"),
            ("  throughput (req/s)", "throughput_rps", "{:.1f}"),
            ("  p50 latency (ms)", "p50_ms", "{:.1f}"),
            ("  p99 latency (ms)", "p99_ms", "{:.1f}"),
            ("  server CPU/request (ms)", "cpu_ms_per_request", "{:.2f}"),
        ):
            if key == "errors":
                left = f"{direct['requests']}, {direct['errors']}"
                right = f"{served['requests']}, {served['errors']}"
            else:
                left, right = cell(direct, key, pattern), cell(served, key, pattern)
            lines.append(f"{title:28}{left:>12} | {right:<12}")
        lines.append(
            f"  textgate serve: {following['throughput_ratio']:.2f}x the baseline's throughput, "
            f"CPU per request {following['cpu_increase_pct']:+.1f}% over the bento directly"
        )
    soak_summary = report["soak"]
    if soak_summary is not None:
        lines.append(
            f"soak {soak_summary['seconds']:.0f} s: {soak_summary['requests']} request(s), "
            f"{soak_summary['errors']} error(s), {soak_summary['throughput_rps']:.1f} req/s; "
            f"RSS of {soak_summary['processes']} process(es) {soak_summary['rss_start_mb']:.0f} "
            f"-> {soak_summary['rss_end_mb']:.0f} MiB (peak {soak_summary['rss_peak_mb']:.0f}), "
            f"growth {soak_summary['rss_growth_pct']:+.1f}%"
        )
    machine = report.get("machine", {})
    if "load_average" in machine:
        lines.append(
            f"load average (1/5/15 min): {machine['load_average']} at the start, "
            f"{machine.get('load_average_end', 'n/a')} at the end"
        )
    targets = report["targets"]
    descriptions = {  # title, value format, threshold format
        "throughput_ratio": ("bento/baseline throughput", "{:.2f}x", ">= {:.1f}x"),
        "p99_ratio": ("bento/baseline p99 latency", "{:.2f}x", "<= {:.1f}x"),
        "errors": ("bento errors", "{:.0f}", "<= {:.0f}"),
        "rss_mb": ("bento RSS, all processes", "{:.0f} MiB", "<= {:.0f} MiB"),
        "start_s": ("bento start to ready", "{:.1f} s", "<= {:.1f} s"),
        "soak_rss_growth_pct": ("soak RSS growth", "{:+.1f}%", "< {:.0f}%"),
        "soak_errors": ("soak errors", "{:.0f}", "<= {:.0f}"),
        "following_throughput_ratio": (
            "textgate serve/baseline throughput",
            "{:.2f}x",
            ">= {:.1f}x",
        ),
        "following_cpu_increase_pct": (
            "textgate serve CPU/request over the bento directly",
            "{:+.1f}%",
            "<= {:.0f}%",
        ),
        "following_errors": ("textgate serve errors", "{:.0f}", "<= {:.0f}"),
    }
    for key, (title, shown, bound) in descriptions.items():
        if key not in targets:
            continue
        target = targets[key]
        value = "n/a" if math.isnan(target["value"]) else shown.format(target["value"])
        verdict = "pass" if target["passed"] else "FAIL"
        lines.append(f"[{verdict}] {title}: {value} (target {bound.format(target['threshold'])})")
    lines.append(f"all targets met: {'yes' if targets['passed'] else 'no'}")
    return "\n".join(lines)


def run(options: Options) -> dict[str, Any]:
    """Benchmark the baseline, then the bento (then soak it); return the report."""
    texts = load_texts(options.params)
    bento_tag, model_tag, model_dir = bento_model(options.bento or production_bento(options.params))
    machine = machine_info("torch", "transformers", "bentoml", "onnxruntime", "tokenizers")
    config = {
        "bento_tag": bento_tag,
        "model_tag": model_tag,
        "requests": options.requests,
        "concurrency": options.concurrency,
        "texts_per_request": options.texts_per_request,
        "warmup": options.warmup,
        "rounds": options.rounds,
        "threads": options.threads,
        "bento_threads": options.bento_threads or "bento defaults",
        "test_texts": len(texts),
    }
    log(f"bento {bento_tag}, model {model_tag}, {len(texts)} test texts, {options.threads} threads")
    soak_summary = None
    following = None
    with tempfile.TemporaryDirectory(prefix="textgate-bench-") as tmp, ExitStack() as baseline_up:
        workdir = Path(tmp)
        log("baseline: starting uvicorn")
        baseline_server = baseline_up.enter_context(
            serve_baseline(model_dir, threads=options.threads, workdir=workdir)
        )
        log(f"bento: starting bentoml serve {bento_tag}")
        with serve_bento_server(
            bento_tag, threads=options.bento_threads, workdir=workdir
        ) as bento_server:
            servers = [("baseline", baseline_server), ("bento", bento_server)]
            if options.through_serve:
                log(f"textgate serve: following a registry whose production is {bento_tag}")
                direct, proxied = baseline_up.enter_context(
                    serve_following(bento_tag, model_tag, workdir=workdir)
                )
                servers += [("followed bento, directly", direct), ("textgate serve", proxied)]
            for name, server in servers:
                warm_up(name, server, texts, options)
            log(
                f"{options.requests} timed request(s) per server from {options.concurrency} "
                f"client(s), in {options.rounds} alternating round(s)"
            )
            measured = measure_rounds(servers, texts, options)
            baseline_measured, bento_measured = measured[:2]
            baseline, bento = baseline_measured.summary(), bento_measured.summary()
            if options.through_serve:
                following = following_summary(
                    measured[2].summary(), measured[3].summary(), baseline
                )
            baseline_result, bento_result = baseline_measured.result, bento_measured.result
            baseline_up.close()  # the soak drives the bento alone
            if options.soak_s > 0:
                log(f"bento: soak for {options.soak_s:.0f} s")
                soak_summary = asyncio.run(soak(bento_server, texts, options))
    machine["load_average_end"] = [round(value, 2) for value in os.getloadavg()]
    return build_report(
        bento=bento,
        baseline=baseline,
        soak_summary=soak_summary,
        agreement=label_agreement(baseline_result, bento_result),
        config=config,
        machine=machine,
        following=following,
    )


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def default_concurrency(params_path: Path) -> int:
    """As many clients as the bento takes requests at once: workers x serve.max_concurrency."""
    return default_workers() * load_params(params_path).serve.max_concurrency


def parse_args(argv: Sequence[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(
        prog="python -m bench.serve", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--params", type=Path, default=Path(PARAMS_FILE))
    parser.add_argument("--bento", help="bento tag (default: production, from the registry)")
    parser.add_argument("--requests", type=positive_int, default=2000, help="timed requests")
    parser.add_argument(
        "--concurrency",
        type=positive_int,
        default=None,
        help="clients (default: the bento's workers x serve.max_concurrency, what it takes "
        "at once; more get 503s)",
    )
    parser.add_argument("--texts-per-request", type=positive_int, default=1)
    parser.add_argument(
        "--warmup",
        type=non_negative_int,
        default=64,
        help="untimed requests before the timed ones",
    )
    parser.add_argument(
        "--soak", type=_non_negative_float, default=0.0, help="soak seconds (0 = off)"
    )
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=len(os.sched_getaffinity(0)),
        help="torch threads of each server (default: the CPUs this process may use)",
    )
    parser.add_argument(
        "--bento-threads",
        type=positive_int,
        default=None,
        help="the bento's threads per worker (default: its own defaults, which share the cores "
        "out between its workers; the baseline keeps --threads)",
    )
    parser.add_argument("--timeout", type=float, default=60.0, help="per-request timeout (s)")
    parser.add_argument(
        "--through-serve",
        action="store_true",
        help="also start `textgate serve` following a registry whose production is the bento, "
        "and measure it against the same bento reached directly",
    )
    parser.add_argument(
        "--rounds",
        type=positive_int,
        default=4,
        help="the timed requests are split into this many rounds, the servers taking turns",
    )
    args = parser.parse_args(argv)
    return Options(
        params=args.params,
        bento=args.bento,
        requests=args.requests,
        concurrency=args.concurrency or default_concurrency(args.params),
        texts_per_request=args.texts_per_request,
        warmup=args.warmup,
        soak_s=args.soak,
        threads=args.threads,
        bento_threads=args.bento_threads,
        timeout_s=args.timeout,
        rounds=args.rounds,
        through_serve=args.through_serve,
    )


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_args(argv)
    # Stopped with SIGTERM (kill, timeout): exit through the context managers, which stop the
    # servers this run started.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        report = run(options)
    except TextgateError as error:
        print(f"bench.serve: {error}", file=sys.stderr)
        return 2
    print(format_report(report))
    print(json_line(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
