"""A temporary Prefect server for one `textgate run`, started before the pipeline's imports.

Without a configured server (`PREFECT_API_URL`), Prefect starts a temporary one when the
flow makes its first API call: it first imports the whole server application into the
calling process (2-3 s), then launches the server in a subprocess and waits for it (4-5 s on
2 cores). Launching that same subprocess at the start of the command instead lets it boot
while this process imports the pipeline, and spares the import: an unchanged rerun takes
seconds less (bench/noop.py). The server is the one Prefect would start (same command, same
settings and database), and it stops with the command, whatever stops it (flows/processes.py).
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import sys
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from flows.processes import die_with_parent
from textgate.config import Params
from textgate.errors import ConfigError
from textgate.process import free_port, start_process, stop, wait_ready

READY_TIMEOUT_S = 90.0
POLL_S = 0.05
STOP_GRACE_S = 5.0

# The API URL of the temporary server this process started, if any: not a server anyone
# else can reach (no approvals, no shared concurrency limits through it).
TEMPORARY_API_URL: str | None = None


class TemporaryServer:
    """`uvicorn prefect.server.api.server:create_app` on a free loopback port."""

    def __init__(self) -> None:
        self.port = free_port()
        spec = importlib.util.find_spec("prefect")
        assert spec is not None and spec.origin is not None
        # As prefect.server.api.server.SubprocessASGIServer starts it (no UI, ephemeral).
        env = {
            **os.environ,
            "PREFECT_UI_ENABLED": "0",
            "PREFECT__SERVER_EPHEMERAL": "1",
            "PREFECT__SERVER_FINAL": "1",
        }
        command = [
            sys.executable,
            "-m",
            "uvicorn",
            "--app-dir",
            str(Path(spec.origin).parent.parent),
            "--factory",
            "prefect.server.api.server:create_app",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--log-level",
            "error",
            "--lifespan",
            "on",
        ]
        # Its own process group (stopped whole, see `stop`); its output stays on this
        # process's stderr; and it dies with this process, even a SIGKILLed one.
        self.process = start_process(
            command,
            env=env,
            name="the temporary Prefect server",
            grace_s=STOP_GRACE_S,
            preexec_fn=die_with_parent(),
        )
        self.api_url = f"http://127.0.0.1:{self.port}/api"

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Block until the server answers /health.

        Raises:
            ProcessStartError: it exited or did not answer in time.
        """
        wait_ready(self.process, f"{self.api_url}/health", timeout_s, poll_s=POLL_S)

    def stop(self) -> None:
        stop(self.process, grace_s=STOP_GRACE_S)


def needs_temporary_server() -> bool:
    """True when flows would run against a temporary server (none configured, allowed)."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    return not PREFECT_API_URL.value() and bool(PREFECT_SERVER_EPHEMERAL_ENABLED.value())


def _probably_needs_temporary_server() -> bool:
    """A guess at `needs_temporary_server` that imports nothing (Prefect takes 1-2 s).

    It reads what usually configures a server: PREFECT_API_URL in the environment or in the
    active profile of $PREFECT_HOME/profiles.toml. `use_server` checks the guess.
    """
    if os.environ.get("PREFECT_API_URL"):
        return False
    home = Path(os.environ.get("PREFECT_HOME") or "~/.prefect").expanduser()
    try:
        profiles = tomllib.loads((home / "profiles.toml").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return True
    active = os.environ.get("PREFECT_PROFILE") or profiles.get("active") or "ephemeral"
    settings = profiles.get("profiles", {}).get(active, {})
    return not (isinstance(settings, dict) and settings.get("PREFECT_API_URL"))


def _start() -> TemporaryServer:
    server = TemporaryServer()
    # Stopped at exit, after Prefect has sent its last logs and events (atexit runs handlers
    # in reverse order; Prefect registers its own once a flow runs), as Prefect's own
    # temporary server is.
    atexit.register(server.stop)
    return server


def early_server() -> TemporaryServer | None:
    """Start the temporary server now if one will probably be needed (see `use_server`)."""
    return _start() if _probably_needs_temporary_server() else None


@contextmanager
def use_server(server: TemporaryServer | None) -> Iterator[None]:
    """Run flows against the temporary server `server` (or a new one) once it is ready.

    When a server is configured after all (PREFECT_API_URL), `server` is stopped unused.
    """
    global TEMPORARY_API_URL
    if not needs_temporary_server():
        if server is not None:  # the guess was wrong: a server is configured after all
            server.stop()
        yield
        return
    from prefect.logging import get_logger
    from prefect.settings import PREFECT_API_URL, temporary_settings

    server = server or _start()
    server.wait_ready()
    get_logger("textgate").info("temporary Prefect server on %s", server.api_url)
    TEMPORARY_API_URL = server.api_url
    try:
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            yield
    finally:
        TEMPORARY_API_URL = None


def check_approval_possible(params: Params) -> None:
    """Approval happens in the Prefect UI: a temporary server would leave nobody to ask."""
    if params.gate.require_approval and not configured_api_url():
        raise ConfigError(
            "gate.require_approval is true, which needs a Prefect server to approve in: "
            "start one with `make ui` and set PREFECT_API_URL (see the README)"
        )


def configured_api_url() -> str | None:
    """The Prefect server configured by the user, or None (none, or only our temporary one)."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    return None if not url or url == TEMPORARY_API_URL else url
