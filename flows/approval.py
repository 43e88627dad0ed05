"""Human approval of a run that passed every check: the run pauses for input in the Prefect UI."""

from __future__ import annotations

from prefect import get_run_logger
from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from pydantic import Field

from textgate.config import Params
from textgate.gate import Check, Verdict, approval_check


class Approval(RunInput):
    """What the reviewer fills in, in the Prefect UI, for a run that passed every check."""

    approve: bool = False
    reviewer: str = Field(min_length=1, description="who decides (name or e-mail)")
    comment: str = Field(default="", description="why; recorded with the verdict")


def request_approval(verdict: Verdict, params: Params) -> Check:
    """Pause the run until a person approves or rejects it in the Prefect UI (or it times out)."""
    logger = get_run_logger()
    logger.info(
        "waiting for approval in the Prefect UI (timeout %d s)", params.gate.approval_timeout_s
    )
    description = (
        verdict.to_markdown()
        + "\n\n**Approve** to promote this model to production, or leave it unticked to "
        "reject it; either way the reviewer and comment are recorded with the verdict."
    )
    try:
        answer = pause_flow_run(
            wait_for_input=Approval.with_initial_data(description=description),
            timeout=params.gate.approval_timeout_s,
            poll_interval=2,
            key="approval",
        )
    except FlowPauseTimeout:
        return approval_check(
            False, "nobody", f"no decision within {params.gate.approval_timeout_s} s"
        )
    return approval_check(answer.approve, answer.reviewer, answer.comment)
