"""The labelling loop end to end, with real parts: a served model answers traffic that includes
a new kind of request (parcel delivery, an intent it was never trained on); the drift monitor
detects it and exports a review queue; a scripted annotator labels the queue (through Label
Studio's API when `TEXTGATE_LABEL_STUDIO_VENV` points at an install, else through the CSV);
the import writes a batch; the pipeline retrains on it, the gate passes, production changes,
and the new kind of request is now answered correctly.

Each step's time is printed (`pytest -s` shows them).
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import httpx
import pandas as pd
import pytest

from tests.conftest import FILLERS, INTENT_WORDS, make_rows
from tests.flows.conftest import make_workspace
from tests.serving import bentoml_serve
from textgate.registry import Registry

pytestmark = pytest.mark.slow

DELIVERY = ["parcel", "courier", "tracking number", "delivery van", "package shipping"]
NEW_LABEL = "delivery"


def delivery_texts(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    texts: set[str] = set()
    while len(texts) < count:
        texts.add(
            f"{rng.choice(FILLERS)} {rng.choice(DELIVERY)} {rng.choice(FILLERS)} {len(texts)}"
        )
    return sorted(texts)


def annotate(text: str) -> str:
    """The scripted annotator: the intent whose words the text holds."""
    if any(word in text for word in DELIVERY):
        return NEW_LABEL
    for label, words in INTENT_WORDS.items():
        if any(word in text for word in words):
            return label
    return "refund"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_base_model) -> Path:
    root = tmp_path_factory.mktemp("label-loop")
    overrides = {
        "data": {"train_file": ["train.csv", "batches/*.csv"]},
        "train": {
            "epochs": 12,
            "learning_rate": 5.0e-3,
            "freeze_embeddings": False,
            "early_stopping_patience": 0,
        },
        "evaluate": {"golden_requests": 10},
        "monitor": {
            "request_log": str(root / "requests.jsonl"),
            "min_requests": 50,
            "sample_size": 120,
            "retrain": False,
        },
        "label": {"max_tasks": 240},
        "notify": {"block": None},
    }
    return make_workspace(root, tiny_base_model, per_class=30, overrides=overrides)


def run_pipeline(workspace: Path):
    from flows.pipeline import pipeline

    return pipeline(params_path="params.yaml", repo_dir=str(workspace), return_state=True)


def classify(url: str, texts: list[str]) -> list[str]:
    response = httpx.post(f"{url}/classify", json={"texts": texts}, timeout=60)
    response.raise_for_status()
    return [answer["label"] for answer in response.json()]


def share_answered(url: str, texts: list[str], label: str) -> float:
    return sum(answer == label for answer in classify(url, texts)) / len(texts)


def label_with_label_studio(workspace: Path, tasks_file: Path) -> Path:
    """Load the tasks into a real Label Studio, annotate each through its API, export."""
    from tasks import labelstudio
    from textgate import labelling as lab
    from textgate.process import stop

    process, url = labelstudio.start(workspace)
    try:
        client = labelstudio.Client(url, labelstudio.token(workspace))
        project = client.project("textgate-classifier", ["refund", "lost_card", "login"])
        client.import_tasks(project, lab.read_tasks(tasks_file))
        for task in client.tasks(project):
            client.annotate(task["id"], annotate(task["data"]["text"]))
        export = workspace / "label-studio-export.json"
        export.write_text(json.dumps(client.export(project)))
        return export
    finally:
        stop(process)


def label_with_csv(tasks_file: Path) -> Path:
    frame = pd.read_csv(tasks_file.with_suffix(".csv"), keep_default_na=False)
    frame["label"] = [annotate(text) for text in frame["text"]]
    out = tasks_file.with_name("labelled.csv")
    frame.to_csv(out, index=False)
    return out


def test_traffic_to_labels_to_a_better_model(harness, workspace, capsys):
    timings: dict[str, float] = {}
    started = time.monotonic()
    first = run_pipeline(workspace)
    assert first.is_completed(), first.message
    timings["first pipeline run"] = time.monotonic() - started
    registry = Registry(workspace / ".textgate" / "registry.json")
    before = registry.production()
    assert before is not None

    held_out = delivery_texts(30, seed=99)
    env = {"TEXTGATE_REQUEST_LOG": str(workspace / "requests.jsonl")}
    started = time.monotonic()
    with bentoml_serve(before.bento_tag, workspace, env=env) as url:
        usual = [text for text, _ in make_rows(per_class=40, seed=5)]
        traffic = usual + delivery_texts(100, seed=1)
        random.Random(0).shuffle(traffic)
        for start in range(0, len(traffic), 20):
            classify(url, traffic[start : start + 20])
        accuracy_before = share_answered(url, held_out, NEW_LABEL)
    timings["serve + traffic"] = time.monotonic() - started
    assert accuracy_before == 0.0  # it cannot know an intent it was never taught

    from flows.monitor import drift_monitor

    started = time.monotonic()
    state = drift_monitor(params_path="params.yaml", repo_dir=str(workspace), return_state=True)
    timings["monitor + export"] = time.monotonic() - started
    assert state.name == "Drift detected", state.message
    summary = state.result()
    review = summary["review"]
    assert review["exported"] > 0 and review["counts"]["novel"] > 0, review
    tasks_file = Path(review["tasks"])
    tasks = json.loads(tasks_file.read_text())
    exported_new = sum(annotate(task["data"]["text"]) == NEW_LABEL for task in tasks)
    assert exported_new >= 10  # the new kind of request reached review

    from tasks import label as steps
    from textgate.config import load_params, resolve_paths

    started = time.monotonic()
    route = "label-studio" if os.environ.get("TEXTGATE_LABEL_STUDIO_VENV") else "csv"
    labelled = (
        label_with_label_studio(workspace, tasks_file)
        if route == "label-studio"
        else label_with_csv(tasks_file)
    )
    params = resolve_paths(load_params(workspace / "params.yaml"), workspace)
    result = steps.import_labels(params, *steps.read_labels_file(labelled), allow_new_labels=True)
    timings[f"label ({route}) + import"] = time.monotonic() - started
    assert result.batch is not None and result.report.new_labels == [NEW_LABEL]

    started = time.monotonic()
    second = run_pipeline(workspace)
    timings["second pipeline run"] = time.monotonic() - started
    assert second.is_completed(), second.message
    assert "train" in second.result()["stages_ran"]  # the new batch changed the data
    after = registry.production()
    assert after is not None and after.bento_tag != before.bento_tag

    with bentoml_serve(after.bento_tag, workspace, env=env) as url:
        answers = classify(url, held_out)
    accuracy_after = answers.count(NEW_LABEL) / len(answers)
    assert accuracy_after >= 0.8, (exported_new, {a: answers.count(a) for a in set(answers)})
    with capsys.disabled():
        counts = ", ".join(f"{k} {v}" for k, v in review["counts"].items())
        exported = review["exported"]
        print(f"\nlabelling loop: exported {exported} ({counts}); {exported_new} of the new kind")
        print(f"new-intent share answered correctly: {accuracy_before:.2f} -> {accuracy_after:.2f}")
        for step, seconds in timings.items():
            print(f"  {step}: {seconds:.1f} s")
