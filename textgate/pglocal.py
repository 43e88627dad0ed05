"""A throwaway or local PostgreSQL server: initdb, pg_ctl start on a port, stop.

The tests start one per session for the shared registry, `make ui DB=postgres` starts one
for the Prefect server. The server listens on 127.0.0.1 and on a unix socket in its own
directory, with `trust` authentication for the one local user: a development database, not
a production one. PostgreSQL refuses to run as root; as root the binaries run as the
`postgres` user (`runuser`), which then owns the data directory.

    python -m textgate.pglocal start DIR [--port N]   # prints the URL; idempotent
    python -m textgate.pglocal stop DIR
"""

from __future__ import annotations

import argparse
import os
import pwd
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from textgate.errors import TextgateError
from textgate.process import free_port

USER = "textgate"
DATABASE = "textgate"
BINARIES = ("initdb", "pg_ctl", "postgres")
START_TIMEOUT_S = 60
# The server runs as this system user when we are root (PostgreSQL refuses root).
SYSTEM_USER = "postgres"


class LocalPostgresError(TextgateError):
    """The PostgreSQL binaries are missing, or the server did not start or stop."""


@dataclass(frozen=True)
class LocalPostgres:
    """A server started by `start`: its data directory, port and URL."""

    data_dir: Path
    port: int

    @property
    def url(self) -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{DATABASE}"


def missing_binaries() -> list[str]:
    """The PostgreSQL programs not on PATH (an empty list: a server can be started)."""
    return [name for name in BINARIES if shutil.which(name) is None]


def _as_server_user(command: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return command
    return ["runuser", "-u", SYSTEM_USER, "--", *command]


def _run(command: list[str], what: str) -> None:
    done = subprocess.run(
        _as_server_user(command), capture_output=True, text=True, timeout=START_TIMEOUT_S
    )
    if done.returncode != 0:
        raise LocalPostgresError(f"{what} failed (exit {done.returncode}): {done.stderr.strip()}")


def _prepare_dir(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        entry = pwd.getpwnam(SYSTEM_USER)
        os.chown(root, entry.pw_uid, entry.pw_gid)
        # The server user must reach the directory: open each parent for traversal only.
        for parent in root.resolve().parents:
            mode = parent.stat().st_mode
            if not mode & 0o001:
                parent.chmod(mode | 0o001)


def start(root: Path, port: int | None = None) -> LocalPostgres:
    """Start (initialising on first use) the server whose files live under `root`.

    `root/data` is the cluster, `root` holds the unix socket and `root/server.log`; the
    port is remembered in `root/port`. Starting a running server returns it as it is.

    Raises:
        LocalPostgresError: a binary is missing, or initdb or the start failed.
    """
    missing = missing_binaries()
    if missing:
        raise LocalPostgresError(
            f"PostgreSQL programs not on PATH: {', '.join(missing)} (Debian: apt-get install "
            "postgresql; they live in /usr/lib/postgresql/<version>/bin)"
        )
    root = Path(root).resolve()
    _prepare_dir(root)
    data = root / "data"
    if not (data / "PG_VERSION").is_file():
        _run(
            ["initdb", "-D", str(data), "-A", "trust", "-U", USER, "-E", "UTF8", "--no-sync"],
            f"initdb {data}",
        )
    port_file = root / "port"
    running = _status(data)
    if running and port_file.is_file():
        return LocalPostgres(root, int(port_file.read_text().strip()))
    port = port or free_port()
    options = f"-p {port} -h 127.0.0.1 -k {root} -c fsync=on"
    _run(
        ["pg_ctl", "-D", str(data), "-o", options, "-l", str(root / "server.log"), "-w",
         "-t", str(START_TIMEOUT_S), "start"],
        f"starting PostgreSQL in {data} on port {port} (log: {root / 'server.log'})",
    )  # fmt: skip
    port_file.write_text(f"{port}\n")
    server = LocalPostgres(root, port)
    _ensure_database(server)
    return server


def _status(data: Path) -> bool:
    if not (data / "PG_VERSION").is_file():
        return False
    done = subprocess.run(
        _as_server_user(["pg_ctl", "-D", str(data), "status"]), capture_output=True
    )
    return done.returncode == 0


def _ensure_database(server: LocalPostgres) -> None:
    import psycopg

    admin = f"postgresql://{USER}@127.0.0.1:{server.port}/postgres"
    with psycopg.connect(admin, autocommit=True) as connection:
        exists = connection.execute(
            "SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,)
        ).fetchone()
        if not exists:
            connection.execute(f'CREATE DATABASE "{DATABASE}"')


def stop(root: Path) -> None:
    """Stop the server under `root` (fast shutdown); a stopped one is left as it is."""
    data = Path(root).resolve() / "data"
    if _status(data):
        _run(["pg_ctl", "-D", str(data), "-m", "fast", "-w", "stop"], f"stopping {data}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m textgate.pglocal", description=__doc__)
    parser.add_argument("action", choices=("start", "stop"))
    parser.add_argument("root", type=Path, help="directory for the cluster, socket and log")
    parser.add_argument("--port", type=int, default=None, help="default: a free port")
    parser.add_argument(
        "--driver", default="postgresql", help="URL scheme, e.g. postgresql+asyncpg"
    )
    args = parser.parse_args(argv)
    try:
        if args.action == "stop":
            stop(args.root)
            return 0
        server = start(args.root, args.port)
    except TextgateError as error:
        print(f"textgate.pglocal: error: {error}", file=sys.stderr)
        return 2
    print(server.url.replace("postgresql://", f"{args.driver}://", 1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
