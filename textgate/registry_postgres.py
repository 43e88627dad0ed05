"""The shared registry: one append-only PostgreSQL table that several machines write.

Chosen over S3 conditional writes (bench/registry.py measures both): a promotion is one
short transaction that takes an advisory lock, reads the history and inserts one row, so
writers on any number of machines queue instead of retrying on conflicts, the history is a
table a trigger keeps append-only (UPDATE, DELETE and TRUNCATE raise), and a reader's single
SELECT sees only committed rows: never half of a promotion. It is also the server a team's
Prefect server already needs (`make ui DB=postgres`).

The table is created on the first promotion; `load` on a database without it is an empty
registry. Put several registries in one database with libpq's search_path, e.g.
`postgresql://host/db?options=-csearch_path%3Dteam_a`. Passwords are never shown: messages
name the URL without its password (`display_url`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg import errors as pg_errors

from textgate.registry import (
    REGISTRY_URL_ENV,
    SCHEMA_VERSION,
    RegistryError,
    RegistryState,
    Release,
    validate_state,
)

TABLE = "textgate_releases"
# One key for every writer of this registry: b"textgate" read as a big-endian int64.
LOCK_KEY = int.from_bytes(b"textgate", "big")
CONNECT_TIMEOUT_S = 5

SCHEMA_SQL = f"""
CREATE TABLE IF NOT EXISTS {TABLE} (
    seq bigserial PRIMARY KEY,
    schema_version integer NOT NULL,
    release jsonb NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now()
);
CREATE OR REPLACE FUNCTION {TABLE}_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '{TABLE} is append-only: % is not allowed', TG_OP;
END $$;
CREATE OR REPLACE TRIGGER {TABLE}_no_change BEFORE UPDATE OR DELETE ON {TABLE}
    FOR EACH ROW EXECUTE FUNCTION {TABLE}_append_only();
CREATE OR REPLACE TRIGGER {TABLE}_no_truncate BEFORE TRUNCATE ON {TABLE}
    FOR EACH STATEMENT EXECUTE FUNCTION {TABLE}_append_only();
"""

_PASSWORD_IN_NETLOC = re.compile(r"(://[^/@:]*):[^/@]*@")
_PASSWORD_IN_QUERY = re.compile(r"(?i)(password=)[^&\s]*")


def display_url(url: str) -> str:
    """`url` with any password replaced by `***`, for messages and logs."""
    return _PASSWORD_IN_QUERY.sub(r"\1***", _PASSWORD_IN_NETLOC.sub(r"\1:***@", url))


class PostgresStore:
    """The releases as rows of `textgate_releases`, oldest first by `seq`."""

    def __init__(self, url: str) -> None:
        if not url.startswith(("postgresql://", "postgres://")):
            raise RegistryError(
                f"{REGISTRY_URL_ENV}={display_url(url)!r} is not a postgresql:// URL; unset it "
                "to use the registry file (registry.path)"
            )
        self.url = url
        self.location = display_url(url)

    def _connect(self) -> psycopg.Connection[Any]:
        try:
            return psycopg.connect(self.url, connect_timeout=CONNECT_TIMEOUT_S)
        except psycopg.Error as error:
            raise RegistryError(
                f"the registry database {self.location} ({REGISTRY_URL_ENV}) cannot be "
                f"reached: {self._clean(error)}"
            ) from None

    def _clean(self, error: BaseException) -> str:
        """The error's first line, with the URL's password (if it shows) blanked out."""
        text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return display_url(text)

    def load(self) -> RegistryState:
        """Every committed release, in one statement (one snapshot)."""
        with self._connect() as connection:
            return self._read(connection)

    def _read(self, connection: psycopg.Connection[Any]) -> RegistryState:
        try:
            rows = connection.execute(
                f"SELECT seq, schema_version, release FROM {TABLE} ORDER BY seq"
            ).fetchall()
        except pg_errors.UndefinedTable:
            connection.rollback()
            return RegistryState()
        except psycopg.Error as error:
            raise RegistryError(
                f"the registry database {self.location} cannot be read: {self._clean(error)}"
            ) from None
        for seq, version, _ in rows:
            if version != SCHEMA_VERSION:
                raise RegistryError(
                    f"registry {self.location} row {seq} has schema_version {version!r}; "
                    f"this textgate reads version {SCHEMA_VERSION}"
                )
        payload = {"schema_version": SCHEMA_VERSION, "releases": [row[2] for row in rows]}
        return validate_state(payload, self.location)

    @contextmanager
    def locked(self) -> Iterator[_Transaction]:
        """One transaction holding the registry's advisory lock: writers on every machine
        take turns; the lock goes with the commit (or the rollback, on an exception)."""
        with self._connect() as connection:
            try:
                with connection.transaction():
                    connection.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_KEY,))
                    connection.execute(SCHEMA_SQL)
                    yield _Transaction(self, connection)
            except psycopg.Error as error:
                raise RegistryError(
                    f"the registry database {self.location} refused the write: "
                    f"{self._clean(error)}; the registry is unchanged"
                ) from None


class _Transaction:
    """Reads and the one insert of a promotion, inside `PostgresStore.locked`."""

    def __init__(self, store: PostgresStore, connection: psycopg.Connection[Any]) -> None:
        self.store = store
        self.connection = connection

    def load(self) -> RegistryState:
        return self.store._read(self.connection)

    def append(self, state: RegistryState, release: Release) -> RegistryState:
        self.connection.execute(
            f"INSERT INTO {TABLE} (schema_version, release) VALUES (%s, %s::jsonb)",
            (SCHEMA_VERSION, json.dumps(release.model_dump(mode="json"))),
        )
        return RegistryState(releases=[*state.releases, release])
