"""Real shared-state servers for tests: a throwaway PostgreSQL and a moto S3 server.

Both listen on loopback only, live in temporary directories and are stopped at the end of
the test session. Where a server cannot start (no PostgreSQL binaries, no moto), the
fixture using it skips with the reason.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from textgate import pglocal
from textgate.process import ManagedProcess, free_port, start_process, wait_ready

# moto's server accepts any credentials; these are only what boto3 and DVC send.
S3_ACCESS_KEY = "testing-access-key"
S3_SECRET_KEY = "testing-secret-key-never-printed"


@contextmanager
def local_postgres() -> Iterator[pglocal.LocalPostgres]:
    """A fresh PostgreSQL in a temporary directory (under /tmp: the server user must reach
    it when tests run as root), stopped and deleted afterwards."""
    root = Path(tempfile.mkdtemp(prefix="textgate-pg-", dir="/tmp"))
    try:
        server = pglocal.start(root)
        try:
            yield server
        finally:
            pglocal.stop(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def fresh_database(server: pglocal.LocalPostgres) -> str:
    """A new empty database on `server`; its URL."""
    import psycopg

    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = server.url.rsplit("/", 1)[0] + "/postgres"
    with psycopg.connect(admin, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    return server.url.rsplit("/", 1)[0] + f"/{name}"


@dataclass(frozen=True)
class S3Server:
    """A moto S3 server on loopback: its endpoint and the env that reaches it."""

    endpoint: str

    def env(self) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def make_bucket(self, name: str) -> None:
        import boto3

        client = boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=S3_ACCESS_KEY,
            aws_secret_access_key=S3_SECRET_KEY,
            region_name="us-east-1",
        )
        client.create_bucket(Bucket=name)


@contextmanager
def moto_s3(log_dir: Path) -> Iterator[S3Server]:
    """`python -m moto.server` on a free loopback port, until the block ends."""
    port = free_port()
    command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    process: ManagedProcess = start_process(
        command, name="moto S3 server", log_path=log_dir / "moto.log"
    )
    with process:
        endpoint = f"http://127.0.0.1:{port}"
        wait_ready(process, f"{endpoint}/moto-api/", timeout_s=60)
        yield S3Server(endpoint)
