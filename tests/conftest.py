"""Shared fixtures: a tiny randomly initialised BERT (no download) and tiny datasets."""

from __future__ import annotations

import atexit
import os
import random
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["BENTOML_DO_NOT_TRACK"] = "True"
# BentoML resolves its home once per process: point it at a throwaway store before any test
# imports bentoml, so tests never touch the user's ~/bentoml.
_BENTOML_HOME = tempfile.mkdtemp(prefix="textgate-tests-bentoml-")
os.environ["BENTOML_HOME"] = _BENTOML_HOME
atexit.register(shutil.rmtree, _BENTOML_HOME, ignore_errors=True)

# Prefect sets up its log handlers when `prefect.main` is first imported, bound to the
# sys.stderr of that moment. Do it now, under pytest's session-wide capture: a test that
# imported it first under `capsys` would leave the handlers writing to a stream closed after
# that test ("--- Logging error --- ... I/O operation on closed file" in every later test).
import prefect.main  # noqa: E402, F401

from bench.workspace import build_tiny_bert  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]

# Few distinctive words per intent, so a tiny model learns them in a couple of epochs.
INTENT_WORDS = {
    "refund": ["refund", "money back", "reimburse", "return my payment"],
    "lost_card": ["lost card", "stolen card", "card missing", "wallet stolen"],
    "login": ["password", "login", "sign in", "locked out"],
}
FILLERS = ["hi", "hello", "please help", "thanks", "urgent", "today", "asap", "team"]


def make_rows(per_class: int = 12, seed: int = 0) -> list[tuple[str, str]]:
    """A few dozen unique (text, label) rows over three intents."""
    rng = random.Random(seed)
    rows: list[tuple[str, str]] = []
    for label, words in INTENT_WORDS.items():
        seen: set[str] = set()
        while len(seen) < per_class:
            text = f"{rng.choice(FILLERS)} {rng.choice(words)} {rng.choice(FILLERS)} {len(seen)}"
            seen.add(text)
        rows += [(text, label) for text in sorted(seen)]
    return rows


def write_csv(path: Path, rows: list[tuple[str, str]], header: str = "text,label") -> Path:
    import csv

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header.split(","))
        writer.writerows(rows)
    return path


@pytest.fixture(scope="session")
def bentoml_home() -> Path:
    """The session's throwaway BentoML store (checked to be the one BentoML actually uses)."""
    from bentoml._internal.configuration.containers import BentoMLContainer

    home = Path(_BENTOML_HOME)
    assert Path(BentoMLContainer.bentoml_home.get()) == home
    return home


@pytest.fixture(scope="session")
def tiny_base_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised 2-layer BERT (hidden size 32) with the MiniLM tokenizer.

    Seeded: the same random encoder in every session, so tests that train are stable.
    """
    return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), seed=0)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_base_model: Path) -> Path:
    """An untrained but complete textgate model directory (for serving and packaging tests)."""
    from textgate.model import build_classifier, save_classifier

    labels = sorted(INTENT_WORDS)
    model, tokenizer = build_classifier(str(tiny_base_model), labels)
    out = tmp_path_factory.mktemp("tiny-model") / "model"
    metadata = {"max_length": 32, "redact_pii": True, "base_model": str(tiny_base_model)}
    return save_classifier(model, tokenizer, labels, metadata, out)


@pytest.fixture(autouse=True)
def _file_registry_unless_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    """A TEXTGATE_REGISTRY in the caller's shell would point every test at a real database."""
    monkeypatch.delenv("TEXTGATE_REGISTRY", raising=False)


@pytest.fixture(scope="session")
def postgres_server():
    """A throwaway PostgreSQL for the session (tests/shared_state.py); skips without one."""
    from tests.shared_state import local_postgres
    from textgate import pglocal

    missing = pglocal.missing_binaries()
    if missing:
        pytest.skip(f"PostgreSQL programs not on PATH: {', '.join(missing)}")
    with local_postgres() as server:
        yield server


@pytest.fixture
def postgres_url(postgres_server) -> str:
    """The URL of a new, empty database on the session's PostgreSQL."""
    from tests.shared_state import fresh_database

    return fresh_database(postgres_server)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory):
    """A real S3-compatible server (moto's) on loopback for the session; skips without moto."""
    pytest.importorskip("moto.server", reason="moto[server] is not installed (the dev extra)")
    from tests.shared_state import moto_s3

    with moto_s3(tmp_path_factory.mktemp("moto")) as server:
        yield server


@pytest.fixture
def s3_env(s3_server, monkeypatch: pytest.MonkeyPatch):
    """This process's AWS environment pointed at the session's S3 server, with a new bucket;
    yields (server, bucket name)."""
    import uuid

    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    bucket = f"team-{uuid.uuid4().hex[:10]}"
    s3_server.make_bucket(bucket)
    return s3_server, bucket
