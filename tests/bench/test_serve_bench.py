"""Smoke tests of the serving benchmark's pieces: the load driver against a stdlib stub server,
the figures it computes, the targets and the JSON last line, and the baseline app on a tiny
random model (no MiniLM, no bentoml serve)."""

from __future__ import annotations

import asyncio
import json
import math
import os
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from bench import serve as bench
from tests.serving import local_http_server
from textgate.process import free_port

pytestmark = pytest.mark.slow


class _StubHandler(BaseHTTPRequestHandler):
    """`POST /classify`: "fail..." texts get HTTP 500, "bad..." a malformed 200, others a label."""

    protocol_version = "HTTP/1.1"  # keep-alive, like the real servers

    def do_POST(self) -> None:  # noqa: N802 (the stdlib's name)
        texts = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["texts"]
        time.sleep(0.002)
        if any(text.startswith("fail") for text in texts):
            status, body = 500, {"error": "boom"}
        elif any(text.startswith("bad") for text in texts):
            status, body = 200, {"not": "a list"}
        else:
            status, body = 200, [{"label": text.upper(), "score": 0.5} for text in texts]
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def stub_url() -> Iterator[str]:
    with local_http_server(_StubHandler) as url:
        yield url


def test_drive_counts_answers_and_errors(stub_url: str) -> None:
    texts = ["a", "b", "fail", "bad"]
    result = asyncio.run(bench.drive(stub_url, texts, concurrency=4, requests=40))
    summary = bench.summarize(result)
    assert summary["requests"] == 40
    assert summary["ok"] == 20 and len(result.latencies_ms) == 20
    assert summary["errors"] == 20
    assert any(sample.startswith("HTTP 500") for sample in summary["error_samples"])
    assert any("not 1 {label, score}" in sample for sample in summary["error_samples"])
    assert len(summary["error_samples"]) == bench.ERROR_SAMPLES
    # Request i carries texts[i % 4]: the answered ones are exactly the "a" and "b" requests.
    assert result.labels == {i: (texts[i % 4].upper(),) for i in range(40) if i % 4 < 2}
    assert summary["throughput_rps"] == pytest.approx(20 / result.wall_s)
    assert 0 < summary["p50_ms"] <= summary["p95_ms"] <= summary["p99_ms"] <= summary["max_ms"]


def test_drive_sends_several_texts_per_request(stub_url: str) -> None:
    result = asyncio.run(
        bench.drive(stub_url, ["x", "y", "z"], concurrency=2, requests=3, texts_per_request=2)
    )
    assert result.errors == 0
    assert result.labels == {0: ("X", "Y"), 1: ("Z", "X"), 2: ("Y", "Z")}
    assert bench.summarize(result)["texts_per_s"] == pytest.approx(6 / result.wall_s)


def test_drive_for_a_duration(stub_url: str) -> None:
    result = asyncio.run(bench.drive(stub_url, ["a"], concurrency=3, duration_s=0.3))
    assert result.errors == 0 and len(result.latencies_ms) > 3
    assert result.wall_s >= 0.3


def test_refused_connections_are_errors_and_give_no_percentiles() -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    result = asyncio.run(bench.drive(url, ["a"], concurrency=2, requests=4, timeout_s=5))
    summary = bench.summarize(result)
    assert summary["errors"] == 4 and summary["ok"] == 0
    assert math.isnan(summary["p99_ms"]) and summary["throughput_rps"] == 0
    assert "Connect call failed" in summary["error_samples"][0]


def test_summarize_percentiles_and_throughput() -> None:
    result = bench.LoadResult(
        wall_s=2.0, texts_per_request=4, latencies_ms=[float(v) for v in range(1, 101)], errors=3
    )
    summary = bench.summarize(result)
    assert summary["requests"] == 103 and summary["errors"] == 3
    assert summary["throughput_rps"] == pytest.approx(50.0)
    assert summary["texts_per_s"] == pytest.approx(200.0)
    assert summary["p50_ms"] == pytest.approx(50.5)
    assert summary["p99_ms"] == pytest.approx(99.01)
    assert summary["max_ms"] == 100.0


def test_process_tree_figures() -> None:
    processes = bench.process_tree(os.getpid())
    assert processes[0].pid == os.getpid()
    assert bench.tree_rss_bytes(processes) > 0
    assert bench.tree_cpu_seconds(processes) > 0


def test_label_agreement() -> None:
    first = bench.LoadResult(wall_s=1, texts_per_request=1, labels={0: ("a",), 1: ("b",)})
    second = bench.LoadResult(wall_s=1, texts_per_request=1, labels={1: ("c",), 2: ("a",)})
    assert bench.label_agreement(first, first) == 1.0
    assert bench.label_agreement(first, second) == 0.0  # only request 1 is common
    assert math.isnan(bench.label_agreement(first, bench.LoadResult(1, 1)))


def _summary(throughput: float, p99: float, errors: int = 0) -> dict[str, object]:
    return {
        "requests": 100,
        "ok": 100 - errors,
        "errors": errors,
        "texts_per_request": 1,
        "wall_s": 10.0,
        "throughput_rps": throughput,
        "texts_per_s": throughput,
        "p50_ms": p99 / 2,
        "p95_ms": p99 * 0.9,
        "p99_ms": p99,
        "mean_ms": p99 / 2,
        "max_ms": p99,
        "error_samples": ["HTTP 503: busy"] if errors else [],
        "cpu_ms_per_request": 100.0,
        "rss_mb": 500.0,
        "processes": 3,
        "start_s": 4.0,
    }


def _soak(growth: float) -> dict[str, object]:
    return {
        **_summary(40.0, 900.0),
        "seconds": 60.0,
        "processes": 3,
        "rss_start_mb": 1000.0,
        "rss_end_mb": 1000.0 * (1 + growth / 100),
        "rss_peak_mb": 1000.0 * (1 + growth / 100),
        "rss_growth_pct": growth,
    }


def _report(bento: dict, baseline: dict, soak: dict | None, following: dict | None = None) -> dict:
    return bench.build_report(
        bento=bento,
        baseline=baseline,
        soak_summary=soak,
        agreement=1.0,
        config={"requests": 100},
        machine={"cpu_count": 2, "platform": "test", "load_average": [0.5, 0.4, 0.3]},
        following=following,
    )


def test_targets_met() -> None:
    report = _report(_summary(50.0, 900.0), _summary(10.0, 1000.0), _soak(2.0))
    targets = report["targets"]
    assert report["throughput_ratio"] == pytest.approx(5.0)
    assert report["p99_ratio"] == pytest.approx(0.9)
    assert targets["passed"]
    assert set(targets) == {
        "throughput_ratio",
        "p99_ratio",
        "errors",
        "rss_mb",
        "start_s",
        "soak_rss_growth_pct",
        "soak_errors",
        "passed",
    }
    text = bench.format_report(report)
    assert "[FAIL]" not in text and "all targets met: yes" in text
    assert "[pass] bento/baseline throughput: 5.00x (target >= 4.5x)" in text
    assert "[pass] bento RSS, all processes: 500 MiB (target <= 700 MiB)" in text
    assert "[pass] bento start to ready: 4.0 s (target <= 5.0 s)" in text
    assert "load average (1/5/15 min): [0.5, 0.4, 0.3] at the start" in text
    assert "[pass] soak RSS growth: +2.0% (target < 10%)" in text


@pytest.mark.parametrize(
    ("bento", "soak", "failed"),
    [
        (_summary(40.0, 900.0), None, "throughput_ratio"),  # 4x < 4.5x
        (_summary(50.0, 1100.0), None, "p99_ratio"),  # slower tail than the baseline
        (_summary(50.0, 900.0, errors=1), None, "errors"),
        (_summary(50.0, 900.0) | {"rss_mb": 701.0}, None, "rss_mb"),
        (_summary(50.0, 900.0) | {"start_s": 5.1}, None, "start_s"),
        (_summary(50.0, 900.0) | {"start_s": math.nan}, None, "start_s"),  # not measured
        (_summary(50.0, 900.0), _soak(12.0), "soak_rss_growth_pct"),
        (_summary(0.0, math.nan, errors=100), None, "p99_ratio"),  # nothing answered
    ],
)
def test_each_target_can_fail(bento: dict, soak: dict | None, failed: str) -> None:
    report = _report(bento, _summary(10.0, 1000.0), soak)
    assert not report["targets"][failed]["passed"]
    assert not report["targets"]["passed"]
    assert "[FAIL]" in bench.format_report(report)


def _following(direct_cpu: float, served_cpu: float, served_rps: float, errors: int = 0) -> dict:
    direct = _summary(60.0, 800.0) | {"cpu_ms_per_request": direct_cpu}
    served = _summary(served_rps, 850.0, errors) | {"cpu_ms_per_request": served_cpu}
    return bench.following_summary(direct, served, _summary(10.0, 1000.0))


def test_following_figures_and_their_targets() -> None:
    following = _following(direct_cpu=5.0, served_cpu=5.2, served_rps=45.0)
    assert following["throughput_ratio"] == pytest.approx(4.5)
    assert following["cpu_increase_pct"] == pytest.approx(4.0)
    report = _report(_summary(50.0, 900.0), _summary(10.0, 1000.0), None, following)
    assert report["targets"]["passed"]
    text = bench.format_report(report)
    assert "[pass] textgate serve/baseline throughput: 4.50x (target >= 3.0x)" in text
    assert "[pass] textgate serve CPU/request over the bento directly: +4.0% (target <= 5%)" in text


@pytest.mark.parametrize(
    ("following", "failed"),
    [
        (_following(5.0, 5.3, 45.0), "following_cpu_increase_pct"),  # +6% CPU per request
        (_following(5.0, 5.1, 29.0), "following_throughput_ratio"),  # 2.9x the baseline
        (_following(5.0, 5.1, 45.0, errors=1), "following_errors"),
    ],
)
def test_each_following_target_can_fail(following: dict, failed: str) -> None:
    report = _report(_summary(50.0, 900.0), _summary(10.0, 1000.0), None, following)
    assert not report["targets"][failed]["passed"] and not report["targets"]["passed"]
    assert "[FAIL]" in bench.format_report(report)


def test_main_prints_the_json_report_last(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    report = _report(_summary(0.0, math.nan, errors=100), _summary(10.0, 1000.0), None)
    monkeypatch.setattr(bench, "run", lambda options: report)
    assert bench.main(["--requests", "5", "--soak", "0"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert "throughput (req/s)" in "\n".join(lines[:-1])
    parsed = json.loads(lines[-1])  # strict JSON: NaN became null
    assert set(parsed) >= {"bento", "baseline", "throughput_ratio", "p99_ratio", "targets"}
    assert set(parsed) >= {"machine", "soak"}
    assert parsed["soak"] is None
    assert parsed["bento"]["p99_ms"] is None and parsed["p99_ratio"] is None
    assert parsed["baseline"]["throughput_rps"] == 10.0
    assert parsed["targets"]["passed"] is False


def test_baseline_app_answers_like_the_bento(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fastapi.testclient import TestClient

    from bench import baseline_app

    monkeypatch.setenv(baseline_app.MODEL_DIR_ENV, str(tiny_model_dir))
    monkeypatch.setenv(baseline_app.THREADS_ENV, "1")
    texts = ["I lost my card", "refund please " * 50]  # the second is truncated to max_length
    with TestClient(baseline_app.app) as client:
        assert client.get("/readyz").status_code == 200
        response = client.post("/classify", json={"texts": texts})
        assert client.post("/classify", json={"texts": []}).status_code == 422
    assert response.status_code == 200
    answers = response.json()
    assert len(answers) == 2
    assert all(set(a) == {"label", "score"} and 0 <= a["score"] <= 1 for a in answers)
    assert {a["label"] for a in answers} <= {"lost_card", "login", "refund"}


def test_requests_split_into_rounds() -> None:
    assert bench.round_sizes(10, 4) == [3, 3, 2, 2]
    assert bench.round_sizes(3, 8) == [1, 1, 1]  # never an empty round
    assert sum(bench.round_sizes(2000, 4)) == 2000


def test_rounds_continue_the_request_indices(stub_url: str) -> None:
    texts = [f"text {i}" for i in range(10)]
    first = asyncio.run(bench.drive(stub_url, texts, concurrency=2, requests=3))
    second = asyncio.run(bench.drive(stub_url, texts, concurrency=2, requests=3, first_index=3))
    # Request i carries texts[i]: the second round went on where the first stopped.
    assert second.labels == {i: (f"TEXT {i}",) for i in (3, 4, 5)}
    walls = first.wall_s + second.wall_s
    first.extend(second)
    assert first.labels == {i: (f"TEXT {i}",) for i in range(6)}
    assert len(first.latencies_ms) == 6 and first.errors == 0
    assert first.wall_s == pytest.approx(walls)


def test_the_default_load_is_what_the_bento_takes_at_once(tmp_path):
    import yaml

    from tests.helpers import REPO_ROOT
    from textgate.runtime import default_workers

    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    params["serve"]["max_concurrency"] = 3
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    assert bench.parse_args(["--params", str(path)]).concurrency == default_workers() * 3
    assert bench.parse_args(["--params", str(path), "--concurrency", "5"]).concurrency == 5
