"""One pipeline run at a time per workspace: DVC locks the repo, so runs take turns.

Two guards, taken in this order and held for the whole run:

1. With a Prefect server configured (`PREFECT_API_URL`), a slot of the global concurrency
   limit `deploy.concurrency_limit` (1 slot, created if missing): a second run waits for it,
   visibly in the UI's Concurrency page, whichever machine or worker started it.
2. Always, an exclusive file lock on `<repo>/.textgate/pipeline.lock`: runs without a
   server (each `textgate run` then has its own temporary one) queue on it too. The holder
   writes who it is into the file, so a waiting run can say what it waits for.

A run that cannot get both within `deploy.lock_timeout_s` fails with a message naming the
holder; it never reaches `dvc repro`, so it can neither corrupt the run before it nor fail on
DVC's own lock.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

from flows.server import configured_api_url
from textgate.errors import TextgateError

LOCK_FILE = Path(".textgate") / "pipeline.lock"
POLL_S = 1.0


class WorkspaceBusy(TextgateError):
    """Another pipeline run held the workspace for longer than the lock timeout."""


def ensure_concurrency_limit(name: str) -> tuple[bool, bool]:
    """Create the global concurrency limit `name` with one slot if missing.

    An existing limit is left as it is (an operator may have changed it on purpose).

    Returns:
        (created, full): whether it was created now, and whether every slot is taken.
    """
    with get_client(sync_client=True) as client:
        try:
            current = client.read_global_concurrency_limit_by_name(name)
            return False, current.active_slots >= current.limit
        except ObjectNotFound:
            pass
        try:
            client.create_global_concurrency_limit(
                GlobalConcurrencyLimitCreate(name=name, limit=1, active=True)
            )
        except ObjectAlreadyExists:
            return False, True  # created by a run that started at the same moment
    return True, False


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        return (
            f"flow run {info.get('flow_run') or '(none)'}, pid {info.get('pid')} on "
            f"{info.get('host')}, since {info.get('since')}"
        )
    except (OSError, ValueError, AttributeError):
        return "an unknown process"


@contextmanager
def file_lock(path: Path, timeout_s: float, holder: dict[str, Any], log: Any) -> Iterator[None]:
    """An exclusive `flock` on `path`, waited for up to `timeout_s` seconds.

    The kernel releases it when the process dies, so a crashed run never blocks the next.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = path.open("a+", encoding="utf-8")
    try:
        deadline = time.monotonic() + timeout_s
        waited = False
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not waited:
                    log.info("waiting for the pipeline run that holds %s: %s", path, _holder(path))
                    waited = True
                if time.monotonic() >= deadline:
                    raise WorkspaceBusy(
                        f"another pipeline run has held {path} for over {timeout_s:.0f} s "
                        f"(deploy.lock_timeout_s): {_holder(path)}"
                    ) from None
                time.sleep(POLL_S)
        if waited:
            log.info("the workspace is free: this run goes on")
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps(holder) + "\n")
        handle.flush()
        yield
    finally:
        handle.close()  # closing the descriptor releases the lock


@contextmanager
def workspace_lock(
    root: Path, *, limit: str | None, timeout_s: float, flow_run: str | None, log: Any
) -> Iterator[None]:
    """Hold the workspace at `root` for one pipeline run (see the module docstring)."""
    holder = {
        "flow_run": flow_run,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "since": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    with ExitStack() as stack:
        if limit and configured_api_url():
            created, full = ensure_concurrency_limit(limit)
            if created:
                log.info("created the global concurrency limit %r (1 slot)", limit)
            if full:
                log.info("waiting for a slot of concurrency limit %r: another run has it", limit)
            started = time.monotonic()
            try:
                stack.enter_context(
                    concurrency(limit, occupy=1, timeout_seconds=timeout_s, strict=True)
                )
            except TimeoutError:
                raise WorkspaceBusy(
                    f"no slot of the concurrency limit {limit!r} within {timeout_s:.0f} s "
                    "(deploy.lock_timeout_s): another pipeline run holds it; see the UI's "
                    "Concurrency page"
                ) from None
            waited = time.monotonic() - started
            if waited > 2:
                log.info("waited %.0f s for the concurrency limit %r", waited, limit)
        stack.enter_context(file_lock(root / LOCK_FILE, timeout_s, holder, log))
        yield
