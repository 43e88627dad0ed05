"""The packaged service through a real `bentoml serve <bento>` on a free loopback port.

One session fixture packages two models: A (served) and then B, so that `latest` points at
B. The server runs bento A from an unrelated directory, with TEXTGATE_MODEL_TAG set to B, and
must still answer exactly like A offline: the bento is pinned to its own model.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.serving import bentoml_serve
from textgate.config import load_params
from textgate.model import TextClassifier

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[2]
# Batched with other requests, a text is padded to a different length, which moves float32
# scores by up to about 1e-4 here; a result routed to the wrong text is off by far more.
BATCHED_TOLERANCE = 1e-3
TEXTS = [
    "I lost my card yesterday",
    "password reset does not work",
    "please refund my order",
    "hello there",
    "my wallet was stolen with all my cards in it",
    "cannot sign in to the app",
    "call me on +44 20 7946 0958",
    "x",
]


@dataclass(frozen=True)
class Server:
    url: str
    served: TextClassifier  # model A, loaded offline from the same directory
    newer_model_tag: str  # model B, saved after A


@pytest.fixture(scope="session")
def decisive_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny_model_dir with a classification head that tells the probe texts apart.

    The untrained tiny model gives every text nearly the same scores (about 1/3), which
    could not show a reordered or mixed-up response. A random head centred on the encoder's
    outputs for TEXTS and scaled to a logit spread of 1 (forward passes only, no training)
    spreads the scores over about 0.1 to 0.9 while float32 noise stays near 1e-5.
    """
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from textgate.io import read_json
    from textgate.model import LABEL_MAP_FILE, TRAINING_FILE, save_classifier, tokenize

    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        pooled = model.bert(**tokenize(tokenizer, TEXTS, 32)).pooler_output  # (texts, hidden)
        mean = pooled.mean(0)
        generator = torch.Generator().manual_seed(0)
        weight = torch.randn(model.config.num_labels, pooled.shape[1], generator=generator)
        weight = weight / ((pooled - mean) @ weight.T).std()
        model.classifier.weight.copy_(weight)
        model.classifier.bias.copy_(-(weight @ mean))
    return save_classifier(
        model,
        tokenizer,
        read_json(tiny_model_dir / LABEL_MAP_FILE)["labels"],
        read_json(tiny_model_dir / TRAINING_FILE),
        tmp_path_factory.mktemp("decisive-model") / "model",
    )


@pytest.fixture(scope="session")
def server(
    bentoml_home: Path,
    decisive_model_dir: Path,
    tiny_model_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Server]:
    from tasks.package import package_model

    params = load_params(REPO_ROOT / "params.yaml")
    served = package_model(decisive_model_dir, params=params, metrics={}, lineage={"test": "A"})
    newer = package_model(tiny_model_dir, params=params, metrics={}, lineage={"test": "B"})

    env = {
        "BENTOML_HOME": str(bentoml_home),
        # Must be ignored: a built bento serves the model recorded in it.
        "TEXTGATE_MODEL_TAG": newer.model_tag,
        "TEXTGATE_TORCH_THREADS": "1",
    }
    workdir = tmp_path_factory.mktemp("serve-from-elsewhere")
    with bentoml_serve(served.bento_tag, workdir, env) as url:
        yield Server(url, TextClassifier(decisive_model_dir), newer.model_tag)


def classify(url: str, payload: object, client: httpx.Client | None = None) -> httpx.Response:
    poster = client or httpx
    return poster.post(f"{url}/classify", json=payload, timeout=30)


def assert_matches_offline(
    results: list[dict[str, object]],
    texts: Sequence[str],
    classifier: TextClassifier,
    tolerance: float = 1e-4,
) -> None:
    """One result per text, in order, equal to the offline prediction for that text.

    The label must be the offline argmax up to `tolerance` (so a float-noise near-tie
    cannot fail the test) and its score the offline probability of that label.
    """
    assert isinstance(results, list) and len(results) == len(texts)
    probabilities = classifier.predict_proba(texts)  # (texts, labels)
    for text, result, row in zip(texts, results, probabilities, strict=True):
        assert set(result) == {"label", "score"}, text
        assert result["label"] in classifier.labels, text
        assert isinstance(result["score"], float) and 0.0 <= result["score"] <= 1.0, text
        offline = float(row[classifier.labels.index(result["label"])])
        assert offline >= row.max() - tolerance, (text, result, row)
        assert result["score"] == pytest.approx(offline, abs=tolerance), text


def test_the_probe_texts_get_distinct_answers(server: Server) -> None:
    # Guards the other tests: were the answers alike, a reordering would go unnoticed. The
    # model is random, so allow one pair of look-alike answers out of the 28.
    predictions = server.served.predict(TEXTS)
    assert len({p.label for p in predictions}) >= 2
    alike = [
        (a, b)
        for i, a in enumerate(predictions)
        for b in predictions[i + 1 :]
        if a.label == b.label and abs(a.score - b.score) <= 2 * BATCHED_TOLERANCE
    ]
    assert len(alike) <= 1, alike


def test_classifies_several_texts_in_order(server: Server) -> None:
    texts = TEXTS[:3]
    response = classify(server.url, {"texts": texts})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert_matches_offline(response.json(), texts, server.served)


def test_serves_the_model_it_was_built_with(server: Server) -> None:
    # Model B is `latest` and named by TEXTGATE_MODEL_TAG, yet the bento serves A.
    response = classify(server.url, {"texts": TEXTS})
    assert response.status_code == 200, response.text
    assert_matches_offline(response.json(), TEXTS, server.served)
    newer = TextClassifier(_model_path(server.newer_model_tag))
    newer_scores = [p.score for p in newer.predict(TEXTS)]
    served_scores = [r["score"] for r in response.json()]
    assert served_scores != pytest.approx(newer_scores, abs=1e-4)


def _model_path(tag: str) -> str:
    import bentoml

    return bentoml.models.get(tag).path


def test_single_text(server: Server) -> None:
    response = classify(server.url, {"texts": ["refund please"]})
    assert response.status_code == 200, response.text
    assert_matches_offline(response.json(), ["refund please"], server.served)


@pytest.mark.parametrize(
    ("payload", "problem"),
    [
        pytest.param({"texts": []}, "at least 1 item", id="empty-list"),
        pytest.param({"texts": [""]}, "at least 1 character", id="empty-string"),
        pytest.param({"texts": ["ok", "   "]}, "non-whitespace", id="blank-string"),
        pytest.param({}, "Field required", id="missing-texts"),
        pytest.param({"text": ["hello"]}, "Field required", id="misspelt-key"),
        pytest.param({"texts": "hello"}, "valid array", id="string-not-list"),
        pytest.param({"texts": [1, 2]}, "valid string", id="numbers"),
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


def test_malformed_json_is_a_4xx(server: Server) -> None:
    response = httpx.post(
        f"{server.url}/classify",
        content=b'{"texts": ["unterminated',
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert 400 <= response.status_code < 500, (response.status_code, response.text)
    assert "json" in response.text.lower()


def test_concurrent_requests_each_get_their_own_answers_in_order(server: Server) -> None:
    # Different lengths and orders per request, so a batch split at the wrong place or a
    # result delivered to the wrong request would show.
    requests = [TEXTS[i:] + TEXTS[:i] for i in range(len(TEXTS))]
    requests += [TEXTS[i : i + 1 + i % 3] for i in range(len(TEXTS))]

    with httpx.Client() as client, ThreadPoolExecutor(max_workers=8) as pool:
        responses = list(
            pool.map(lambda texts: classify(server.url, {"texts": texts}, client), requests)
        )

    for texts, response in zip(requests, responses, strict=True):
        assert response.status_code == 200, response.text
        assert_matches_offline(response.json(), texts, server.served, BATCHED_TOLERANCE)


def test_openapi_documents_the_request_limits(server: Server) -> None:
    spec = httpx.get(f"{server.url}/docs.json", timeout=10).json()
    schema = json.dumps(spec)
    assert "/classify" in schema
    assert '"maxItems": 64' in schema and '"minItems": 1' in schema
