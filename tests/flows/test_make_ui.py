"""`make ui DB=postgres`: the Prefect server runs on a local PostgreSQL that make starts."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import psycopg
import pytest

from tests.helpers import REPO_ROOT
from textgate import pglocal
from textgate.process import free_port, start_process, wait_ready

pytestmark = pytest.mark.slow


def test_make_ui_with_db_postgres_keeps_prefect_in_the_local_postgres(tmp_path: Path) -> None:
    missing = pglocal.missing_binaries()
    if missing or shutil.which("make") is None:
        pytest.skip(f"needs make and PostgreSQL's programs (missing: {missing or ['make']})")
    pg_dir = Path(tempfile.mkdtemp(prefix="textgate-ui-pg-", dir="/tmp"))
    port = free_port()
    bin_dir = Path(sys.executable).parent
    env = {
        **os.environ,
        "HOME": str(tmp_path),  # the `textgate` profile goes to this throwaway home
        "PREFECT_HOME": str(tmp_path / "prefect"),
    }
    env.pop("PREFECT_API_URL", None)
    # -o: never (re)install the virtual environment from a test.
    command = ["make", "-o", f"{bin_dir}/.installed", "ui", "DB=postgres", f"PG_DIR={pg_dir}",
               f"UI_PORT={port}", f"VENV={bin_dir.parent}"]  # fmt: skip
    try:
        with start_process(
            command, env=env, cwd=REPO_ROOT, log_path=tmp_path / "ui.log", name="make ui"
        ) as ui:
            wait_ready(ui, f"http://127.0.0.1:{port}/api/health", timeout_s=240)
            url = pglocal.LocalPostgres(pg_dir, int((pg_dir / "port").read_text())).url
            with psycopg.connect(url) as connection:
                tables = {
                    row[0]
                    for row in connection.execute(
                        "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
                    )
                }
        assert {"flow", "flow_run", "deployment"} <= tables
        assert "PostgreSQL in" in (tmp_path / "ui.log").read_text()
    finally:
        subprocess.run(
            ["make", "ui-db-stop", f"PG_DIR={pg_dir}", f"VENV={bin_dir.parent}"],
            cwd=REPO_ROOT,
            capture_output=True,
        )
        shutil.rmtree(pg_dir, ignore_errors=True)
    assert not pglocal._status(pg_dir / "data")


def test_make_ui_refuses_an_unknown_db() -> None:
    bin_dir = Path(sys.executable).parent
    done = subprocess.run(
        ["make", "-o", f"{bin_dir}/.installed", "-n", "ui", "DB=mysql", f"VENV={bin_dir.parent}"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode != 0
    assert "DB=mysql: use DB=sqlite (the default) or DB=postgres" in done.stderr
