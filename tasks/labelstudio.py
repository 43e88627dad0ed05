"""A local Label Studio for the labelling loop: installed in its own virtual environment (its
pins clash with the project's: Django, its own pydantic and numpy), SQLite in the workspace,
reached only through its REST API on loopback.

Where it lives: `$TEXTGATE_LABEL_STUDIO_VENV`, else `.textgate/label-studio/venv`
(`textgate label serve --install` makes it: `pip install label-studio==LABEL_STUDIO_VERSION`).
Its data (SQLite, uploads) is `.textgate/label-studio/data`; the API token is made once and
kept, owner-only, in `.textgate/label-studio/token`, and never printed.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx

from textgate import labelling as lab
from textgate.errors import TextgateError
from textgate.process import ManagedProcess, free_port, start_process, wait_ready

LABEL_STUDIO_VERSION = "1.23.2"
# What it installs with: its own requirement `sentry-sdk>=2.16.0` lets pip take 3.x, which its
# settings cannot start with ("Unknown option 'send_default_pii'").
LABEL_STUDIO_PINS = (f"label-studio=={LABEL_STUDIO_VERSION}", "sentry-sdk>=2.16,<3")
VENV_ENV = "TEXTGATE_LABEL_STUDIO_VENV"
HOME = Path(".textgate") / "label-studio"
USER = "textgate@localhost"
START_TIMEOUT_S = 300.0  # its first start migrates a fresh SQLite database: minutes on 2 cores
API_TIMEOUT_S = 60.0


class LabelStudioError(TextgateError):
    """Label Studio is not installed, did not start, or refused an API call."""


def venv_dir(root: Path) -> Path:
    configured = os.environ.get(VENV_ENV, "").strip()
    return Path(configured).expanduser() if configured else root / HOME / "venv"


def executable(root: Path) -> Path | None:
    """The `label-studio` command of the venv, or None when it is not installed."""
    path = venv_dir(root) / "bin" / "label-studio"
    return path if path.is_file() else None


def install(root: Path) -> Path:
    """Make the venv and install Label Studio into it (a few minutes, ~1 GB).

    Raises:
        LabelStudioError: pip failed (no registry reachable, say): the CSV route still works.
    """
    venv = venv_dir(root)
    try:
        if not (venv / "bin" / "python").is_file():
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run(
            [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet",
             *LABEL_STUDIO_PINS],
            check=True,
        )  # fmt: skip
    except subprocess.CalledProcessError as error:
        raise LabelStudioError(
            f"could not install Label Studio into {venv} ({error}); the CSV route works without "
            "it: fill in the exported CSV's label column and `textgate label import FILE.csv`"
        ) from None
    found = executable(root)
    assert found is not None
    return found


def token(root: Path) -> str:
    """The API token of the local user (made on first use, kept owner-only)."""
    path = root / HOME / "token"
    if path.is_file():
        return path.read_text(encoding="utf-8").strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    value = secrets.token_hex(20)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(value)
    return value


def start(
    root: Path, port: int | None = None, host: str = "127.0.0.1"
) -> tuple[ManagedProcess, str]:
    """Start Label Studio on `host:port` (a free port when None) and wait until it answers.

    Returns the process (stop it with `textgate.process.stop`) and its base URL.

    Raises:
        LabelStudioError: not installed, or it did not start (with the end of its log).
    """
    command = executable(root)
    if command is None:
        raise LabelStudioError(
            f"Label Studio is not installed in {venv_dir(root)}: run `textgate label serve "
            f"--install` (or set {VENV_ENV}), or use the CSV route: fill in the exported CSV's "
            "label column and `textgate label import FILE.csv`"
        )
    port = port or free_port(host)
    data = root / HOME / "data"
    data.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "LABEL_STUDIO_BASE_DATA_DIR": str(data),
        "LATEST_VERSION_CHECK": "false",  # no call home
        "COLLECT_ANALYTICS": "false",
        "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",  # `Authorization: Token ...`
        "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "false",
    }
    password = token(root)[:16]
    process = start_process(
        [command, "start", "--no-browser", "--host", host, "--port", str(port),
         "--data-dir", str(data), "--username", USER, "--password", password,
         "--user-token", token(root)],
        env=env,
        log_path=root / HOME / "label-studio.log",
        name="Label Studio",
    )  # fmt: skip
    url = f"http://{host}:{port}"
    try:
        wait_ready(process, f"{url}/health", START_TIMEOUT_S, poll_s=1.0)
    except TextgateError as error:
        from textgate.process import stop

        stop(process)
        raise LabelStudioError(str(error)) from None
    return process, url


class Client:
    """The few calls of Label Studio's REST API the loop needs."""

    def __init__(self, url: str, api_token: str) -> None:
        self.http = httpx.Client(
            base_url=url,
            headers={"Authorization": f"Token {api_token}"},
            timeout=API_TIMEOUT_S,
            trust_env=False,
        )

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self.http.request(method, path, **kwargs)
        if response.status_code >= 400:
            raise LabelStudioError(
                f"Label Studio {method} {path}: HTTP {response.status_code} {response.text[:300]}"
            )
        return response.json() if response.content else None

    def project(self, title: str, labels: list[str]) -> int:
        """The id of the project called `title`, made with the intents as choices if missing."""
        found = self._call("GET", "/api/projects", params={"title": title, "page_size": 100})
        for project in found.get("results", found) if isinstance(found, dict) else found:
            if project.get("title") == title:
                return int(project["id"])
        made = self._call(
            "POST", "/api/projects", json={"title": title, "label_config": lab.label_config(labels)}
        )
        return int(made["id"])

    def import_tasks(self, project: int, tasks: list[dict[str, Any]]) -> int:
        result = self._call("POST", f"/api/projects/{project}/import", json=tasks)
        return int(result.get("task_count", len(tasks)))

    def tasks(self, project: int) -> list[dict[str, Any]]:
        result = self._call("GET", "/api/tasks", params={"project": project, "page_size": 1000})
        return result.get("tasks", []) if isinstance(result, dict) else result

    def annotate(self, task_id: int, label: str) -> None:
        result = [
            {
                "from_name": lab.FROM_NAME,
                "to_name": lab.TO_NAME,
                "type": "choices",
                "value": {"choices": [label]},
            }
        ]
        self._call("POST", f"/api/tasks/{task_id}/annotations", json={"result": result})

    def export(self, project: int) -> list[dict[str, Any]]:
        return self._call(
            "GET",
            f"/api/projects/{project}/export",
            params={"exportType": "JSON", "download_all_tasks": "true"},
        )
