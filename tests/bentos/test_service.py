"""The packaged service through a real `bentoml serve <bento>` on a free loopback port.

The servers are the session fixtures of tests/bentos/conftest.py: `server` (model A served
while B is `latest`, no API key, request log in a temporary file) and `guarded_server` (an
API key, a model that abstains on everything). The middleware and the request log also
have fast tests of their own, without a server.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import stat
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from bentos import service
from bentos.service import (
    SETTINGS,
    ApiKeyMiddleware,
    JsonBodyMiddleware,
    JsonErrorsMiddleware,
    OpenApiSecurityMiddleware,
    OverloadMiddleware,
    RejectionLogFilter,
    RequestLog,
    ShedMiddleware,
    configured_api_key,
    request_log_path,
    request_log_rotation,
    service_settings,
)
from tests.bentos.conftest import API_KEY, PROBE_TEXTS, Server
from tests.helpers import REPO_ROOT
from textgate.config import PARAMS_FILE, ServiceSettings, load_params
from textgate.errors import ConfigError
from textgate.model import TextClassifier
from textgate.text import clean_text

slow = pytest.mark.slow

# Batched with other requests, a text is padded to a different length, which moves float32
# scores by up to about 1e-4 here; a result routed to the wrong text is off by far more.
BATCHED_TOLERANCE = 1e-3
TEXTS = PROBE_TEXTS
LOG_FIELDS = {
    "ts",
    "request_id",
    "model_tag",
    "text",
    "label",
    "best_label",
    "score",
    "abstained",
    "margin",
    "bento_tag",
}
UNKNOWN = "unknown"
# Far from every intent the tiny models were built around (refund, lost card, login).
OFF_TOPIC = "what is the weather like on the moon"


def classify(
    url: str,
    payload: object,
    client: httpx.Client | None = None,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    poster = client or httpx
    return poster.post(f"{url}/classify", json=payload, headers=headers, timeout=30)


def explain(url: str, payload: object, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(f"{url}/explain", json=payload, headers=headers, timeout=30)


def assert_matches_offline(
    results: list[dict[str, object]],
    texts: Sequence[str],
    classifier: TextClassifier,
    tolerance: float = 1e-4,
) -> None:
    """One result per text, in order, equal to the offline prediction for that text.

    The label must be the offline argmax up to `tolerance` (so a float-noise near-tie
    cannot fail the test) and its score the offline probability of that label. The model
    has no abstention threshold, so nothing is abstained.
    """
    assert isinstance(results, list) and len(results) == len(texts)
    probabilities = classifier.predict_proba(texts, batch_size=64)  # (texts, labels)
    for text, result, row in zip(texts, results, probabilities, strict=True):
        assert set(result) == {"label", "score", "abstained"}, text
        assert result["abstained"] is False, text
        assert result["label"] in classifier.labels, text
        assert isinstance(result["score"], float) and 0.0 <= result["score"] <= 1.0, text
        offline = float(row[classifier.labels.index(result["label"])])
        assert offline >= row.max() - tolerance, (text, result, row)
        assert result["score"] == pytest.approx(offline, abs=tolerance), text


def read_log(path: Path) -> list[dict[str, object]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def metric_value(metrics: str, name: str, labels: str = "") -> float:
    """The value of one sample in Prometheus text format (`labels`: `label="x"`), else 0."""
    pattern = re.escape(name) + (r"\{" + re.escape(labels) + r"\}" if labels else "")
    match = re.search(rf"^{pattern} ([0-9.e+-]+)$", metrics, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


# --- the served model: answers, order, batching -----------------------------------------


@slow
def test_the_probe_texts_get_distinct_answers(server: Server) -> None:
    # Guards the other tests: were the answers alike, a reordering would go unnoticed. The
    # model is random, so allow one pair of look-alike answers out of the 28.
    predictions = server.served.predict(TEXTS, batch_size=64)
    assert len({p.label for p in predictions}) >= 2
    alike = [
        (a, b)
        for i, a in enumerate(predictions)
        for b in predictions[i + 1 :]
        if a.label == b.label and abs(a.score - b.score) <= 2 * BATCHED_TOLERANCE
    ]
    assert len(alike) <= 1, alike


@slow
def test_classifies_several_texts_in_order(server: Server) -> None:
    texts = TEXTS[:3]
    response = classify(server.url, {"texts": texts})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert_matches_offline(response.json(), texts, server.served)


@slow
def test_serves_the_model_it_was_built_with(server: Server) -> None:
    # Model B is `latest` and named by TEXTGATE_MODEL_TAG, yet the bento serves A.
    response = classify(server.url, {"texts": TEXTS})
    assert response.status_code == 200, response.text
    assert_matches_offline(response.json(), TEXTS, server.served)
    newer = TextClassifier(_model_path(server.newer_model_tag))
    newer_scores = [p.score for p in newer.predict(TEXTS, batch_size=64)]
    served_scores = [r["score"] for r in response.json()]
    assert served_scores != pytest.approx(newer_scores, abs=1e-4)


def _model_path(tag: str) -> str:
    import bentoml

    return bentoml.models.get(tag).path


@slow
def test_single_text(server: Server) -> None:
    response = classify(server.url, {"texts": ["refund please"]})
    assert response.status_code == 200, response.text
    assert_matches_offline(response.json(), ["refund please"], server.served)


@slow
def test_startup_logs_the_runtime_and_threads(server: Server, guarded_server: Server) -> None:
    log = server.serve_log.read_text(encoding="utf-8", errors="replace")
    assert f"textgate serves {server.model_tag} with runtime torch" in log
    assert "(requested torch), 1 threads" in log
    # With TEXTGATE_RUNTIME empty, the CPU bento's own argument (onnx) decides; the former
    # variable TEXTGATE_TORCH_THREADS is still read.
    guarded_log = guarded_server.serve_log.read_text(encoding="utf-8", errors="replace")
    assert "with runtime onnx-int8 (requested onnx), 1 threads" in guarded_log


@slow
def test_concurrent_requests_each_get_their_own_answers_in_order(server: Server) -> None:
    # Different lengths and orders per request, so a batch split at the wrong place or a
    # result delivered to the wrong request would show; the request log must tell the
    # requests apart the same way.
    requests = [TEXTS[i:] + TEXTS[:i] for i in range(len(TEXTS))]
    requests += [TEXTS[i : i + 1 + i % 3] for i in range(len(TEXTS))]
    logged_before = len(read_log(server.request_log))

    with httpx.Client() as client, ThreadPoolExecutor(max_workers=8) as pool:
        responses = list(
            pool.map(lambda texts: classify(server.url, {"texts": texts}, client), requests)
        )

    for texts, response in zip(requests, responses, strict=True):
        assert response.status_code == 200, response.text
        assert_matches_offline(response.json(), texts, server.served, BATCHED_TOLERANCE)
    logged = read_log(server.request_log)[logged_before:]
    assert len(logged) == sum(len(texts) for texts in requests)
    for texts, response in zip(requests, responses, strict=True):
        request_id = response.headers["x-bentoml-request-id"]
        lines = [line for line in logged if line["request_id"] == request_id]
        assert [line["text"] for line in lines] == [clean_text(t, redact=True) for t in texts]
        assert [line["score"] for line in lines] == [r["score"] for r in response.json()]


# --- bad input is a clear 4xx, never a 5xx -------------------------------------------------


@slow
@pytest.mark.parametrize(
    ("payload", "problem"),
    [
        pytest.param({"texts": []}, "at least 1 item", id="empty-list"),
        pytest.param({"texts": [""]}, "at least 1 character", id="empty-string"),
        pytest.param({"texts": ["ok", "   "]}, "non-whitespace", id="blank-string"),
        pytest.param({"texts": ["\u200b\u00ad"]}, "visible", id="invisible-only"),
        pytest.param({}, "Field required", id="missing-texts"),
        pytest.param({"text": ["hello"]}, "Field required", id="misspelt-key"),
        pytest.param({"texts": ["hi"], "top_k": 3}, "Extra inputs", id="extra-field"),
        pytest.param({"texts": "hello"}, "valid array", id="string-not-list"),
        pytest.param({"texts": [1, 2]}, "valid string", id="numbers"),
        pytest.param({"texts": [10**400]}, "valid string", id="huge-number"),
        pytest.param({"texts": [["nested", {"junk": None}]]}, "valid string", id="nested"),
        pytest.param({"texts": None}, "valid array", id="null"),
        pytest.param(["hello"], "object", id="bare-list"),
        pytest.param({"texts": ["x" * 2001]}, "at most 2000 characters", id="text-too-long"),
        pytest.param({"texts": ["hi"] * 65}, "at most 64 items", id="too-many-texts"),
    ],
)
def test_bad_input_is_a_clear_4xx(server: Server, payload: object, problem: str) -> None:
    response = classify(server.url, payload)
    assert 400 <= response.status_code < 500, (response.status_code, response.text)
    assert problem in response.text


JSON = "application/json"
TOO_LARGE = b'{"texts": ["' + b"a" * (2 << 20) + b'"]}'  # 2 MiB
MALFORMED_BODIES = {  # id: (body, content type, status, words in the error)
    "json": (b'{"texts": ["unterminated', JSON, 400, "json"),
    "empty-body": (b"", JSON, 400, "Field required"),
    "invalid-utf8": (b'{"texts": ["\xff\xfe"]}', JSON, 400, "unicode"),
    "deep-nesting": (b"[" * 10_000 + b"]" * 10_000, JSON, 400, "recursion"),
    "text-plain": (b'{"texts": ["hi"]}', "text/plain", 415, "Content-Type"),
    "form": (b"texts=hi", "application/x-www-form-urlencoded", 415, "Content-Type"),
    "multipart": (b"--x--", "multipart/form-data; boundary=x", 415, "Content-Type"),
    "pickle": (b"\x80\x03", "application/vnd.bentoml+pickle", 415, "Content-Type"),
    "too-large": (TOO_LARGE, JSON, 413, "at most"),
}


@slow
@pytest.mark.parametrize(
    ("body", "content_type", "status", "problem"),
    list(MALFORMED_BODIES.values()),
    ids=list(MALFORMED_BODIES),
)
def test_malformed_bodies_are_a_clear_4xx(
    server: Server, body: bytes, content_type: str, status: int, problem: str
) -> None:
    for route in ("classify", "explain"):
        response = httpx.post(
            f"{server.url}/{route}",
            content=body,
            headers={"content-type": content_type},
            timeout=30,
        )
        assert response.status_code == status, (route, response.status_code, response.text)
        assert problem.lower() in response.text.lower(), (route, response.text)


@slow
def test_a_chunked_body_is_bounded_too(server: Server) -> None:
    def chunks():
        yield b'{"texts": ["'
        for _ in range(40):
            yield b"a" * 65536

    response = httpx.post(
        f"{server.url}/classify",
        content=chunks(),  # no Content-Length: sent chunked
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert response.status_code == 413, response.text


@slow
def test_openapi_documents_the_request_limits(server: Server) -> None:
    spec = httpx.get(f"{server.url}/docs.json", timeout=10).json()
    schema = json.dumps(spec)
    assert "/classify" in schema and "/explain" in schema
    assert '"maxItems": 64' in schema and '"minItems": 1' in schema
    assert '"maxLength": 500' in schema and '"maxLength": 2000' in schema


# --- /explain --------------------------------------------------------------------------------


@slow
def test_explain_attributes_the_answer_to_tokens(server: Server) -> None:
    text = "I lost my card yesterday"
    response = explain(server.url, {"text": text})
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"label", "score", "abstained", "tokens", "attributions"}
    assert body["tokens"] and len(body["tokens"]) == len(body["attributions"])
    assert all(isinstance(token, str) for token in body["tokens"])
    assert all(isinstance(value, float) and math.isfinite(value) for value in body["attributions"])
    # The same answer as /classify gives for the text.
    answer = {key: body[key] for key in ("label", "score", "abstained")}
    assert_matches_offline([answer], [text], server.served)


@slow
@pytest.mark.parametrize(
    ("payload", "problem"),
    [
        pytest.param({"text": "x" * 501}, "at most 500 characters", id="501-chars"),
        pytest.param({"text": "  \n\t "}, "non-whitespace", id="blank"),
        pytest.param({"text": ""}, "at least 1 character", id="empty"),
        pytest.param({"texts": ["hi"]}, "Field required", id="classify-body"),
        pytest.param({"text": ["hi"]}, "valid string", id="list"),
    ],
)
def test_explain_rejects_bad_input_with_a_400(server: Server, payload: object, problem: str):
    response = explain(server.url, payload)
    assert response.status_code == 400, response.text
    assert problem in response.text


# --- observability ---------------------------------------------------------------------------


@slow
def test_metrics_count_predictions_by_label(server: Server) -> None:
    before = httpx.get(f"{server.url}/metrics", timeout=10).text
    response = classify(server.url, {"texts": TEXTS})
    assert response.status_code == 200, response.text
    after = httpx.get(f"{server.url}/metrics", timeout=10).text

    assert "textgate_abstentions_total" in after
    for label in server.labels:
        sample = f'label="{label}"'
        answered = sum(result["label"] == label for result in response.json())
        counted = metric_value(after, "textgate_predictions_total", sample) - metric_value(
            before, "textgate_predictions_total", sample
        )
        assert counted == answered, label
    assert metric_value(after, "textgate_abstentions_total") == metric_value(
        before, "textgate_abstentions_total"
    )


@slow
def test_request_log_has_one_line_per_classified_text(server: Server) -> None:
    before = read_log(server.request_log)
    texts = [
        "please refund my order",
        "cannot sign in to the app",
        "mail me at a.b@example.com",
        "电话138-1234-5678，卡号4111111111111111",
    ]
    response = classify(server.url, {"texts": texts})
    assert response.status_code == 200, response.text
    explained = explain(server.url, {"text": "not logged"})  # /explain is not traffic to monitor
    # Which bento answered: the header on both routes, the same tag in the log.
    assert response.headers["x-textgate-model"] == server.bento_tag
    assert explained.headers["x-textgate-model"] == server.bento_tag
    # The log holds what the model saw: PII redacted, as in the training data.
    seen = [*texts[:2], "mail me at [EMAIL]", "电话[PHONE],卡号[CARD]"]

    logged = read_log(server.request_log)
    assert len(logged) == len(before) + len(texts)
    request_id = response.headers["x-bentoml-request-id"]
    for line, text, result in zip(logged[len(before) :], seen, response.json(), strict=True):
        assert set(line) == LOG_FIELDS
        assert line["request_id"] == request_id
        assert line["model_tag"] == server.model_tag
        assert line["bento_tag"] == server.bento_tag
        assert line["text"] == text
        assert line["label"] == line["best_label"] == result["label"]
        assert line["score"] == result["score"]
        assert line["abstained"] is False
        assert line["margin"] is None or 0.0 <= line["margin"] <= 1.0
        ts = datetime.fromisoformat(line["ts"])
        assert ts.utcoffset().total_seconds() == 0
        assert abs((datetime.now(UTC) - ts).total_seconds()) < 120


# --- the guarded server: API key, abstention, default request log ----------------------------


@slow
def test_without_an_api_key_nothing_is_needed(server: Server) -> None:
    response = classify(server.url, {"texts": ["hi"]})
    assert response.status_code == 200, response.text


@slow
@pytest.mark.parametrize(
    ("headers", "problem"),
    [
        pytest.param({}, "missing API key", id="no-header"),
        pytest.param({"Authorization": "Bearer wrong"}, "invalid API key", id="wrong-bearer"),
        pytest.param({"X-API-Key": "wrong"}, "invalid API key", id="wrong-x-api-key"),
        pytest.param({"Authorization": f"Basic {API_KEY}"}, "missing API key", id="not-bearer"),
        pytest.param({"Authorization": f"Bearer {API_KEY}x"}, "invalid API key", id="longer"),
    ],
)
def test_a_missing_or_wrong_api_key_is_a_401(
    guarded_server: Server, headers: dict[str, str], problem: str
) -> None:
    for response in (
        classify(guarded_server.url, {"texts": ["hi"]}, headers=headers),
        explain(guarded_server.url, {"text": "hi"}, headers=headers),
        httpx.post(f"{guarded_server.url}/classify", content=b"junk", headers=headers, timeout=30),
    ):
        assert response.status_code == 401, response.text
        assert response.headers["www-authenticate"].startswith("Bearer")
        assert problem in response.json()["error"]


@slow
@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({"Authorization": f"Bearer {API_KEY}"}, id="bearer"),
        pytest.param({"Authorization": f"bearer  {API_KEY}"}, id="bearer-any-case"),
        pytest.param({"X-API-Key": API_KEY}, id="x-api-key"),
    ],
)
def test_the_right_api_key_is_accepted(guarded_server: Server, headers: dict[str, str]) -> None:
    response = classify(guarded_server.url, {"texts": ["hi"]}, headers=headers)
    assert response.status_code == 200, response.text
    response = explain(guarded_server.url, {"text": "hi"}, headers=headers)
    assert response.status_code == 200, response.text


@slow
@pytest.mark.parametrize("path", ["/readyz", "/livez", "/healthz", "/metrics", "/docs.json"])
def test_probes_metrics_and_docs_need_no_api_key(guarded_server: Server, path: str) -> None:
    response = httpx.get(f"{guarded_server.url}{path}", timeout=10)
    assert response.status_code == 200, response.text


@slow
def test_an_uncertain_text_is_unknown(guarded_server: Server, server: Server) -> None:
    auth = {"Authorization": f"Bearer {API_KEY}"}
    before = httpx.get(f"{guarded_server.url}/metrics", timeout=10).text
    logged_before = len(read_log(guarded_server.request_log))

    response = classify(guarded_server.url, {"texts": [OFF_TOPIC]}, headers=auth)
    assert response.status_code == 200, response.text
    [result] = response.json()
    assert result["label"] == UNKNOWN and result["abstained"] is True
    assert 0.0 <= result["score"] < 0.99

    explained = explain(guarded_server.url, {"text": OFF_TOPIC}, headers=auth).json()
    assert explained["label"] == UNKNOWN and explained["abstained"] is True

    after = httpx.get(f"{guarded_server.url}/metrics", timeout=10).text
    for name, labels in (
        ("textgate_abstentions_total", ""),
        ("textgate_predictions_total", f'label="{UNKNOWN}"'),
    ):
        assert metric_value(after, name, labels) == metric_value(before, name, labels) + 1, name

    # The default request log is under BENTOML_HOME; the best label is kept.
    [line] = read_log(guarded_server.request_log)[logged_before:]
    assert line["label"] == UNKNOWN and line["abstained"] is True
    assert line["best_label"] in guarded_server.labels
    assert line["model_tag"] == guarded_server.model_tag

    # A model without a threshold answers with a real label.
    [plain] = classify(server.url, {"texts": [OFF_TOPIC]}).json()
    assert plain["label"] in server.labels and plain["abstained"] is False


# --- one answer, overload, logs, API surface --------------------------------------------------

# Many texts, on and off the topics of the tiny models, short and long.
AGREEMENT_TEXTS = [
    *TEXTS,
    "hello",
    "what is the meaning of life",
    OFF_TOPIC,
    "refund",
    "my card got swallowed by the cash machine and now I cannot pay for anything",
    "HELLO THERE!!!",
    "reset password " * 20,
]


@slow
def test_explain_answers_exactly_what_classify_answers(
    server: Server, guarded_server: Server
) -> None:
    auth = {"X-API-Key": API_KEY}
    # The ONNX server runs one text per forward pass: one request with every text.
    classified = classify(guarded_server.url, {"texts": AGREEMENT_TEXTS}, headers=auth).json()
    for target, headers, answers in (
        (guarded_server, auth, classified),
        (server, None, [None] * len(AGREEMENT_TEXTS)),
    ):
        for text, answer in zip(AGREEMENT_TEXTS, answers, strict=True):
            if answer is None:  # torch pads a batch: one text per request, as /explain
                [answer] = classify(target.url, {"texts": [text]}).json()
            explained = explain(target.url, {"text": text}, headers=headers)
            assert explained.status_code == 200, explained.text
            headline = {key: explained.json()[key] for key in ("label", "score", "abstained")}
            assert headline == answer, (target.url, text)


@slow
def test_a_rejected_request_leaves_no_text_and_no_traceback_in_the_log(server: Server) -> None:
    secret = "my card 4111 1111 1111 1111 zebra-secret-7"
    logged_before = server.serve_log.stat().st_size
    for payload in ({"texts": [secret * 100]}, {"texts": [secret, 7]}, {"texts": secret}):
        response = classify(server.url, payload)
        assert response.status_code == 400, response.text
    response = explain(server.url, {"text": secret * 20})
    assert response.status_code == 400, response.text
    assert classify(server.url, {"texts": ["hi"]}).status_code == 200  # the log is flushed
    new = server.serve_log.read_bytes()[logged_before:].decode("utf-8", errors="replace")
    # (the card's digits as written: a random hex trace id may hold "4111" by chance)
    assert "zebra" not in new and "4111 1111" not in new and "41111111" not in new
    assert "Traceback" not in new and "ERROR" not in new
    assert "rejected /classify: 400 ValidationError at texts.0 (string_too_long)" in new
    assert "rejected /explain: 400 ValidationError at text (string_too_long)" in new


@slow
@pytest.mark.parametrize(
    ("method", "path", "status"),
    [("GET", "/nowhere", 404), ("GET", "/classify", 405), ("DELETE", "/explain", 405)],
)
def test_unknown_routes_and_wrong_methods_are_json_errors(
    server: Server, method: str, path: str, status: int
) -> None:
    response = httpx.request(method, f"{server.url}{path}", timeout=10)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert path in response.json()["error"]


@slow
def test_errors_name_the_public_models_not_internal_classes(server: Server) -> None:
    for response in (
        classify(server.url, {"texts": 1}),
        explain(server.url, {"text": 1}),
        classify(server.url, {"texts": ["hi"], "extra": 1}),
    ):
        assert response.status_code == 400, response.text
        assert "IODescriptor" not in response.text
        assert "validation error for ClassifyRequest" in response.text or (
            "validation error for ExplainRequest" in response.text
        )


@slow
def test_the_log_and_the_openapi_document_tell_whether_a_key_is_needed(
    server: Server, guarded_server: Server
) -> None:
    assert "authentication is off: TEXTGATE_API_KEY is not set" in server.serve_log.read_text()
    guarded_log = guarded_server.serve_log.read_text()
    assert "authentication is on" in guarded_log and API_KEY not in guarded_log
    spec = httpx.get(f"{guarded_server.url}/docs.json", timeout=10).json()
    assert spec["components"]["securitySchemes"]["ApiKeyHeader"]["name"] == "X-API-Key"
    for route in ("/classify", "/explain"):
        assert {"ApiKeyHeader": []} in spec["paths"][route]["post"]["security"]
    assert "securitySchemes" not in json.dumps(httpx.get(f"{server.url}/docs.json").json())


@slow
def test_a_blank_api_key_stops_the_server_at_start(guarded_server: Server, tmp_path: Path) -> None:
    from tasks.served import ServedCheckError, serve_bento

    env = {"BENTOML_HOME": str(guarded_server.home), "TEXTGATE_API_KEY": "   "}
    serving = serve_bento(guarded_server.bento_tag, workdir=tmp_path, env=env, ready_timeout_s=60)
    with pytest.raises(ServedCheckError) as failed, serving:
        pass
    assert "TEXTGATE_API_KEY is set but blank" in str(failed.value)


def _burst(url: str, clients: int) -> list[httpx.Response]:
    """`clients` requests at once: half /classify, 64 texts of 2000 characters; half /explain."""
    big = {"texts": ["card " * 400] * 64}
    with httpx.Client(timeout=60) as client, ThreadPoolExecutor(max_workers=clients) as pool:
        futures = [
            pool.submit(client.post, f"{url}/classify", json=big)
            if i % 2 == 0
            else pool.submit(client.post, f"{url}/explain", json={"text": "lost card " * 40})
            for i in range(clients)
        ]
        return [future.result() for future in futures]


@slow
def test_overload_is_a_503_with_retry_after_and_where_it_starts(server: Server) -> None:
    from tests.helpers import REPO_ROOT
    from textgate.config import load_params

    serve = load_params(REPO_ROOT / "params.yaml").serve
    refused_at = {}
    for clients in (serve.max_concurrency, 64):
        responses = _burst(server.url, clients)
        refused = [r for r in responses if r.status_code != 200]
        for response in refused:
            assert response.status_code == 503, response.text
            assert response.headers["retry-after"] == str(serve.retry_after_s)
            assert response.json()["error"].startswith("overloaded: ")
        assert not any("unexpected error" in r.text for r in responses)
        refused_at[clients] = len(refused)
    print(f"refused requests by concurrent clients: {refused_at}")
    # Within one worker's limit nothing is refused; far beyond it, some are.
    assert refused_at[serve.max_concurrency] == 0
    assert refused_at[64] > 0


# --- fast tests: middleware, request log, settings ------------------------------------------


async def _echo(request: Request) -> JSONResponse:
    body = await request.body()
    return JSONResponse({"path": request.url.path, "bytes": len(body)})


def _app(*middleware: tuple[type, dict[str, object]]) -> TestClient:
    app = Starlette(routes=[Route("/{path:path}", _echo, methods=["GET", "POST"])])
    for cls, options in reversed(middleware):  # the first given is the outermost
        app.add_middleware(cls, **options)
    return TestClient(app)


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 401),
        ({"Authorization": "Bearer k3y"}, 200),
        ({"Authorization": "BEARER k3y"}, 200),
        ({"Authorization": "Bearer"}, 401),
        ({"Authorization": "Bearer k3y2"}, 401),
        ({"Authorization": "Token k3y"}, 401),
        ({"X-API-Key": "k3y"}, 200),
        ({"X-API-Key": ""}, 401),
        ({"X-API-Key": "nope", "Authorization": "Bearer k3y"}, 200),
    ],
)
def test_api_key_middleware(headers: dict[str, str], status: int) -> None:
    client = _app((ApiKeyMiddleware, {"api_key": "k3y"}))
    response = client.post("/classify", headers=headers, json={})
    assert response.status_code == status, response.text
    if status == 401:
        assert response.json()["error"].endswith(
            "'Authorization: Bearer <key>' or 'X-API-Key: <key>'"
        )
        assert response.headers["www-authenticate"] == 'Bearer realm="textgate"'
    for path in ("/readyz", "/livez", "/healthz", "/metrics", "/docs.json"):
        assert client.get(path).status_code == 200


def test_an_empty_api_key_turns_authentication_off(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _app((ApiKeyMiddleware, {"api_key": ""})).post("/classify").status_code == 200
    monkeypatch.setenv("TEXTGATE_API_KEY", "")
    assert configured_api_key() is None
    assert _app((ApiKeyMiddleware, {})).post("/classify").status_code == 200


@pytest.mark.parametrize("key", [" ", "   ", "\t\n"])
def test_a_blank_api_key_is_an_error_not_authentication_off(
    monkeypatch: pytest.MonkeyPatch, key: str
) -> None:
    monkeypatch.setenv("TEXTGATE_API_KEY", key)
    with pytest.raises(ConfigError, match="TEXTGATE_API_KEY is set but blank"):
        configured_api_key()
    with pytest.raises(ConfigError, match="set but blank"):
        ApiKeyMiddleware(_echo)


def test_the_api_key_is_used_without_surrounding_whitespace(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TEXTGATE_API_KEY", " k3y\n")
    assert configured_api_key() == "k3y"


def test_api_key_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEXTGATE_API_KEY", "from-env")
    client = _app((ApiKeyMiddleware, {}))
    assert client.post("/classify").status_code == 401
    assert client.post("/classify", headers={"X-API-Key": "from-env"}).status_code == 200
    monkeypatch.delenv("TEXTGATE_API_KEY")
    assert _app((ApiKeyMiddleware, {})).post("/classify").status_code == 200


def test_json_body_middleware() -> None:
    client = _app((JsonBodyMiddleware, {"routes": ["/classify"], "max_bytes": 100}))
    assert client.post("/classify", content=b"x" * 100).json() == {
        "path": "/classify",
        "bytes": 100,
    }
    assert client.post("/classify", content=b"x" * 101).status_code == 413
    assert client.post("/classify", content=iter([b"x" * 60, b"x" * 60])).status_code == 413
    assert client.post("/classify", content=iter([b"x" * 50, b"x" * 50])).json()["bytes"] == 100
    json_charset = {"content-type": "Application/JSON; charset=utf-8"}
    assert client.post("/classify", content=b"{}", headers=json_charset).status_code == 200
    response = client.post("/classify", content=b"{}", headers={"content-type": "text/csv"})
    assert response.status_code == 415
    assert response.json() == {"error": "Content-Type must be application/json, not 'text/csv'"}
    # Other routes are left alone.
    response = client.post("/other", content=b"x" * 500, headers={"content-type": "text/csv"})
    assert response.json()["bytes"] == 500


def test_request_log_appends_lines_and_survives_write_failures(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rotation = {"max_bytes": SETTINGS.request_log_max_bytes, "backups": 1}
    log = RequestLog(tmp_path / "nested" / "requests.jsonl", **rotation)
    log.append([{"text": "é", "n": 1}, {"text": "b", "n": 2}])
    log.append([{"text": "c", "n": 3}])
    assert read_log(log.path) == [
        {"text": "é", "n": 1},
        {"text": "b", "n": 2},
        {"text": "c", "n": 3},
    ]

    blocked = RequestLog(tmp_path / "a-directory", **rotation)
    blocked.path.mkdir()
    with caplog.at_level("ERROR", logger="bentoml.textgate"):
        blocked.append([{"text": "lost"}])
        blocked.append([{"text": "lost too"}])
        blocked.append([{"not json": object()}])
    errors = [record for record in caplog.records if record.levelname == "ERROR"]
    assert len(errors) == 1 and "a-directory" in errors[0].getMessage()


def test_request_log_is_owner_only_and_rotated_as_configured(tmp_path: Path) -> None:
    previous = os.umask(0o022)  # files would be 0644, directories 0755
    try:
        log = RequestLog(tmp_path / "nested" / "requests.jsonl", max_bytes=300, backups=2)
        for number in range(20):
            log.append([{"text": "x" * 40, "n": number}])
    finally:
        os.umask(previous)
    rotated = [log.path.with_name(f"requests.jsonl.{index}") for index in (1, 2)]
    for path in (log.path, *rotated):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.stat().st_size <= 300
    assert stat.S_IMODE(log.path.parent.stat().st_mode) == 0o700
    assert not log.path.with_name("requests.jsonl.3").exists()
    assert [line["n"] for line in read_log(rotated[1])][0] > 0  # the oldest were deleted


def test_request_log_rotation_comes_from_textgate_serve_else_the_params_defaults(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Served from source, the service's settings are params.yaml's (a bento records its own).
    serve = load_params(REPO_ROOT / PARAMS_FILE).serve
    monkeypatch.delenv("TEXTGATE_REQUEST_LOG_MAX_BYTES", raising=False)
    monkeypatch.delenv("TEXTGATE_REQUEST_LOG_BACKUPS", raising=False)
    assert request_log_rotation() == (serve.request_log_max_bytes, serve.request_log_backups)
    monkeypatch.setenv("TEXTGATE_REQUEST_LOG_MAX_BYTES", "2000000")
    monkeypatch.setenv("TEXTGATE_REQUEST_LOG_BACKUPS", "2")
    assert request_log_rotation() == (2_000_000, 2)
    monkeypatch.setenv("TEXTGATE_REQUEST_LOG_BACKUPS", "0")
    with pytest.raises(ValueError, match="TEXTGATE_REQUEST_LOG_BACKUPS must be a positive"):
        request_log_rotation()


def test_request_log_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, bentoml_home: Path):
    monkeypatch.setenv("TEXTGATE_REQUEST_LOG", str(tmp_path / "r.jsonl"))
    assert request_log_path() == tmp_path / "r.jsonl"
    monkeypatch.delenv("TEXTGATE_REQUEST_LOG")
    assert request_log_path() == bentoml_home / "textgate" / "requests.jsonl"


def test_unknown_routes_and_wrong_methods_get_json_errors() -> None:
    app = Starlette(routes=[Route("/classify", _echo, methods=["POST"])])
    app.add_middleware(JsonErrorsMiddleware)
    client = TestClient(app)
    missing = client.get("/nowhere")
    assert missing.status_code == 404
    assert missing.json() == {"error": "not found: no route /nowhere"}
    wrong = client.get("/classify")
    assert wrong.status_code == 405
    assert wrong.json()["error"].startswith("method not allowed: GET /classify; allowed: POST")
    assert "POST" in wrong.headers["allow"]
    assert client.post("/classify", content=b"ab").json() == {"path": "/classify", "bytes": 2}


FULL = 100  # bytes of a full request in these tests


def _overload_app(handler, max_concurrency: int = 2) -> TestClient:  # type: ignore[no-untyped-def]
    app = Starlette(routes=[Route("/classify", handler, methods=["POST"])])
    app.add_middleware(
        OverloadMiddleware,
        routes=["/classify"],
        max_concurrency=max_concurrency,
        retry_after_s=3,
        full_request_bytes=FULL,
    )
    return TestClient(app)


def _assert_overloaded(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert response.headers["retry-after"] == "3"
    assert response.json()["error"].startswith("overloaded: ")
    assert "unexpected error" not in response.text


def test_requests_beyond_the_concurrency_limit_get_503_with_retry_after() -> None:
    import threading

    import anyio

    release, two_in = threading.Event(), threading.Barrier(3)

    async def slow(request: Request) -> JSONResponse:
        if request.query_params.get("hold"):
            await anyio.to_thread.run_sync(two_in.wait)
            await anyio.to_thread.run_sync(release.wait)
        return JSONResponse({"ok": True})

    full = b"x" * FULL
    with _overload_app(slow) as client, ThreadPoolExecutor(max_workers=2) as pool:
        held = [pool.submit(client.post, "/classify?hold=1", content=full) for _ in range(2)]
        two_in.wait(timeout=10)  # both held requests are inside
        refused = client.post("/classify", content=full)
        light = client.post("/classify", content=b"x")  # refused too: the worker is full
        release.set()
        assert [future.result().status_code for future in held] == [200, 200]
        assert client.post("/classify", content=full).status_code == 200  # free again
    _assert_overloaded(refused)
    _assert_overloaded(light)
    assert "2 full requests' worth of work in flight per worker" in refused.json()["error"]


def test_short_requests_weigh_their_share_of_a_full_one() -> None:
    async def ok(request: Request) -> JSONResponse:
        return JSONResponse({"ok": True})

    middleware = OverloadMiddleware(ok, ["/classify", "/explain"], 2, 3, full_request_bytes=FULL)
    headers = [(b"content-length", b"10")]
    assert middleware.weight({"path": "/classify", "headers": headers}) == 0.1
    assert middleware.weight({"path": "/classify", "headers": [(b"content-length", b"999")]}) == 1
    assert middleware.weight({"path": "/classify", "headers": []}) == 1  # size unknown
    assert middleware.weight({"path": "/explain", "headers": headers}) == 1  # not weighed
    # One full request and ten of a tenth fill a worker of two; one more does not fit.
    middleware.in_flight, middleware.load = 11, 2.0
    assert not middleware.admits(0.1)
    middleware.in_flight, middleware.load = 10, 1.9
    assert middleware.admits(0.1)
    # 16 clients of one short text each (the bench's load) all fit in one worker.
    middleware.in_flight, middleware.load = 15, 15 * 0.01
    assert middleware.admits(0.01)
    # Nothing in flight: even a request heavier than the limit is taken.
    middleware.in_flight, middleware.load = 0, 0.0
    assert OverloadMiddleware(ok, ["/classify"], 0, 3).admits(1.0)


def test_the_batch_queues_generic_503_becomes_an_overload_answer() -> None:
    async def busy(request: Request) -> JSONResponse:
        generic = {"error": "An unexpected error has occurred, please check the server log."}
        return JSONResponse(generic, status_code=503)

    _assert_overloaded(_overload_app(busy).post("/classify"))


def test_openapi_declares_the_api_key_when_one_is_required(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spec = {"paths": {"/classify": {"post": {}}, "/livez": {"get": {}}}}

    async def docs(request: Request) -> JSONResponse:
        return JSONResponse(spec)

    def served_spec() -> dict:
        app = Starlette(routes=[Route("/docs.json", docs)])
        app.add_middleware(OpenApiSecurityMiddleware, routes=["/classify"])
        return TestClient(app).get("/docs.json").json()

    monkeypatch.setenv("TEXTGATE_API_KEY", "k3y")
    secured = served_spec()
    schemes = secured["components"]["securitySchemes"]
    assert schemes["ApiKeyHeader"] == {"type": "apiKey", "in": "header", "name": "X-API-Key"}
    assert schemes["BearerAuth"] == {"type": "http", "scheme": "bearer"}
    assert secured["paths"]["/classify"]["post"]["security"] == [
        {"ApiKeyHeader": []},
        {"BearerAuth": []},
    ]
    assert "security" not in secured["paths"]["/livez"]["get"]
    monkeypatch.delenv("TEXTGATE_API_KEY")
    assert served_spec() == spec


SECRET = "my card 4111 1111 1111 1111 zebra-secret-7"


def test_a_rejected_request_is_logged_as_one_line_without_its_text() -> None:
    from bentos.service import ClassifyRequest

    try:
        ClassifyRequest(texts=[SECRET * 100])
    except ValueError as error:
        exc_info = (type(error), error, error.__traceback__)
    record = logging.LogRecord(
        "bentoml._internal.server.http_app",
        logging.ERROR,
        __file__,
        1,
        "Exception on %s [%s]",
        ("/classify", "POST"),
        exc_info,
    )
    assert RejectionLogFilter().filter(record)
    line = logging.Formatter().format(record)
    assert record.levelname == "WARNING" and record.exc_info is None
    assert line == "rejected /classify: 400 ValidationError at texts.0 (string_too_long)"
    assert "zebra" not in line and "4111" not in line


def test_other_errors_keep_their_traceback() -> None:
    try:
        raise RuntimeError("a bug")
    except RuntimeError as error:
        exc_info = (type(error), error, error.__traceback__)
    record = logging.LogRecord("x", logging.ERROR, __file__, 1, "boom", (), exc_info)
    assert RejectionLogFilter().filter(record)
    assert record.levelname == "ERROR" and record.exc_info is exc_info


def test_served_from_source_the_service_takes_its_settings_from_params_yaml() -> None:
    params = load_params(REPO_ROOT / PARAMS_FILE)
    assert ServiceSettings.from_params(params) == SETTINGS
    assert SETTINGS.max_concurrency == params.serve.max_concurrency
    assert SETTINGS.max_text_chars == params.validate_.max_text_chars


def test_bento_arguments_override_params_yaml(monkeypatch: pytest.MonkeyPatch) -> None:
    # As `bentoml serve --arg ...` gives them: strings.
    arguments = {"max_concurrency": "3", "max_text_chars": "50", "model_name": "other"}
    monkeypatch.setattr(service.bentoml, "use_arguments", lambda: SimpleNamespace(**arguments))
    settings = service_settings()
    assert (settings.max_concurrency, settings.max_text_chars) == (3, 50)
    assert settings.model_name == "other"
    assert settings.retry_after_s == SETTINGS.retry_after_s  # not given: params.yaml's

    arguments["max_concurrency"] = "0"
    with pytest.raises(ConfigError, match="max_concurrency"):
        service_settings()


def test_a_bento_without_its_settings_or_params_yaml_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(service, "SOURCE_PARAMS", tmp_path / PARAMS_FILE)
    arguments = {"model_tag": "m:1", "max_concurrency": "3"}
    monkeypatch.setattr(service.bentoml, "use_arguments", lambda: SimpleNamespace(**arguments))
    with pytest.raises(ConfigError, match="retry_after_s.*build the bento with tasks.package"):
        service_settings()


@slow
def test_a_bento_serves_with_the_params_it_was_packaged_with(
    bentoml_home: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    from tasks.package import package_model
    from tests.bentos.conftest import private_home
    from tests.helpers import merge, raw_params
    from tests.serving import bentoml_serve
    from textgate.config import parse_params

    params = parse_params(merge(raw_params(), {"validate": {"max_text_chars": 20}}))
    packaged = package_model(tiny_model_dir, params=params, metrics={}, lineage={"test": "20"})
    env = {
        "BENTOML_HOME": str(private_home(bentoml_home, packaged.bento_tag, tmp_path / "home")),
        "TEXTGATE_API_KEY": "",
        "TEXTGATE_WORKERS": "1",
        "TEXTGATE_THREADS": "1",
        "TEXTGATE_REQUEST_LOG": str(tmp_path / "requests.jsonl"),
    }
    workdir = tmp_path / "elsewhere"  # no params.yaml here, nor in the bento
    workdir.mkdir()
    with bentoml_serve(packaged.bento_tag, workdir, env) as url:
        assert classify(url, {"texts": ["x" * 20]}).status_code == 200
        response = classify(url, {"texts": ["x" * 21]})
    assert response.status_code == 400
    assert "string_too_long" in response.text


def test_while_shedding_direct_clients_are_told_to_close_and_the_supervisor_is_not(
    tmp_path: Path,
) -> None:
    import asyncio

    async def ok(scope: dict, receive: object, send: object) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})  # type: ignore[operator]
        await send({"type": "http.response.body", "body": b"ok"})  # type: ignore[operator]

    flag = tmp_path / "shed"
    middleware = ShedMiddleware(ok, str(flag), "127.0.0.2")  # type: ignore[arg-type]
    middleware.CHECK_EVERY_S = 0.0

    def connection_header(client: str) -> bytes | None:
        sent: list[dict] = []

        async def send(message: dict) -> None:
            sent.append(message)

        scope = {"type": "http", "path": "/classify", "client": (client, 40000)}
        asyncio.run(middleware(scope, None, send))  # type: ignore[arg-type]
        assert sent[1]["body"] == b"ok"
        return dict(sent[0]["headers"]).get(b"connection")

    assert connection_header("127.0.0.1") is None
    flag.touch()
    assert connection_header("127.0.0.1") == b"close"
    assert connection_header("127.0.0.2") is None  # the supervisor's checks and proxy
    flag.unlink()
    assert connection_header("127.0.0.1") is None
    unset = ShedMiddleware(ok, "", "")  # type: ignore[arg-type]
    assert unset.path == ""  # a bento not on a slot never sheds
