"""What a pipeline run reports beyond its steps: its failed state, its identity, its alerts."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from prefect.context import get_run_context
from prefect.states import Failed, State

from flows.notify import send_alert
from textgate.config import Params
from textgate.errors import TextgateError


class PipelineFailed(TextgateError, Mapping[str, Any]):
    """A run the gate stopped: the verdict as its message, the run's summary as a mapping.

    A failed Prefect state's data must be an exception (a worker re-raises it, with this
    message), while callers read the summary: `state.result(raise_on_failure=False)["..."]`.
    """

    def __init__(self, message: str, summary: dict[str, Any]) -> None:
        super().__init__(message)
        self.summary = summary

    def __getitem__(self, key: str) -> Any:
        return self.summary[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.summary)

    def __len__(self) -> int:
        return len(self.summary)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self), self.summary))


def failed_state(message: str, summary: dict[str, Any], name: str = "Failed") -> State:
    return Failed(name=name, message=message, data=PipelineFailed(message, summary))


def run_info(lineage: dict[str, Any], **extra: Any) -> dict[str, Any]:
    context = get_run_context()
    flow_run = getattr(context, "flow_run", None)
    return {
        "flow_run_id": str(flow_run.id) if flow_run else None,
        "flow_run_name": flow_run.name if flow_run else None,
        "model_md5": lineage.get("model_md5"),
        "data_md5": lineage.get("data_md5"),
        "git_commit": lineage.get("git_commit"),
        **extra,
    }


def alert(params: Params, subject: str, body: str) -> None:
    """Send an alert through `notify.block`, naming this flow run; a failure is only logged."""
    flow_run = getattr(get_run_context(), "flow_run", None)
    if flow_run is not None:
        subject = f"{subject} ({flow_run.name})"
        body = f"{body}\n\nflow run: {flow_run.name} ({flow_run.id})"
    send_alert(params.notify.block, subject=subject, body=body)
