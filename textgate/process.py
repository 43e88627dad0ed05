"""Child server processes: a free port, start in a group of its own, wait until ready, stop.

The served check (tasks/served.py), the benchmarks and the tests start servers the same way:
`start_process` runs a command in a new session (so it leads a process group of its own,
with whatever it forks), its output going to a log file; `wait_ready` polls until the server
answers, failing at once with the end of the log if the process exits first; `stop` sends
SIGTERM to the whole group and SIGKILL after a grace period. A `ManagedProcess` is a context
manager that stops its group on exit.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import httpx
import psutil

from textgate.errors import TextgateError

LOG_TAIL_LINES = 40
STOP_GRACE_S = 20.0
# How long to wait for the group leader to be reaped after SIGKILL.
KILL_WAIT_S = 10.0
POLL_INTERVAL_S = 0.5
# One readiness probe's timeout: a server that is up answers a health check at once.
PROBE_TIMEOUT_S = 2.0


class ProcessStartError(TextgateError):
    """A started process exited before it was ready, or was not ready in time."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on `host` that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def log_tail(log: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last `lines` lines of a log file ("" when it does not exist)."""
    text = log.read_text(encoding="utf-8", errors="replace") if log.exists() else ""
    return "\n".join(text.splitlines()[-lines:])


@dataclass
class ManagedProcess:
    """A process started by `start_process`: the leader of its own process group.

    `name` is what messages call it; `log_path` holds its stdout and stderr (None: they go
    where this process's go). Leaving a `with` block stops the group (`stop`, `grace_s`).
    """

    popen: subprocess.Popen[bytes]
    name: str
    log_path: Path | None = None
    grace_s: float = STOP_GRACE_S

    @property
    def pid(self) -> int:
        """The leader's pid, which is also the process group id."""
        return self.popen.pid

    def running(self) -> bool:
        """True until the leader has exited."""
        return self.popen.poll() is None

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The end of the log, introduced by where it comes from, for an error message."""
        if self.log_path is None:
            return "(its output was not logged to a file)"
        return f"last lines of {self.log_path}:\n{log_tail(self.log_path, lines)}"

    def __enter__(self) -> ManagedProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        stop(self, self.grace_s)


def start_process(
    command: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | str | None = None,
    log_path: Path | None = None,
    name: str | None = None,
    grace_s: float = STOP_GRACE_S,
    preexec_fn: Callable[[], None] | None = None,
    pass_fds: Sequence[int] = (),
) -> ManagedProcess:
    """Start `command` in a new session, so it and what it forks form one process group.

    Args:
        command: the program and its arguments.
        env: the whole environment of the process (None: this process's).
        cwd: its working directory (None: this process's).
        log_path: a file for its stdout and stderr, truncated first (None: inherited).
        name: what messages call it (default: the command line).
        grace_s: how long `stop` waits after SIGTERM when the process leaves a `with` block.
        preexec_fn: run in the child before the command (e.g. to die with its parent).
        pass_fds: descriptors the child inherits (e.g. a listening socket to serve on).
    """
    arguments = [str(part) for part in command]
    label = name or " ".join(arguments)
    if log_path is None:
        popen = subprocess.Popen(
            arguments,
            cwd=cwd,
            env=None if env is None else dict(env),
            start_new_session=True,
            preexec_fn=preexec_fn,
            pass_fds=tuple(pass_fds),
        )
    else:
        with Path(log_path).open("wb") as handle:  # the child keeps its own descriptor
            popen = subprocess.Popen(
                arguments,
                cwd=cwd,
                env=None if env is None else dict(env),
                stdout=handle,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=preexec_fn,
                pass_fds=tuple(pass_fds),
            )
    return ManagedProcess(popen=popen, name=label, log_path=log_path, grace_s=grace_s)


def url_ready(
    url: str, timeout_s: float = PROBE_TIMEOUT_S, *, local_address: str | None = None
) -> bool:
    """True when `GET url` answers 200; False when nothing answers or it answers otherwise.

    `local_address`: the address to connect from (None: any).
    """
    # trust_env=False: a proxy configured in the environment must not see loopback requests.
    transport = httpx.HTTPTransport(local_address=local_address)
    try:
        with httpx.Client(trust_env=False, timeout=timeout_s, transport=transport) as client:
            return client.get(url).status_code == 200
    except httpx.TransportError:
        return False  # not listening yet


def wait_ready(
    process: ManagedProcess,
    ready: str | Callable[[], bool],
    timeout_s: float,
    *,
    poll_s: float = POLL_INTERVAL_S,
) -> None:
    """Poll until `ready` holds: a URL answering 200 to GET, or a predicate returning True.

    Raises:
        ProcessStartError: the process exited first (at once, not at the deadline), or
            `ready` did not hold within `timeout_s`; the message has the end of the log.
    """
    check = (lambda: url_ready(ready)) if isinstance(ready, str) else ready
    deadline = time.monotonic() + timeout_s
    while True:
        if not process.running():
            raise ProcessStartError(
                f"{process.name} exited with code {process.popen.returncode} before it was "
                f"ready; {process.log_tail()}"
            )
        if check():
            return
        if time.monotonic() >= deadline:
            raise ProcessStartError(
                f"{process.name} was not ready after {timeout_s:.0f} s (still running); "
                f"{process.log_tail()}"
            )
        time.sleep(poll_s)


def stop(process: ManagedProcess, grace_s: float = STOP_GRACE_S) -> None:
    """Stop the process's group: SIGTERM, then SIGKILL if the leader outlives `grace_s`.

    Whatever is left of the group once the leader has exited is killed too, also when the
    leader had exited before this call. Stopping a stopped process does nothing.
    """
    popen = process.popen
    if popen.poll() is None:
        _signal_group(popen.pid, signal.SIGTERM)
        try:
            popen.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            _signal_group(popen.pid, signal.SIGKILL)
            popen.wait(timeout=KILL_WAIT_S)
    # The rest of the group; its id cannot be reused while a member is alive.
    _signal_group(popen.pid, signal.SIGKILL)


def _signal_group(group: int, signum: signal.Signals) -> None:
    with suppress(ProcessLookupError):  # the group has no members left
        os.killpg(group, signum)


def terminate_then_kill(processes: Sequence[psutil.Process], timeout_s: float) -> None:
    """SIGTERM each of `processes`, then SIGKILL those still alive after `timeout_s`.

    psutil checks that a remembered process is still the same one before signalling it.
    """
    for process in processes:
        with suppress(psutil.NoSuchProcess):
            process.terminate()
    _, alive = psutil.wait_procs(processes, timeout=timeout_s)
    for process in alive:
        with suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(alive, timeout=timeout_s)
