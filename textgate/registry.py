"""The production pointer and its history: one JSON file, or a shared PostgreSQL table.

The file (the default, for one machine) holds every release in order (append-only); the
last entry is what production serves. Each release says how it came about: `promote` (the
pipeline, after the gate), `manual` (a person promoting a bento by hand) or `rollback`. A
rollback is an undo: replaying the history as a stack (promote and manual push, rollback
pops), it goes back to the entry below the top, and is itself appended, so the history shows
it. A missing file is an empty registry; a corrupt or wrongly shaped file is an error, never
a silent reset, because resetting would forget what production runs.

Several machines share one registry through PostgreSQL: set `TEXTGATE_REGISTRY` to a
`postgresql://` URL (textgate/registry_postgres.py). The API is the same; promotions then
serialise across machines in one transaction each, and the table only grows.
"""

from __future__ import annotations

import fcntl
import getpass
import json
import os
import re
import socket
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Protocol

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

from textgate.errors import TextgateError
from textgate.io import atomic_path

# Version 1 files written before `action` and `verdict` existed still load: both default.
SCHEMA_VERSION = 1

Action = Literal["promote", "rollback", "manual"]

# A `postgresql://` URL here makes every `Registry` the shared one (its `path` is then unused).
REGISTRY_URL_ENV = "TEXTGATE_REGISTRY"


class RegistryError(TextgateError):
    """The registry file cannot be read, is corrupt, or has the wrong shape."""


class Release(BaseModel):
    """One release: which bento (and model inside it) went to production, when, by whom, why.

    `action` says how: "promote" (the pipeline), "manual" (promoted by hand) or "rollback".
    `verdict` is the gate verdict that justified it (empty where there was none).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    bento_tag: str = Field(min_length=1)
    model_tag: str = Field(min_length=1)
    promoted_at: AwareDatetime
    promoted_by: str = Field(min_length=1)
    reason: str = Field(min_length=1)
    metrics: dict[str, Any] = Field(default_factory=dict)
    lineage: dict[str, Any] = Field(default_factory=dict)
    action: Action = "promote"
    verdict: dict[str, Any] = Field(default_factory=dict)

    @classmethod
    def create(
        cls,
        *,
        bento_tag: str,
        model_tag: str,
        reason: str,
        metrics: dict[str, Any] | None = None,
        lineage: dict[str, Any] | None = None,
        now: datetime | None = None,
        actor: str | None = None,
        action: Action = "promote",
        verdict: dict[str, Any] | None = None,
    ) -> Release:
        """A release stamped with the current UTC time and `user@host` unless given."""
        return cls(
            bento_tag=bento_tag,
            model_tag=model_tag,
            promoted_at=(now or datetime.now(UTC)).astimezone(UTC),
            promoted_by=actor or current_actor(),
            reason=reason,
            metrics=metrics or {},
            lineage=lineage or {},
            action=action,
            verdict=verdict or {},
        )


class RegistryState(BaseModel):
    """The whole registry file: a schema version and every release, oldest first."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: int = SCHEMA_VERSION
    releases: list[Release] = Field(default_factory=list)


def current_actor() -> str:
    """`user@host` for the audit trail; `uid<N>` where no user name is known (containers)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = f"uid{os.getuid()}"
    return f"{user}@{socket.gethostname()}"


def _describe(error: ValidationError) -> str:
    parts = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "(top level)"
        parts.append(f"{where}: {item['msg']}")
    return "; ".join(parts)


class RegistryWriter(Protocol):
    """What a store gives inside its lock (or transaction): read, then append one release."""

    def load(self) -> RegistryState: ...

    def append(self, state: RegistryState, release: Release) -> RegistryState: ...


class RegistryStore(Protocol):
    """Where the releases live: `load` reads a consistent state; `locked` serialises writers."""

    location: str

    def load(self) -> RegistryState: ...

    def locked(self) -> AbstractContextManager[RegistryWriter]: ...


class Registry:
    """The production pointer: the file at `path` (`params.registry.path`), or the shared
    PostgreSQL registry at `url` (default: the `TEXTGATE_REGISTRY` environment variable)."""

    def __init__(self, path: str | Path, url: str | None = None) -> None:
        self.path = Path(path)
        chosen = (url if url is not None else os.environ.get(REGISTRY_URL_ENV, "")).strip()
        self.url = chosen or None
        self._store: RegistryStore
        if self.url:
            from textgate.registry_postgres import PostgresStore

            self._store = PostgresStore(self.url)
        else:
            self._store = FileStore(self.path)

    @property
    def location(self) -> str:
        """The file, or the database URL without its password: for messages."""
        return self._store.location

    def load(self) -> RegistryState:
        """Read and validate every release; an empty file or table is an empty registry.

        Raises:
            RegistryError: the registry is unreadable, unreachable, corrupt or misshapen.
        """
        return self._store.load()

    def production(self) -> Release | None:
        """The release production serves (the last one), or None before the first."""
        releases = self.load().releases
        return releases[-1] if releases else None

    def history(self) -> list[Release]:
        """Every release (promotions, manual promotions, rollbacks), oldest first."""
        return list(self.load().releases)

    def rollback_target(self) -> Release | None:
        """The release `rollback` would go back to now, or None if there is none."""
        return _rollback_target(self.load().releases)

    def promote(self, release: Release) -> RegistryState:
        """Append `release` and make it production, atomically.

        File: the new state goes to a temporary file in the same directory, is fsynced and
        then renamed over the old file, so a crash leaves the old or the new registry, never
        neither; a lock on the directory serialises writers on this machine. PostgreSQL: one
        transaction under an advisory lock serialises writers on every machine. None is lost;
        a corrupt existing registry raises RegistryError and is left as it is.
        """
        with self._store.locked() as writer:
            return writer.append(writer.load(), release)

    def rollback(
        self,
        reason: str,
        *,
        actor: str | None = None,
        check: Callable[[Release], None] | None = None,
    ) -> Release:
        """Undo the latest promotion: append a copy of the release below it, as a rollback.

        Target and append happen under the same lock (or transaction), so a concurrent
        promotion cannot slip in between. Written like `promote`.

        Args:
            reason: why, for the history (must not be blank).
            actor: who, default `user@host`.
            check: called with the target before anything is written (for instance to
                verify its bento can still be served); if it raises, nothing changes.

        Returns:
            The new production release (action "rollback").

        Raises:
            RegistryError: the reason is blank, there is nothing to roll back to, or the
                registry is corrupt; it is left unchanged.
        """
        if not reason.strip():
            raise RegistryError("a rollback needs a reason (it was blank)")
        with self._store.locked() as writer:
            state = writer.load()
            target = _rollback_target(state.releases)
            if target is None:
                raise RegistryError(f"nothing to roll back to: {_why_no_target(state.releases)}")
            if check is not None:
                check(target)
            release = Release.create(
                bento_tag=target.bento_tag,
                model_tag=target.model_tag,
                reason=reason,
                metrics=target.metrics,
                lineage=target.lineage,
                verdict=target.verdict,
                actor=actor,
                action="rollback",
            )
            writer.append(state, release)
        return release


class FileStore:
    """The registry as one JSON file (the embedded default, for one machine)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.location = str(path)

    def load(self) -> RegistryState:
        """Read and validate the file; a missing file is an empty registry."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return RegistryState()
        except OSError as error:
            raise RegistryError(f"registry {self.path} cannot be read: {error}") from None
        try:
            payload = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise RegistryError(
                f"registry {self.path} is corrupt (not valid JSON: {error}); "
                "restore it from a backup or fix it by hand; it was left unchanged"
            ) from None
        return validate_state(payload, str(self.path))

    def append(self, state: RegistryState, release: Release) -> RegistryState:
        """Write `state` plus `release`; the caller holds the lock and loaded `state`."""
        new_state = RegistryState(releases=[*state.releases, release])
        text = json.dumps(new_state.model_dump(mode="json"), indent=2) + "\n"
        with atomic_path(self.path) as tmp, tmp.open("w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        _fsync_dir(self.path.parent)
        self._remove_stray_temporaries()
        return new_state

    def _remove_stray_temporaries(self) -> None:
        """Delete temporary files left by writers that were killed mid-write.

        Only called under the lock, after a successful write: every writer holds the lock
        while its temporary file exists, so any file left now belongs to a dead process.
        """
        # atomic_path names them `.<name>.<random>.tmp`; the random part has no dot, so
        # temporaries of other files such as `<name>.bak` do not match.
        pattern = re.compile(rf"\.{re.escape(self.path.name)}\.[^.]+\.tmp")
        try:
            for entry in self.path.parent.iterdir():
                if pattern.fullmatch(entry.name):
                    entry.unlink(missing_ok=True)
        except OSError:
            pass  # best effort: the registry itself is written; a later write tries again

    @contextmanager
    def locked(self) -> Iterator[FileStore]:
        # Lock the directory itself rather than a lock file, so no extra file is left behind.
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield self
        finally:
            os.close(fd)  # closing the descriptor releases the lock


def validate_state(payload: Any, where: str) -> RegistryState:
    """A registry state from its JSON form; `where` names the file or database in errors.

    Raises:
        RegistryError: the payload is not a registry of this schema version.
    """
    if not isinstance(payload, dict):
        raise RegistryError(
            f"registry {where} has the wrong shape: expected an object with "
            f"'releases', got {type(payload).__name__}"
        )
    version = payload.get("schema_version")
    if version != SCHEMA_VERSION:
        raise RegistryError(
            f"registry {where} has schema_version {version!r}; "
            f"this textgate reads version {SCHEMA_VERSION}"
        )
    try:
        return RegistryState.model_validate(payload)
    except ValidationError as error:
        raise RegistryError(f"registry {where} has the wrong shape: {_describe(error)}") from None


def _rollback_target(releases: list[Release]) -> Release | None:
    """The entry below the top of the undo stack: promote and manual push, rollback pops."""
    stack: list[Release] = []
    for release in releases:
        if release.action == "rollback":
            if stack:
                stack.pop()
        else:
            stack.append(release)
    return stack[-2] if len(stack) >= 2 else None


def _why_no_target(releases: list[Release]) -> str:
    if not releases:
        return "the registry has no releases yet"
    current = releases[-1].bento_tag
    if len(releases) == 1:
        return f"production {current} is the only release in the history"
    return f"every release before production {current} has already been rolled back"


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable (POSIX keeps directory entries in the directory)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
