"""Register textgate's deployments with a Prefect server: `textgate deploy`.

Two deployments go to the work pool `deploy.work_pool` (a process pool, created if missing):

- `textgate-pipeline/default`: the training pipeline, on the cron `deploy.pipeline_cron` in
  `deploy.timezone`; runnable on demand from the UI (Run > Custom run edits its parameters).
  At most one run at a time: later ones wait in the queue (deployment concurrency limit 1,
  ENQUEUE), on top of the workspace lock every pipeline run takes (flows/lock.py).
- `textgate-drift-monitor/default`: the drift monitor, every `deploy.monitor_interval_minutes`;
  a run that would overlap a running one is cancelled (CANCEL_NEW).

The code is not copied anywhere: each deployment runs in this checkout (a
`set_working_directory` pull step), so a worker on this machine (`textgate worker`) sees the
workspace, its DVC cache and its registry. Deploying again updates both in place.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from prefect import Flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from prefect.schedules import Cron, Interval

from textgate.config import PARAMS_FILE, Params

DEPLOYMENT_NAME = "default"
PIPELINE_FLOW = "textgate-pipeline"
MONITOR_FLOW = "textgate-drift-monitor"
PIPELINE_DEPLOYMENT = f"{PIPELINE_FLOW}/{DEPLOYMENT_NAME}"
MONITOR_DEPLOYMENT = f"{MONITOR_FLOW}/{DEPLOYMENT_NAME}"
PIPELINE_ENTRYPOINT = "flows/pipeline.py:pipeline"
MONITOR_ENTRYPOINT = "flows/monitor.py:drift_monitor"
WORK_POOL_TYPE = "process"


@dataclass(frozen=True)
class Deployed:
    """One deployment as registered: its full name, id and schedule in words."""

    name: str
    id: str
    schedule: str


def ensure_work_pool(name: str) -> bool:
    """Create the process work pool `name` if there is none; True if created.

    An existing pool is used as it is, whatever its type.
    """
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
            return False
        except ObjectNotFound:
            pass
        try:
            client.create_work_pool(
                WorkPoolCreate(
                    name=name,
                    type=WORK_POOL_TYPE,
                    base_job_template=ProcessWorker.get_default_base_job_template(),
                    description="textgate: the training pipeline and the drift monitor",
                )
            )
        except ObjectAlreadyExists:
            return False
    return True


def _load(root: Path, entrypoint: str) -> Flow:
    return Flow.from_source(source=str(root), entrypoint=entrypoint)


def deploy_all(root: Path, params: Params, params_path: str = PARAMS_FILE) -> list[Deployed]:
    """Create or update both deployments of the workspace at `root` (and the work pool).

    Args:
        root: the repository (the deployments run there).
        params: the workspace's params (deploy section).
        params_path: the params file, relative to `root`, that runs read by default.
    """
    deploy = params.deploy
    ensure_work_pool(deploy.work_pool)
    parameters = {"params_path": params_path, "repo_dir": "."}
    pipeline = _load(root, PIPELINE_ENTRYPOINT).to_deployment(
        name=DEPLOYMENT_NAME,
        schedules=[Cron(deploy.pipeline_cron, timezone=deploy.timezone, slug="pipeline-cron")],
        parameters=parameters,
        concurrency_limit=ConcurrencyLimitConfig(
            limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE
        ),
        description="validate, prepare, train, evaluate (DVC); gate; package; promote",
        tags=["textgate", "training"],
    )
    interval = timedelta(minutes=deploy.monitor_interval_minutes)
    monitor = _load(root, MONITOR_ENTRYPOINT).to_deployment(
        name=DEPLOYMENT_NAME,
        schedules=[Interval(interval, slug="monitor-interval")],
        parameters=parameters,
        concurrency_limit=ConcurrencyLimitConfig(
            limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW
        ),
        description="drift of serving traffic vs production's training data; retrains on drift",
        tags=["textgate", "monitoring"],
    )
    deployed = []
    for deployment, schedule in (
        (pipeline, f"cron {deploy.pipeline_cron!r} ({deploy.timezone})"),
        (monitor, f"every {deploy.monitor_interval_minutes:g} min"),
    ):
        deployment_id = deployment.apply(work_pool_name=deploy.work_pool)
        deployed.append(Deployed(deployment.full_name, str(deployment_id), schedule))
    return deployed
