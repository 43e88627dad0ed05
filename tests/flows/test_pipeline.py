"""The whole flow under prefect_test_harness, in a temporary git + DVC copy of the project.

The tests in this module run in order and share one workspace: a first run that trains,
checks the served bento and promotes; an unchanged rerun; a real `bentoml serve` of the
promoted bento; a worse candidate stopped by the champion comparison and by a floor; human
approval (reject, then approve); a validation failure; bad params.
"""

from __future__ import annotations

import contextvars
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import make_rows, write_csv
from tests.flows.conftest import make_workspace, set_params
from tests.serving import bentoml_serve
from textgate.registry import Registry

pytestmark = pytest.mark.slow


GOOD_EPOCHS = 12  # the tiny model learns the three keyword intents (see test_release_checks)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_base_model) -> Path:
    train = {
        "epochs": GOOD_EPOCHS,
        "learning_rate": 5.0e-3,
        "freeze_embeddings": False,  # the tiny model's random embeddings must learn
        "early_stopping_patience": 0,
    }
    return make_workspace(
        tmp_path_factory.mktemp("workspace"),
        tiny_base_model,
        per_class=30,
        overrides={"train": train, "evaluate": {"golden_requests": 10}},
    )


def run_flow(workspace: Path):
    from flows.pipeline import pipeline

    return pipeline(params_path="params.yaml", repo_dir=str(workspace), return_state=True)


def registry(workspace: Path) -> Registry:
    return Registry(workspace / ".textgate" / "registry.json")


def registry_bytes(workspace: Path) -> bytes:
    return (workspace / ".textgate" / "registry.json").read_bytes()


def read_verdict(workspace: Path) -> dict:
    import json

    return json.loads((workspace / ".textgate" / "verdicts" / "latest.json").read_text())


def test_first_run_trains_gates_packages_and_promotes(harness, workspace):
    state = run_flow(workspace)
    assert state.is_completed(), state.message
    summary = state.result()
    assert summary["stages_ran"] == ["validate", "prepare", "train", "evaluate"]
    assert summary["promoted"] is True
    production = registry(workspace).production()
    assert production is not None and production.bento_tag == summary["bento_tag"]
    assert production.lineage["data_md5"] and production.lineage["model_md5"]
    assert production.lineage["git_commit"]
    assert "accuracy" in production.metrics

    import bentoml

    bento = bentoml.bentos.get(production.bento_tag)
    assert production.model_tag in [str(model.tag) for model in bento.info.all_models]
    model = bentoml.models.get(production.model_tag)
    assert model.info.metadata["lineage"]["model_md5"] == production.lineage["model_md5"]

    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        keys = {artifact.key for artifact in client.read_artifacts()}
    assert {"validation-summary", "pipeline-stages", "test-metrics", "gate-verdict"} <= keys

    verdict = read_verdict(workspace)
    assert verdict["passed"] and verdict["run"]["promoted"] is True
    kinds = {check["kind"] for check in verdict["checks"]}
    assert kinds == {
        "floor",
        "quantization",
        "champion",
        "class_recall",
        "calibration",
        "behaviour",
        "served",
    }
    served = {check["name"]: check for check in verdict["checks"] if check["kind"] == "served"}
    assert served["served_answers"]["value"] == 1.0  # the bento answered like the offline model
    assert served["served_p95_latency"]["value"] > 0
    assert production.verdict["passed"] is True  # the release keeps the verdict behind it


def test_unchanged_rerun_retrains_nothing(harness, workspace):
    model_file = workspace / "data" / "train" / "model" / "model.safetensors"
    before = model_file.stat().st_mtime_ns
    releases = len(registry(workspace).history())
    state = run_flow(workspace)
    assert state.is_completed(), state.message
    summary = state.result()
    assert summary["stages_ran"] == []
    assert summary["stages_skipped"] == ["validate", "prepare", "train", "evaluate"]
    assert summary["promoted"] is False
    assert model_file.stat().st_mtime_ns == before
    assert len(registry(workspace).history()) == releases


def test_promoted_bento_answers_over_http(harness, workspace, tmp_path):
    production = registry(workspace).production()
    with bentoml_serve(production.bento_tag, tmp_path) as url:
        response = httpx.post(
            f"{url}/classify", json={"texts": ["my card was stolen", "refund please"]}, timeout=30
        )
    assert response.status_code == 200, response.text
    answers = response.json()
    assert len(answers) == 2
    for answer in answers:
        # The tiny model's unknown rule may fire ("I don't know" is a served answer too).
        assert answer["label"] in {"lost_card", "login", "refund", "unknown"}
        assert answer["abstained"] == (answer["label"] == "unknown")
        assert 0.0 <= answer["score"] <= 1.0


def test_worse_candidate_is_stopped_by_the_champion_comparison(harness, workspace):
    before = registry_bytes(workspace)
    production = registry(workspace).production()
    set_params(workspace, {"train": {"epochs": 1}})  # one epoch: near chance on this data
    state = run_flow(workspace)
    assert state.is_failed()
    assert state.message.startswith("gate FAILED")
    failed = {check["name"] for check in read_verdict(workspace)["checks"] if not check["passed"]}
    assert "champion_accuracy" in failed
    assert not failed - {"champion_accuracy", "champion_macro_f1"}  # nothing else bites
    assert f"vs production {production.bento_tag}" in state.message
    assert "a regression beyond the margin is not ruled out" in state.message
    assert registry_bytes(workspace) == before


def test_failed_floor_leaves_production_untouched(harness, workspace):
    before = registry_bytes(workspace)
    set_params(workspace, {"gate": {"min_accuracy": 0.9}})  # the one-epoch model is still there
    state = run_flow(workspace)
    assert state.is_failed()
    # validate reads gate.min_accuracy (the majority class must stay under it), so it reruns,
    # and prepare after it; their outputs are the same, so nothing is retrained.
    ran = state.result(raise_on_failure=False)["stages_ran"]
    assert "train" not in ran and "evaluate" not in ran
    assert "- [FAIL] accuracy_floor: accuracy" in state.message
    assert "< floor 0.9000" in state.message
    assert registry_bytes(workspace) == before
    set_params(workspace, {"gate": {"min_accuracy": 0.0}, "train": {"epochs": GOOD_EPOCHS}})


def test_served_bento_over_its_latency_budget_is_not_promoted(harness, workspace):
    before = registry_bytes(workspace)
    # A new candidate as good as production: same weights (texts are shorter than either
    # length), but a different model directory (its recorded config differs).
    set_params(workspace, {"train": {"max_length": 33}, "gate": {"max_p95_latency_ms": 0.001}})
    state = run_flow(workspace)
    assert state.is_failed()
    assert "- [FAIL] served_p95_latency: p95 latency (ms)" in state.message
    assert "was built but not promoted" in state.message
    served = {c["name"]: c for c in read_verdict(workspace)["checks"] if c["kind"] == "served"}
    assert served["served_answers"]["passed"]  # it answered right, only too slowly
    assert registry_bytes(workspace) == before
    set_params(workspace, {"gate": {"max_p95_latency_ms": 10000}})


def resume_when_paused(run_input: dict) -> threading.Thread:
    """In the background: wait until the flow run pauses for input, then answer it."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateName,
    )
    from prefect.flow_runs import resume_flow_run

    def answer() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            with get_client(sync_client=True) as client:
                paused = client.read_flow_runs(
                    flow_run_filter=FlowRunFilter(
                        state=FlowRunFilterState(name=FlowRunFilterStateName(any_=["Paused"]))
                    )
                )
            if paused:
                resume_flow_run(paused[0].id, run_input=run_input)
                return
            time.sleep(1)

    context = contextvars.copy_context()  # the harness's Prefect settings live in contextvars
    thread = threading.Thread(target=context.run, args=(answer,), daemon=True)
    thread.start()
    return thread


def test_rejected_approval_promotes_nothing_and_records_why(harness, workspace):
    before = registry_bytes(workspace)
    set_params(workspace, {"gate": {"require_approval": True}})  # the same new candidate
    answer = {"approve": False, "reviewer": "ana", "comment": "not before the launch"}
    thread = resume_when_paused(answer)
    state = run_flow(workspace)
    thread.join(timeout=5)
    assert state.is_failed() and state.name == "Rejected"
    assert "rejected by ana: not before the launch" in state.message
    assert registry_bytes(workspace) == before
    approval = read_verdict(workspace)["checks"][-1]
    assert approval["name"] == "approval" and not approval["passed"]


def test_approved_run_is_promoted_with_the_reviewer_recorded(harness, workspace):
    releases = len(registry(workspace).history())
    thread = resume_when_paused({"approve": True, "reviewer": "ana", "comment": "ship it"})
    state = run_flow(workspace)
    thread.join(timeout=5)
    assert state.is_completed(), state.message
    assert len(registry(workspace).history()) == releases + 1
    production = registry(workspace).production()
    assert "approved by ana: ship it" in production.reason
    set_params(workspace, {"gate": {"require_approval": False}})


def test_validation_failure_stops_the_flow_before_training(harness, workspace):
    registry_file = workspace / ".textgate" / "registry.json"
    before = registry_file.read_bytes()
    model_file = workspace / "data" / "train" / "model" / "model.safetensors"
    model_before = model_file.stat().st_mtime_ns
    rows = make_rows(per_class=30) + [("a lonely message about shipping", "shipping")]
    write_csv(workspace / "data" / "raw" / "train.csv", rows)
    state = run_flow(workspace)
    assert state.is_failed()
    assert "stage 'validate' failed" in state.message
    assert "min_examples_per_class" in state.message
    assert "shipping" in state.message
    assert model_file.stat().st_mtime_ns == model_before
    assert registry_file.read_bytes() == before


def test_bad_params_fail_with_a_clear_message(harness, workspace):
    set_params(workspace, {"train": {"epochs": "three"}})
    state = run_flow(workspace)
    assert state.is_failed()
    with pytest.raises(Exception, match="train.epochs: Input should be a valid integer"):
        state.result()
