"""Starting and stopping a real `bentoml serve` on a free loopback port, for tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

READY_TIMEOUT_S = 120.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def log_tail(log: Path, lines: int = 60) -> str:
    text = log.read_text(encoding="utf-8", errors="replace") if log.exists() else ""
    return "\n".join(text.splitlines()[-lines:])


def wait_ready(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"bentoml serve exited with {process.returncode}:\n{log_tail(log)}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    pytest.fail(f"bentoml serve not ready after {READY_TIMEOUT_S:.0f} s:\n{log_tail(log)}")


def stop(process: subprocess.Popen[bytes]) -> None:
    """Stop the server and its workers: they share the process group started for it."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


@contextmanager
def bentoml_serve(
    bento_tag: str, workdir: Path, env: dict[str, str] | None = None
) -> Iterator[str]:
    """Run `bentoml serve <bento_tag>` from `workdir`; yield its base URL once it is ready."""
    log = workdir / "server.log"
    port = free_port()
    full_env = {**os.environ, "BENTOML_DO_NOT_TRACK": "True", **(env or {})}
    full_env.pop("PYTHONPATH", None)
    command = [sys.executable, "-m", "bentoml", "serve", bento_tag]
    command += ["--host", "127.0.0.1", "--port", str(port)]
    with log.open("wb") as handle:
        process = subprocess.Popen(
            command,
            cwd=workdir,
            env=full_env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so teardown stops the workers too
        )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, process, log)
        yield url
    finally:
        stop(process)
