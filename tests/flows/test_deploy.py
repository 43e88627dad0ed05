"""`textgate deploy`, `worker` and `notify-setup` against a real Prefect test server.

The deployments are checked through the client: their schedules (cron in its time zone,
interval), work pool, concurrency, parameters and working directory; redeploying updates them
in place; a run with edited parameters can be started on demand; and a real process worker
(`prefect worker start --run-once`, as `textgate worker` starts it) executes the monitor
deployment from the workspace.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from datetime import timedelta
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
import yaml

from flows.cli import main
from tests.helpers import REPO_ROOT, merge, raw_params
from tests.serving import local_http_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """The flows' code and params; no data, no model (the monitor then has nothing to check)."""
    root = tmp_path_factory.mktemp("deploy-workspace")
    shutil.copytree(
        REPO_ROOT / "flows", root / "flows", ignore=shutil.ignore_patterns("__pycache__")
    )
    (root / "params.yaml").write_text(yaml.safe_dump(raw_params()))
    return root


def set_deploy(workspace: Path, **deploy) -> None:
    params = merge(raw_params(), {"deploy": deploy})
    (workspace / "params.yaml").write_text(yaml.safe_dump(params))


def read(name: str):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_deployment_by_name(name)


def test_deploy_registers_both_deployments_with_their_schedules(harness, workspace, capsys):
    from prefect.client.orchestration import get_client

    from flows.deploy import MONITOR_DEPLOYMENT, PIPELINE_DEPLOYMENT

    assert main(["deploy", "--params", str(workspace / "params.yaml")]) == 0
    out = capsys.readouterr().out
    assert "created the process work pool 'textgate'" in out
    assert "created the global concurrency limit 'textgate-pipeline' (1 slot)" in out
    assert "deployed textgate-pipeline/default: cron '0 2 * * *' (UTC)" in out

    pipeline = read(PIPELINE_DEPLOYMENT)
    assert pipeline.work_pool_name == "textgate"
    (schedule,) = pipeline.schedules
    assert schedule.schedule.cron == "0 2 * * *" and schedule.schedule.timezone == "UTC"
    assert schedule.active
    assert pipeline.parameters == {"params_path": "params.yaml", "repo_dir": "."}
    assert pipeline.entrypoint == "flows/pipeline.py:pipeline"
    assert pipeline.pull_steps == [
        {"prefect.deployments.steps.set_working_directory": {"directory": str(workspace)}}
    ]
    assert pipeline.global_concurrency_limit.limit == 1
    assert pipeline.concurrency_options.collision_strategy == "ENQUEUE"
    # The UI's run form comes from the parameter schema.
    assert set(pipeline.parameter_openapi_schema["properties"]) == {"params_path", "repo_dir"}

    monitor = read(MONITOR_DEPLOYMENT)
    (schedule,) = monitor.schedules
    assert schedule.schedule.interval == timedelta(minutes=60)
    assert monitor.concurrency_options.collision_strategy == "CANCEL_NEW"
    assert monitor.entrypoint == "flows/monitor.py:drift_monitor"

    with get_client(sync_client=True) as client:
        assert client.read_work_pool("textgate").type == "process"
        assert client.read_global_concurrency_limit_by_name("textgate-pipeline").limit == 1


def test_redeploying_updates_the_schedules_in_place(harness, workspace, capsys):
    from flows.deploy import MONITOR_DEPLOYMENT, PIPELINE_DEPLOYMENT

    before = read(PIPELINE_DEPLOYMENT).id
    set_deploy(
        workspace, pipeline_cron="30 1 * * 1", timezone="Europe/Paris", monitor_interval_minutes=15
    )
    assert main(["deploy", "--params", str(workspace / "params.yaml")]) == 0
    assert "created" not in capsys.readouterr().out  # pool and limit exist already
    pipeline = read(PIPELINE_DEPLOYMENT)
    assert pipeline.id == before
    (schedule,) = pipeline.schedules
    assert schedule.schedule.cron == "30 1 * * 1"
    assert schedule.schedule.timezone == "Europe/Paris"
    (schedule,) = read(MONITOR_DEPLOYMENT).schedules
    assert schedule.schedule.interval == timedelta(minutes=15)


def test_a_run_with_edited_parameters_can_be_started_on_demand(harness, workspace):
    from prefect.deployments import run_deployment

    from flows.deploy import PIPELINE_DEPLOYMENT

    run = run_deployment(
        PIPELINE_DEPLOYMENT, parameters={"params_path": "params.other.yaml"}, timeout=0
    )
    assert run.parameters == {"params_path": "params.other.yaml", "repo_dir": "."}
    assert run.state.is_scheduled()
    assert run.deployment_id == read(PIPELINE_DEPLOYMENT).id


def test_a_process_worker_runs_the_monitor_deployment(harness, workspace):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL
    from prefect.states import Cancelled

    from flows.deploy import MONITOR_DEPLOYMENT

    # The pipeline run of the previous test would train: cancel it, so the worker skips it.
    with get_client(sync_client=True) as client:
        for run in client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=["SCHEDULED"]))
            )
        ):
            client.set_flow_run_state(run.id, Cancelled(), force=True)

    run = run_deployment(MONITOR_DEPLOYMENT, timeout=0)
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    command = [sys.executable, "-m", "prefect", "worker", "start", "--pool", "textgate"]
    command += ["--type", "process", "--run-once"]
    completed = subprocess.run(
        command, env=env, cwd=workspace, capture_output=True, text=True, timeout=300
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    with get_client(sync_client=True) as client:
        finished = client.read_flow_run(run.id)
    assert finished.state.is_completed(), finished.state
    assert finished.state.name == "No production model"


class Receiver(BaseHTTPRequestHandler):
    received: list[dict] = []
    lock = threading.Lock()

    def do_POST(self) -> None:  # noqa: N802 (the stdlib's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.lock:
            self.received.append(body)
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def test_notify_setup_saves_the_block_and_sends_a_test_alert(harness, workspace, capsys):
    with local_http_server(Receiver) as url:
        code = main(
            [
                "notify-setup",
                "--url",
                f"{url}/hook",
                "--test",
                "--params",
                str(workspace / "params.yaml"),
            ]
        )
    assert code == 0
    out = capsys.readouterr().out
    assert "saved the notification block custom-webhook/textgate-alerts" in out
    assert "test alert sent" in out
    assert Receiver.received == [
        {
            "title": "textgate: test alert",
            "text": "notifications from textgate work",
            "source": "textgate",
        }
    ]

    from flows.notify import load_notifier

    block = load_notifier("textgate-alerts")
    assert type(block).__name__ == "CustomWebhookNotificationBlock"
    assert load_notifier("custom-webhook/textgate-alerts").url == f"{url}/hook"


def test_alerts_to_a_missing_block_are_logged_not_raised(harness, caplog):
    from flows.notify import send_alert

    assert send_alert("no-such-block", "subject", "body") is False
    assert "alert not sent through 'no-such-block'" in caplog.text
    assert "textgate notify-setup" in caplog.text
    assert send_alert(None, "subject", "body") is False
