"""tasks.served: golden requests replayed against a real `bentoml serve` of a built bento.

Two bentos are built once for the module: A from `tiny_model_dir` and B from a tiny model
with other weights. The golden cases are A's offline predictions, so A's bento must repeat
them and B's must be reported as differing. Replay's error handling runs against a small
stdlib HTTP server, and against a closed port, with no bento at all.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import psutil
import pytest

from tasks.served import (
    GoldenCase,
    ServedCheckError,
    check_served_bento,
    load_golden,
    replay,
    serve_bento,
    write_golden,
)
from tests.conftest import INTENT_WORDS, make_rows
from tests.serving import local_http_server
from textgate.config import PARAMS_FILE, load_params
from textgate.errors import DataError
from textgate.model import TextClassifier
from textgate.process import free_port

pytestmark = pytest.mark.slow  # builds and serves real bentos

REPO_ROOT = Path(__file__).resolve().parents[2]
TOLERANCE = load_params(REPO_ROOT / PARAMS_FILE).gate.served_score_tolerance
# About 50 distinct texts, as a promotion check would replay.
TEXTS = [text for text, _ in make_rows(per_class=16)]


@pytest.fixture(scope="module")
def other_model_dir(tiny_base_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model whose answers differ from tiny_model_dir's on every text, by far.

    Untrained heads give every text about 1/3 to 0.34, so two random heads can differ by
    little more than the tolerance; a bias of a few logits moves the scores to about 0.87.
    """
    import torch

    from textgate.model import build_classifier, save_classifier

    labels = sorted(INTENT_WORDS)
    torch.manual_seed(1)
    model, tokenizer = build_classifier(str(tiny_base_model), labels)
    with torch.no_grad():
        model.classifier.bias.copy_(torch.tensor([2.0, 0.0, -2.0]))
    metadata = {"max_length": 32, "redact_pii": True, "base_model": str(tiny_base_model)}
    out = tmp_path_factory.mktemp("other-model") / "model"
    return save_classifier(model, tokenizer, labels, metadata, out)


@pytest.fixture(scope="module")
def bento_tags(bentoml_home: Path, tiny_model_dir: Path, other_model_dir: Path) -> dict[str, str]:
    from tasks.package import package_model

    params = load_params(REPO_ROOT / "params.yaml")
    return {
        name: package_model(model_dir, params=params, metrics={}, lineage={"test": name}).bento_tag
        for name, model_dir in (("same", tiny_model_dir), ("other", other_model_dir))
    }


@pytest.fixture(scope="module")
def golden(tiny_model_dir: Path) -> list[GoldenCase]:
    predictions = TextClassifier(tiny_model_dir).predict(TEXTS, batch_size=64)
    return [GoldenCase(t, p.label, p.score) for t, p in zip(TEXTS, predictions, strict=True)]


def bentoml_processes(marker: str) -> list[psutil.Process]:
    """Running processes whose command line mentions `marker` (a bento tag)."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        if any(marker in part for part in cmdline) and process.is_running():
            found.append(process)
    return found


def test_the_bento_of_the_same_model_repeats_the_offline_answers(
    bento_tags: dict[str, str], golden: list[GoldenCase], tmp_path: Path
) -> None:
    report = check_served_bento(
        bento_tags["same"], golden, workdir=tmp_path, score_tolerance=TOLERANCE
    )

    assert report.errors == []
    assert report.mismatches == []
    assert report.n == report.matched == len(golden)
    assert report.passed
    assert report.bento_tag == bento_tags["same"]
    assert len(report.latencies_ms) == report.n
    assert all(latency > 0 for latency in report.latencies_ms)
    assert 0 < report.p50_ms <= report.p95_ms <= report.max_ms == max(report.latencies_ms)
    assert json.loads(json.dumps(report.to_dict()))["matched"] == report.n
    assert (tmp_path / "bentoml-serve.log").is_file()
    assert bentoml_processes(bento_tags["same"]) == []


def test_a_bento_whose_served_answers_differ_from_offline_ones(
    bento_tags: dict[str, str], golden: list[GoldenCase], other_model_dir: Path, tmp_path: Path
) -> None:
    report = check_served_bento(
        bento_tags["other"], golden, workdir=tmp_path, score_tolerance=TOLERANCE
    )

    assert report.errors == []
    assert report.matched == 0 and not report.passed
    assert len(report.mismatches) == report.n == len(golden)
    assert len(report.latencies_ms) == report.n  # answered, just differently
    served_offline = TextClassifier(other_model_dir).predict(TEXTS, batch_size=64)
    for case, expected, mismatch in zip(golden, served_offline, report.mismatches, strict=True):
        assert mismatch == {
            "text": case.text,
            "offline_label": case.label,
            "served_label": expected.label,
            "offline_score": case.score,
            "served_score": pytest.approx(expected.score, abs=TOLERANCE),
        }
        assert abs(mismatch["served_score"] - mismatch["offline_score"]) > 0.1


def test_a_bento_that_does_not_exist_fails_fast_and_leaves_nothing_running(
    bentoml_home: Path, golden: list[GoldenCase], tmp_path: Path
) -> None:
    tag = f"textgate:missing{time.time_ns()}"
    start = time.monotonic()
    with pytest.raises(ServedCheckError, match="exited with code") as caught:
        check_served_bento(tag, golden, workdir=tmp_path, score_tolerance=TOLERANCE)
    assert time.monotonic() - start < 60  # bentoml exits at once; no waiting for the timeout
    message = str(caught.value)
    assert tag in message
    assert "not found in BentoML store" in message  # the log tail
    assert bentoml_processes(tag) == []


def test_a_bento_not_ready_in_time_is_stopped(
    bento_tags: dict[str, str], golden: list[GoldenCase], tmp_path: Path
) -> None:
    tag = bento_tags["same"]
    with pytest.raises(ServedCheckError, match="not ready after"):
        check_served_bento(
            tag, golden, workdir=tmp_path, score_tolerance=TOLERANCE, ready_timeout_s=0.5
        )
    assert bentoml_processes(tag) == []


class FakeService(BaseHTTPRequestHandler):
    """Answers /classify from ANSWERS; some texts get an HTTP error or a malformed body."""

    ANSWERS = {"a": ("refund", 0.5), "b": ("login", 0.25), "c": ("refund", 0.75)}

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        (text,) = body["texts"]
        if text == "boom":
            self._send(500, {"error": "model exploded"})
        elif text == "two":
            self._send(200, [{"label": "refund", "score": 0.5}] * 2)
        else:
            label, score = self.ANSWERS[text]
            self._send(200, [{"label": label, "score": score}])

    def _send(self, status: int, payload: object) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        pass  # keep the test output quiet


@pytest.fixture
def fake_url() -> Iterator[str]:
    with local_http_server(FakeService) as url:
        yield url


def test_replay_counts_errors_and_mismatches_as_not_matched(fake_url: str) -> None:
    golden = [
        GoldenCase("a", "refund", 0.5 + TOLERANCE / 2),  # within the tolerance
        GoldenCase("b", "login", 0.25 + 3 * TOLERANCE),  # score off
        GoldenCase("c", "login", 0.75),  # label off
        GoldenCase("boom", "refund", 0.5),
        GoldenCase("two", "refund", 0.5),
    ]
    report = replay(fake_url, golden, score_tolerance=TOLERANCE, warmup=0)

    assert (report.n, report.matched) == (5, 1)
    assert [m["text"] for m in report.mismatches] == ["b", "c"]
    assert report.mismatches[1] == {
        "text": "c",
        "offline_label": "login",
        "served_label": "refund",
        "offline_score": 0.75,
        "served_score": 0.75,
    }
    assert len(report.errors) == 2
    assert "'boom'" in report.errors[0] and "HTTP 500" in report.errors[0]
    assert "model exploded" in report.errors[0]
    assert "'two'" in report.errors[1] and "not 1 {label, score} answer" in report.errors[1]
    assert len(report.latencies_ms) == 3  # the valid answers only


def test_replay_against_nothing_reports_transport_errors() -> None:
    golden = [GoldenCase("a", "refund", 0.5), GoldenCase("b", "login", 0.5)]
    report = replay(
        f"http://127.0.0.1:{free_port()}", golden, score_tolerance=TOLERANCE, timeout_s=2
    )

    assert report.matched == 0 and not report.passed
    assert len(report.errors) == 2 and all("ConnectError" in e for e in report.errors)
    assert report.latencies_ms == []
    assert report.to_dict()["p95_ms"] is None


def test_golden_round_trip(tmp_path: Path) -> None:
    golden = [GoldenCase("my card is gone", "lost_card", 0.9), GoldenCase("x", "login", 1.0)]
    write_golden(tmp_path / "golden.json", golden)
    assert load_golden(tmp_path / "golden.json") == golden


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        pytest.param('[{"text": "a", "label": "x"', "not valid JSON", id="not-json"),
        pytest.param('{"text": "a", "label": "x", "score": 0.5}', "JSON list", id="not-a-list"),
        pytest.param("[]", "no cases", id="empty"),
        pytest.param('["hello"]', "case 0: expected an object", id="not-an-object"),
        pytest.param('[{"text": "a", "label": "x"}]', "missing ['score']", id="missing-key"),
        pytest.param(
            '[{"text": "a", "label": "x", "score": 0.5, "id": 1}]', "unknown ['id']", id="extra"
        ),
        pytest.param('[{"text": " ", "label": "x", "score": 0.5}]', "non-blank", id="blank"),
        pytest.param('[{"text": "a", "label": "", "score": 0.5}]', "label", id="empty-label"),
        pytest.param('[{"text": "a", "label": "x", "score": 1.5}]', "[0, 1]", id="score-range"),
        pytest.param('[{"text": "a", "label": "x", "score": "0.5"}]', "score", id="score-text"),
        pytest.param('[{"text": "a", "label": "x", "score": true}]', "score", id="score-bool"),
    ],
)
def test_malformed_golden_file_is_a_clear_error(tmp_path: Path, content: str, problem: str) -> None:
    path = tmp_path / "golden.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match="golden.json") as caught:
        load_golden(path)
    assert problem in str(caught.value)


def test_missing_golden_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        load_golden(tmp_path / "golden.json")


def test_workers_are_stopped_even_when_the_server_dies_first(
    bento_tags: dict[str, str], tmp_path: Path
) -> None:
    # circus starts each worker in a session of its own, out of the server's process group,
    # and a worker outlives a killed server (seen with bentoml 1.4.40).
    tag = bento_tags["other"]
    with serve_bento(tag, workdir=tmp_path):
        processes = bentoml_processes(tag)
        servers = [p for p in processes if p.cmdline()[1:4] == ["-m", "bentoml", "serve"]]
        workers = [p for p in processes if p not in servers]
        assert len(servers) == 1 and workers, [p.cmdline() for p in processes]
        servers[0].kill()
        deadline = time.monotonic() + 10
        while servers[0].status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
            time.sleep(0.1)
    assert bentoml_processes(tag) == []
