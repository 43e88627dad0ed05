"""Served bentos for the service and fuzz tests: two real `bentoml serve` processes a session.

`server`: model A served while a newer model B is `latest`, from an unrelated directory, with
TEXTGATE_MODEL_TAG pointing at B (a bento must still serve its own model), no API key, the
torch runtime (answers are compared with the torch model offline) and a request log in a
temporary directory.

`guarded_server`: a model with an abstention threshold no text reaches and an int8 ONNX
export, served with an API key, the CPU bento's own runtime (ONNX, no torch), the former thread
variable and the default request log path.

Each server gets a BentoML home of its own (a copy of the store's entries it needs): BentoML
keeps a server's Prometheus files under its home and wipes them when another server starts
there, so two servers sharing one home lose each other's metrics.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT
from tests.serving import bentoml_serve
from textgate.config import load_params
from textgate.model import TextClassifier

API_KEY = "test-key-0123456789"
# The tiny untrained model scores about 1/3 for every text, far below this.
ABSTAIN_THRESHOLD = 0.99
# The texts tests/bentos/test_service.py uses to tell answers apart (see decisive_model_dir).
PROBE_TEXTS = [
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
    model_tag: str  # the model the bento was built with
    labels: list[str]
    request_log: Path
    serve_log: Path  # the server's own output
    served: TextClassifier | None = None  # the same model, loaded offline
    newer_model_tag: str = ""  # a model saved after it (`latest`)
    bento_tag: str = ""
    home: Path | None = None  # its BENTOML_HOME


def private_home(bentoml_home: Path, bento_tag: str, home: Path) -> Path:
    """A new BentoML home at `home` with the bento `bento_tag` and a copy of the model store."""
    import bentoml

    bento = bentoml.bentos.get(bento_tag)
    shutil.copytree(bento.path, home / "bentos" / bento.tag.name / bento.tag.version)
    shutil.copytree(bentoml_home / "models", home / "models")
    return home


@pytest.fixture(scope="session")
def decisive_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny_model_dir with a classification head that tells the probe texts apart.

    The untrained tiny model gives every text nearly the same scores (about 1/3), which
    could not show a reordered or mixed-up response. A random head centred on the encoder's
    outputs for PROBE_TEXTS and scaled to a logit spread of 1 (forward passes only, no
    training) spreads the scores over about 0.1 to 0.9 while float32 noise stays near 1e-5.
    """
    import torch
    from transformers import AutoTokenizer

    from textgate.io import read_json
    from textgate.model import (
        LABEL_MAP_FILE,
        TRAINING_FILE,
        load_sequence_classifier,
        mean_pooled,
        save_classifier,
    )

    model = load_sequence_classifier(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        batch = tokenizer(
            PROBE_TEXTS, truncation=True, max_length=32, padding=True, return_tensors="pt"
        )
        states = model.bert(**batch).last_hidden_state
        pooled = mean_pooled(states, batch["attention_mask"])  # what the head reads
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
def abstaining_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny_model_dir with an abstention threshold of 0.99 in its metadata, exported to ONNX."""
    from textgate.export import export_onnx
    from textgate.model import TRAINING_FILE

    out = tmp_path_factory.mktemp("abstaining-model") / "model"
    shutil.copytree(tiny_model_dir, out)
    training = json.loads((out / TRAINING_FILE).read_text(encoding="utf-8"))
    training["abstention"] = {"threshold": ABSTAIN_THRESHOLD}
    (out / TRAINING_FILE).write_text(json.dumps(training, indent=2), encoding="utf-8")
    export_onnx(out)
    return out


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

    request_log = tmp_path_factory.mktemp("request-log") / "requests.jsonl"
    home = tmp_path_factory.mktemp("server-home") / "bentoml"
    env = {
        "BENTOML_HOME": str(private_home(bentoml_home, served.bento_tag, home)),
        # Must be ignored: a built bento serves the model recorded in it.
        "TEXTGATE_MODEL_TAG": newer.model_tag,
        "TEXTGATE_RUNTIME": "torch",
        "TEXTGATE_THREADS": "1",
        "TEXTGATE_REQUEST_LOG": str(request_log),
        "TEXTGATE_API_KEY": "",  # empty: no authentication
    }
    workdir = tmp_path_factory.mktemp("serve-from-elsewhere")
    offline = TextClassifier(decisive_model_dir)
    with bentoml_serve(served.bento_tag, workdir, env) as url:
        yield Server(
            url=url,
            model_tag=served.model_tag,
            labels=offline.labels,
            request_log=request_log,
            serve_log=workdir / "bentoml-serve.log",
            served=offline,
            newer_model_tag=newer.model_tag,
            bento_tag=served.bento_tag,
        )


@pytest.fixture(scope="session")
def guarded_server(
    bentoml_home: Path, abstaining_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    from tasks.package import package_model

    params = load_params(REPO_ROOT / "params.yaml")
    packaged = package_model(abstaining_model_dir, params=params, metrics={}, lineage={})
    home = private_home(
        bentoml_home, packaged.bento_tag, tmp_path_factory.mktemp("guarded-home") / "bentoml"
    )
    env = {
        "BENTOML_HOME": str(home),
        "TEXTGATE_API_KEY": API_KEY,
        "TEXTGATE_TORCH_THREADS": "1",  # the former name of TEXTGATE_THREADS
        # Empty is unset: the defaults, whatever this process's environment says.
        "TEXTGATE_THREADS": "",
        "TEXTGATE_RUNTIME": "",
        "TEXTGATE_REQUEST_LOG": "",
    }
    workdir = tmp_path_factory.mktemp("serve-guarded")
    with bentoml_serve(packaged.bento_tag, workdir, env) as url:
        yield Server(
            url=url,
            model_tag=packaged.model_tag,
            labels=TextClassifier(abstaining_model_dir).labels,
            request_log=home / "textgate" / "requests.jsonl",  # the default
            serve_log=workdir / "bentoml-serve.log",
            bento_tag=packaged.bento_tag,
            home=home,
        )
