"""Switch benchmark: live traffic on `textgate serve` while production is promoted, then
rolled back, and what following the registry costs in steady state.

    python -m bench.switch [--clients 32] [--steady 15] [--overhead-rounds 3]

It builds two tiny bentos (random BERTs, MiniLM tokenizer: no download) in a throwaway
BentoML home and registry, starts `textgate serve` on them, and then:

1. overhead (the baseline, in the same run): rounds of `--round-s` seconds in which the same
   clients drive the serving bento directly (its private port, or its slot of the steered
   port from the slot's own source address) and through `textgate serve`,
   taking turns; throughput of each and CPU seconds per request (the bento's process tree,
   plus the supervisor when going through it);
2. switch: `--clients` clients send `/classify` for `--steady` seconds, production is promoted
   to the other bento, `--steady` seconds after the new bento's first answer it is rolled
   back, and `--steady` seconds after that the load stops.

It prints requests, errors, p50/p99 latency in steady state (requests sent outside every
switch window), while the candidate starts (from the registry change to the first answer by
the new bento) and within 5 s of each switch (the first answer by the new bento), how long
each switch took from the registry change to that first answer, answers by the old bento to
requests sent after it (flapping), then one JSON line. Targets: 0 errors, 0 flapping, p99
within 5 s of a switch at most 2x steady p99, switch under 10 s; through `textgate serve`,
CPU per request at most 5% over serving the bento directly.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import psutil
import yaml

from bench.common import json_line, log, machine_info, positive_int
from bench.workspace import build_tiny_bert, merge
from textgate.config import PARAMS_FILE
from textgate.process import free_port
from textgate.registry import Registry, Release
from textgate.requestlog import REQUEST_LOG_ENV

ROOT = Path(__file__).resolve().parents[1]
WINDOW_S = 5.0
MAX_SWITCH_S = 10.0
MAX_SWITCH_P99_RATIO = 2.0
MAX_CPU_INCREASE_PCT = 5.0
TEXTS = ["I lost my card", "please refund my order", "cannot sign in", "hello there"]


@dataclass
class Answer:
    sent: float
    done: float
    status: int
    tag: str | None


@dataclass
class Traffic:
    answers: list[Answer] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


async def drive(
    url: str, clients: int, stop: asyncio.Event, traffic: Traffic, source: str | None = None
) -> None:
    """`clients` clients sending one-text `/classify` requests back to back until `stop`,
    connecting from `source` (None: any address)."""

    async def client(session: aiohttp.ClientSession, index: int) -> None:
        n = index
        while not stop.is_set():
            text = TEXTS[n % len(TEXTS)]
            n += clients
            sent = time.monotonic()
            try:
                async with session.post(f"{url}/classify", json={"texts": [text]}) as response:
                    await response.read()
                    status, tag = response.status, response.headers.get("x-textgate-model")
            except (TimeoutError, aiohttp.ClientError, OSError) as error:
                status, tag = 0, None
                traffic.errors.append(f"{type(error).__name__}: {error}")
            if status != 200 and status != 0:
                traffic.errors.append(f"HTTP {status}")
            traffic.answers.append(Answer(sent, time.monotonic(), status, tag))

    local_addr = None if source is None else (source, 0)
    connector = aiohttp.TCPConnector(limit=clients, local_addr=local_addr)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(client(session, i) for i in range(clients)))


def percentiles(answers: list[Answer]) -> dict[str, float | int | None]:
    latencies = [(a.done - a.sent) * 1000 for a in answers if a.status == 200]
    if not latencies:
        return {"requests": len(answers), "p50_ms": None, "p99_ms": None}
    p50, p99 = (float(v) for v in np.percentile(latencies, [50, 99]))
    return {"requests": len(answers), "p50_ms": round(p50, 1), "p99_ms": round(p99, 1)}


# --- the workspace ---------------------------------------------------------------------------


def build_bentos(work: Path, clients: int) -> list[Release]:
    """Two tiny bentos (different random encoders, int8 CPU bentos) in the current
    BENTOML_HOME.

    Their serve.max_concurrency is `clients`: the benchmark is about switching, not about
    the overload answer that more clients than 8 per worker would get.
    """
    from tasks.package import package_model
    from textgate.config import load_params
    from textgate.export import export_onnx
    from textgate.model import build_classifier, save_classifier

    params = load_params(ROOT / PARAMS_FILE)
    serve = params.serve.model_copy(update={"max_concurrency": clients})
    params = params.model_copy(update={"serve": serve})
    releases = []
    for seed in (0, 1):
        base = build_tiny_bert(work / f"tiny-bert-{seed}", seed=seed)
        model, tokenizer = build_classifier(str(base), ["lost_card", "login", "refund"])
        metadata = {"max_length": 32, "redact_pii": True, "base_model": str(base)}
        model_dir = save_classifier(
            model, tokenizer, ["lost_card", "login", "refund"], metadata, work / f"model-{seed}"
        )
        # With its int8 ONNX export the model gets the CPU bento (no torch), as the pipeline's
        # models do on CPUs: the switch starts what production would start.
        export_onnx(model_dir)
        packaged = package_model(model_dir, params=params, metrics={}, lineage={})
        releases.append(
            Release.create(
                bento_tag=packaged.bento_tag, model_tag=packaged.model_tag, reason=f"bench {seed}"
            )
        )
    return releases


def start_serve(work: Path, port: int) -> subprocess.Popen[bytes]:
    params_file = work / PARAMS_FILE
    overrides = {
        "registry": {"path": str(work / "state" / "registry.json")},
        "evaluate": {"output_dir": str(work / "evaluate")},
    }
    raw = yaml.safe_load((ROOT / PARAMS_FILE).read_text(encoding="utf-8"))
    params_file.write_text(yaml.safe_dump(merge(raw, overrides)), encoding="utf-8")
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "TEXTGATE_API_KEY": "",
        REQUEST_LOG_ENV: str(work / "requests.jsonl"),
        "PREFECT_API_URL": "",
    }
    command = [sys.executable, "-m", "flows.cli", "serve", "--params", str(params_file)]
    with (work / "serve.log").open("wb") as handle:
        return subprocess.Popen(
            [*command, "--port", str(port)],
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            cwd=work,
        )


def serve_state(work: Path, port: int) -> dict[str, Any]:
    return json.loads((work / "state" / f"serve-{port}.json").read_text(encoding="utf-8"))


def wait_serving(url: str, tag: str, serve: subprocess.Popen[bytes], timeout_s: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if serve.poll() is not None:
            raise SystemExit(f"textgate serve exited with {serve.returncode}")
        try:
            response = httpx.post(f"{url}/classify", json={"texts": ["hi"]}, timeout=10)
            if response.headers.get("x-textgate-model") == tag:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{tag} was not served within {timeout_s:.0f} s")


# --- the overhead of following: direct vs through textgate serve ----------------------------


def tree_cpu_s(pids: list[int], alone: tuple[int, ...] = ()) -> float:
    """CPU seconds (user + system) used so far by `pids` and all their descendants, plus by
    the processes `alone` without theirs (the supervisor: its children are the bentos)."""
    total = 0.0
    for pid in [*pids, *alone]:
        try:
            root = psutil.Process(pid)
            processes = [root, *([] if pid in alone else root.children(recursive=True))]
        except psutil.Error:
            continue
        for process in processes:
            try:
                times = process.cpu_times()
                total += times.user + times.system
            except psutil.Error:
                pass
    return total


async def timed_round(
    url: str,
    clients: int,
    seconds: float,
    pids: list[int],
    alone: tuple[int, ...],
    source: str | None = None,
) -> dict[str, float]:
    stop = asyncio.Event()
    traffic = Traffic()
    cpu_before = tree_cpu_s(pids, alone)
    task = asyncio.create_task(drive(url, clients, stop, traffic, source))
    await asyncio.sleep(seconds)
    stop.set()
    await task
    ok = sum(1 for answer in traffic.answers if answer.status == 200)
    return {
        "ok": ok,
        "errors": len(traffic.answers) - ok,
        "wall_s": seconds,
        "cpu_s": tree_cpu_s(pids, alone) - cpu_before,
    }


async def overhead(
    direct: str,
    proxied: str,
    bento_pid: int,
    supervisor_pid: int,
    args: argparse.Namespace,
    source: str | None = None,
) -> dict[str, Any]:
    """Rounds in which the bento is driven directly and through `textgate serve` in turn.

    Directly: its private port, or, where `textgate serve` steers its port (the bento then
    accepts on a slot of it, textgate.reuseport), its slot, reached from the slot's `source`.
    """
    totals = {
        "direct": dict.fromkeys(("ok", "errors", "wall_s", "cpu_s"), 0.0),
        "textgate_serve": dict.fromkeys(("ok", "errors", "wall_s", "cpu_s"), 0.0),
    }
    await timed_round(direct, args.clients, 3, [bento_pid], (), source)  # warm-up, untimed
    for index in range(args.overhead_rounds):
        order = [
            ("direct", direct, (), source),
            ("textgate_serve", proxied, (supervisor_pid,), None),  # the proxy runs in it
        ]
        for name, url, alone, via in order if index % 2 == 0 else order[::-1]:
            result = await timed_round(url, args.clients, args.round_s, [bento_pid], alone, via)
            for key, value in result.items():
                totals[name][key] += value
    out: dict[str, Any] = {}
    for name, total in totals.items():
        out[name] = {
            "requests_per_s": round(total["ok"] / total["wall_s"], 1),
            "errors": int(total["errors"]),
            "cpu_ms_per_request": round(1000 * total["cpu_s"] / max(total["ok"], 1), 3),
        }
    cpu = [out[name]["cpu_ms_per_request"] for name in totals]
    out["cpu_increase_pct"] = round(100 * (cpu[1] / cpu[0] - 1), 1)
    out["throughput_ratio"] = round(
        out["textgate_serve"]["requests_per_s"] / out["direct"]["requests_per_s"], 3
    )
    return out


# --- promote, then roll back, under load -----------------------------------------------------


async def first_answer(traffic: Traffic, tag: str, after: float, timeout_s: float) -> float:
    """When the first answer by `tag` to a request sent after `after` arrived."""
    deadline = time.monotonic() + timeout_s
    seen = 0
    while time.monotonic() < deadline:
        answers = traffic.answers
        for answer in answers[seen:]:
            if answer.tag == tag and answer.sent >= after:
                return answer.done
        seen = len(answers)
        await asyncio.sleep(0.02)
    raise SystemExit(f"{tag} did not answer within {timeout_s:.0f} s of the registry change")


async def switches(
    url: str, registry: Registry, releases: list[Release], args: argparse.Namespace
) -> tuple[Traffic, list[dict[str, Any]]]:
    a, b = releases
    stop = asyncio.Event()
    traffic = Traffic()
    task = asyncio.create_task(drive(url, args.clients, stop, traffic))
    await asyncio.sleep(args.steady)
    done = []
    for action, old, new in (("promote", a, b), ("rollback", b, a)):
        changed = time.monotonic()
        if action == "promote":
            registry.promote(
                Release.create(
                    bento_tag=b.bento_tag, model_tag=b.model_tag, reason="bench: promote"
                )
            )
        else:
            registry.rollback("bench: roll back")
        first = await first_answer(traffic, new.bento_tag, changed, args.switch_timeout)
        log(f"{action}: {new.bento_tag} answered {first - changed:.2f} s after the change")
        done.append(
            {
                "action": action,
                "from": old.bento_tag,
                "to": new.bento_tag,
                "changed": changed,
                "first": first,
            }
        )
        await asyncio.sleep(args.steady)
    stop.set()
    await task
    return traffic, done


def analyse(traffic: Traffic, done: list[dict[str, Any]]) -> dict[str, Any]:
    answers = traffic.answers

    def busy(answer: Answer) -> bool:
        return any(
            s["changed"] <= answer.sent <= s["first"] + WINDOW_S
            or abs(answer.sent - s["first"]) <= WINDOW_S
            for s in done
        )

    steady = percentiles([a for a in answers if not busy(a)])
    per_switch = []
    for index, s in enumerate(done):
        end = done[index + 1]["changed"] if index + 1 < len(done) else float("inf")
        per_switch.append(
            {
                "action": s["action"],
                "to": s["to"],
                "switch_s": round(s["first"] - s["changed"], 2),
                "starting": percentiles(
                    [a for a in answers if s["changed"] <= a.sent < s["first"]]
                ),
                "within_5s": percentiles(
                    [a for a in answers if abs(a.sent - s["first"]) <= WINDOW_S]
                ),
                "flapping": sum(
                    1 for a in answers if s["first"] < a.sent < end and a.tag == s["from"]
                ),
            }
        )
    return {
        "requests": len(answers),
        "errors": sum(1 for a in answers if a.status != 200),
        "error_samples": traffic.errors[:5],
        "steady": steady,
        "switches": per_switch,
    }


def verdicts(report: dict[str, Any]) -> dict[str, bool]:
    steady_p99 = report["switch"]["steady"]["p99_ms"] or float("inf")
    switches = report["switch"]["switches"]
    return {
        "no_errors": report["switch"]["errors"] == 0,
        "no_flapping": all(s["flapping"] == 0 for s in switches),
        "switch_under_10s": all(s["switch_s"] <= MAX_SWITCH_S for s in switches),
        "switch_p99_at_most_2x_steady": all(
            (s["within_5s"]["p99_ms"] or 0) <= MAX_SWITCH_P99_RATIO * steady_p99 for s in switches
        ),
        "cpu_per_request_at_most_5pct_more": (
            report["overhead"]["cpu_increase_pct"] <= MAX_CPU_INCREASE_PCT
        ),
    }


def print_report(report: dict[str, Any]) -> None:
    over = report["overhead"]
    print("overhead of following (the same clients, taking turns):")
    for name in ("direct", "textgate_serve"):
        figures = over[name]
        print(
            f"  {name:<15} {figures['requests_per_s']:>8.1f} req/s  "
            f"{figures['cpu_ms_per_request']:.3f} ms CPU/request  errors {figures['errors']}"
        )
    print(
        f"  throughput ratio {over['throughput_ratio']:.3f}, "
        f"CPU per request {over['cpu_increase_pct']:+.1f}%"
    )
    switch = report["switch"]
    print(
        f"switch under load: {switch['requests']} requests, {switch['errors']} errors "
        f"{switch['error_samples']}"
    )
    steady = switch["steady"]
    print(
        f"  steady:     {steady['requests']:>6} req  p50 {steady['p50_ms']} ms  "
        f"p99 {steady['p99_ms']} ms"
    )
    for s in switch["switches"]:
        print(
            f"  {s['action']} to {s['to']}: switch {s['switch_s']:.2f} s, flapping {s['flapping']}"
        )
        for window in ("starting", "within_5s"):
            w = s[window]
            print(
                f"    {window:<10} {w['requests']:>6} req  p50 {w['p50_ms']} ms  "
                f"p99 {w['p99_ms']} ms"
            )
    for name, passed in report["targets"].items():
        print(f"  target {name}: {'PASS' if passed else 'FAIL'}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=positive_int, default=32)
    parser.add_argument("--steady", type=float, default=15.0, help="seconds around switches")
    parser.add_argument("--overhead-rounds", type=int, default=3)
    parser.add_argument("--round-s", type=float, default=8.0, help="seconds per overhead round")
    parser.add_argument("--switch-timeout", type=float, default=180.0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="textgate-bench-switch-"))
    os.environ["BENTOML_HOME"] = str(work / "bentoml")  # before BentoML is imported
    os.environ["BENTOML_DO_NOT_TRACK"] = "True"
    log(f"building two tiny bentos in {work}")
    releases = build_bentos(work, args.clients)
    registry = Registry(work / "state" / "registry.json")
    registry.promote(releases[0])
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    serve = start_serve(work, port)
    try:
        wait_serving(url, releases[0].bento_tag, serve, args.switch_timeout)
        state = serve_state(work, port)
        bento = state["bentos"][0]
        source = bento.get("source")
        log(f"overhead: {bento['url']} directly (from {source or 'any address'}) vs {url}")
        pid = bento["processes"][0][0]
        over = asyncio.run(overhead(bento["url"], url, pid, serve.pid, args, source))
        log("switch: promote, then roll back, under load")
        traffic, done = asyncio.run(switches(url, registry, releases, args))
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(timeout=120)
    report: dict[str, Any] = {
        "clients": args.clients,
        "overhead": over,
        "switch": analyse(traffic, done),
    }
    report["targets"] = verdicts(report)
    report["machine"] = machine_info("bentoml", "aiohttp")
    print_report(report)
    print(json_line(report))
    return 0 if all(report["targets"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
