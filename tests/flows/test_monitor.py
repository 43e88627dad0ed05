"""The drift monitor flow under prefect_test_harness, on a tiny model and a synthetic log.

The tests run in order and share one workspace: a production model (the tiny random BERT,
in the session's BentoML store) trained on three keyword intents; the deployments registered
on the test server; a webhook notification block posting to a real HTTP receiver on loopback.
The request log goes from missing, to empty, to too small with malformed lines, to enough
in-distribution traffic (no drift, nothing triggered), to shifted traffic (drift: a run of the
training deployment is created and an alert received), to more shifted traffic within the
cooldown with an unreachable webhook (drift reported, nothing triggered, the run still ends
as it should).
"""

from __future__ import annotations

import json
import random
import shutil
import threading
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.conftest import FILLERS, make_rows
from tests.helpers import REPO_ROOT, merge, raw_params
from tests.serving import free_port, local_http_server
from textgate.registry import Registry, Release
from textgate.text import text_fingerprint

pytestmark = pytest.mark.slow

# Traffic unlike the training data: other intents, other words, longer texts, one label.
SHIFTED_TOPICS = [
    "my parcel has not arrived and the tracking page says it is stuck in customs since monday",
    "the delivery driver left the package at the wrong address and nobody answers the phone",
    "can you change the shipping method to express because the event is on friday morning",
    "the courier damaged the box and the glass inside is broken into many small pieces",
]


class Receiver(BaseHTTPRequestHandler):
    """Collects the JSON bodies POSTed to it (the notification webhook)."""

    received: list[dict] = []
    lock = threading.Lock()

    def do_POST(self) -> None:  # noqa: N802 (the stdlib's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.lock:
            self.received.append(body)
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args) -> None:  # quiet
        pass


def log_line(text: str, label: str, index: int) -> str:
    return json.dumps(
        {
            "ts": f"2026-01-01T00:{index // 60 % 60:02d}:{index % 60:02d}+00:00",
            "request_id": f"req-{index}",
            "model_tag": "textgate-classifier:tiny",
            "text": text,
            "label": label,
            "best_label": label,
            "score": 0.9,
            "abstained": False,
        }
    )


def append(path: Path, lines: list[str]) -> None:
    with path.open("a", encoding="utf-8") as handle:
        handle.writelines(line + "\n" for line in lines)


def unshifted(seeds: list[int]) -> list[str]:
    """In-distribution traffic: the training data's generator, other seeds, true labels."""
    rows = [row for seed in seeds for row in make_rows(per_class=30, seed=seed)]
    random.Random(0).shuffle(rows)
    return [log_line(text, label, i) for i, (text, label) in enumerate(rows)]


def shifted(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for i in range(count):
        text = f"{rng.choice(FILLERS)} {rng.choice(SHIFTED_TOPICS)} {rng.choice(FILLERS)} {i}"
        lines.append(log_line(text, "refund", i))
    return lines


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_model_dir, bentoml_home) -> Path:
    """Params, a prepared train split, and a production model trained on it (per its seen file)."""
    import bentoml

    root = tmp_path_factory.mktemp("monitor-workspace")
    train = pd.DataFrame(make_rows(per_class=30, seed=0), columns=["text", "label"])
    newer = pd.DataFrame([("a newer example about invoices", "refund")], columns=["text", "label"])
    (root / "prepare").mkdir()
    pd.concat([train, newer]).to_parquet(root / "prepare" / "train.parquet")
    model_dir = root / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    fingerprints = sorted({text_fingerprint(text) for text in train["text"]})
    (model_dir / "seen_texts.txt").write_text("".join(f"{fp}\n" for fp in fingerprints))
    with bentoml.models.create(name="textgate-classifier") as model:
        shutil.copytree(model_dir, model.path, dirs_exist_ok=True)
        model_tag = str(model.tag)
    Registry(root / "registry.json").promote(
        Release.create(bento_tag="textgate:tiny", model_tag=model_tag, reason="test")
    )
    params = merge(
        raw_params(),
        {
            "prepare": {"output_dir": str(root / "prepare")},
            "registry": {"path": str(root / "registry.json")},
            "monitor": {
                "request_log": str(root / "requests.jsonl"),
                "state_dir": str(root / "monitor"),
                "min_requests": 50,
                "sample_size": 80,
                "mmd_permutations": 200,
            },
            "notify": {"block": "textgate-alerts"},
        },
    )
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


@pytest.fixture(scope="module")
def receiver():
    with local_http_server(Receiver) as url:
        yield url


@pytest.fixture(scope="module")
def deployed(harness, workspace, receiver):
    """The deployments and the webhook block, on the test server."""
    from flows.deploy import deploy_all
    from flows.notify import save_webhook_block
    from textgate.config import load_params

    deploy_all(REPO_ROOT, load_params(workspace / "params.yaml"))
    save_webhook_block("textgate-alerts", receiver)
    return workspace


def run_monitor(workspace: Path):
    from flows.monitor import drift_monitor

    return drift_monitor(params_path="params.yaml", repo_dir=str(workspace), return_state=True)


def training_runs() -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    from flows.deploy import PIPELINE_DEPLOYMENT

    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(PIPELINE_DEPLOYMENT)
        return client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id]))
        )


def state_file(workspace: Path) -> dict:
    path = workspace / "monitor" / "state.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def test_missing_log_is_not_enough_data(deployed):
    state = run_monitor(deployed)
    assert state.is_completed() and state.name == "No data"
    assert state.message.startswith("not enough data: no request log at")
    assert "(0 requests < 50)" in state.message
    assert training_runs() == [] and Receiver.received == []


def test_empty_log_is_not_enough_data(deployed):
    (deployed / "requests.jsonl").write_text("")
    state = run_monitor(deployed)
    assert state.name == "Not enough data"
    assert state.message == (
        "not enough data: 0 requests < 50 (monitor.min_requests) since the last check"
    )


def test_too_few_requests_with_malformed_lines(deployed):
    log = deployed / "requests.jsonl"
    append(log, unshifted([1])[:12])
    append(log, ["{oops", '"a string"', json.dumps({"text": "no other field"})])
    state = run_monitor(deployed)
    assert state.name == "Not enough data"
    assert state.message.startswith("not enough data: 12 requests < 50")
    assert "3 malformed line(s) skipped" in state.message
    summary = state.result()
    assert summary["malformed"] == 3 and summary["requests"] == 12
    assert any("malformed" in note and "not JSON" in note for note in summary["notes"])
    assert "cursor" not in state_file(deployed)  # the window keeps growing
    assert training_runs() == [] and Receiver.received == []


def test_in_distribution_traffic_triggers_nothing(deployed):
    append(deployed / "requests.jsonl", unshifted([2, 3]))
    state = run_monitor(deployed)
    assert state.is_completed() and state.name == "No drift", state.message
    summary = state.result()
    assert summary["requests"] == 12 + 180  # the earlier 12 were still in the window
    assert {check["name"] for check in summary["checks"]} == {
        "label_psi",
        "embedding_mmd",
        "length_ks",
        "abstention_rate",
    }
    assert not any(check["drifted"] for check in summary["checks"])
    assert training_runs() == [] and Receiver.received == []
    saved = state_file(deployed)
    assert saved["cursor"]["offset"] == (deployed / "requests.jsonl").stat().st_size
    assert saved["status"] == "no_drift"
    reference = list((deployed / "monitor" / "reference").glob("*.npz"))
    assert len(reference) == 1  # cached for the next checks

    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        artifact = client.read_latest_artifacts()
    reports = [a for a in artifact if a.key == "drift-report"]
    assert reports and "| embedding_mmd |" in reports[0].data
    assert "1 newer ones left out" in reports[0].data


def test_shifted_traffic_triggers_training_and_an_alert(deployed):
    append(deployed / "requests.jsonl", shifted(150, seed=0))
    state = run_monitor(deployed)
    assert state.is_completed() and state.name == "Drift detected", state.message
    summary = state.result()
    assert summary["requests"] == 150  # only what came after the last check
    fired = {check["name"] for check in summary["checks"] if check["drifted"]}
    assert {"label_psi", "embedding_mmd", "length_ks"} <= fired
    runs = training_runs()
    assert len(runs) == 1
    assert "drift" in runs[0].tags and runs[0].name.startswith("retrain-on-drift-")
    assert runs[0].state.is_scheduled()  # a worker would pick it up
    assert f"started flow run {runs[0].name}" in state.message
    assert summary["alerted"] is True
    assert len(Receiver.received) == 1
    alert = Receiver.received[0]
    assert alert["title"].startswith("textgate: drift detected for textgate-classifier:")
    assert "label_psi" in alert["text"] and runs[0].name in alert["text"]
    # The texts that drifted go to review: the export picked the shifted (novel) ones.
    review = summary["review"]
    assert review["exported"] > 0 and review["counts"]["novel"] > 0, review
    tasks = json.loads(Path(review["tasks"]).read_text())
    novel = [task["data"]["text"] for task in tasks if task["data"]["reason"] == "novel"]
    drifted = [text for text in novel if any(topic in text for topic in SHIFTED_TOPICS)]
    assert len(drifted) >= 0.8 * len(novel), (len(drifted), len(novel))
    assert (
        "live accuracy: no labelled random request" in state.message
        or summary["live_accuracy"] is None
    )


def test_drift_within_the_cooldown_and_a_dead_webhook(deployed):
    from flows.notify import save_webhook_block

    save_webhook_block("textgate-alerts", f"http://127.0.0.1:{free_port()}/nobody-listens")
    append(deployed / "requests.jsonl", shifted(120, seed=1))
    state = run_monitor(deployed)
    assert state.is_completed() and state.name == "Drift detected"
    assert "retraining not triggered: a drift-triggered run started less than 24 h ago" in (
        state.message
    )
    assert len(training_runs()) == 1
    assert state.result()["alerted"] is False  # logged, and the run's outcome stands
    assert len(Receiver.received) == 1


def test_no_production_model(deployed, tmp_path, capsys):
    params = yaml.safe_load((deployed / "params.yaml").read_text())
    params["registry"]["path"] = str(tmp_path / "empty-registry.json")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    from flows.monitor import drift_monitor

    state = drift_monitor(params_path="params.yaml", repo_dir=str(tmp_path), return_state=True)
    assert state.name == "No production model"
    assert "run `textgate run` first" in state.message

    from flows.cli import main

    assert main(["monitor", "--params", str(tmp_path / "params.yaml")]) == 0
    assert "monitor No production model: no production model to monitor" in capsys.readouterr().out


def test_a_reference_that_cannot_be_built_fails_with_the_reason(deployed, tmp_path):
    params = yaml.safe_load((deployed / "params.yaml").read_text())
    params["prepare"]["output_dir"] = str(tmp_path / "nothing-prepared")
    params["monitor"]["state_dir"] = str(tmp_path / "fresh-state")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    from flows.monitor import drift_monitor

    state = drift_monitor(params_path="params.yaml", repo_dir=str(tmp_path), return_state=True)
    assert state.is_failed()
    assert "train.parquet is missing" in state.message
