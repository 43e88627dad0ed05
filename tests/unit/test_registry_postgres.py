"""The shared registry on a real PostgreSQL: same API as the file, serialised promotions
across processes, an append-only table, consistent reads, and errors that name the database
without its password."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import psycopg
import pytest

from tests.unit.test_registry import make_release
from textgate.registry import REGISTRY_URL_ENV, Registry, RegistryError, Release
from textgate.registry_postgres import TABLE, display_url


@pytest.fixture
def registry(postgres_url: str, tmp_path: Path) -> Registry:
    return Registry(tmp_path / "unused" / "registry.json", url=postgres_url)


def test_an_empty_database_is_an_empty_registry_and_writes_no_file(registry: Registry) -> None:
    assert registry.production() is None
    assert registry.history() == []
    assert registry.rollback_target() is None
    assert not registry.path.parent.exists()


def test_promote_and_rollback_behave_as_with_the_file(registry: Registry) -> None:
    first, second = make_release(1), make_release(2)
    registry.promote(first)
    registry.promote(second)
    assert registry.history() == [first, second]
    assert registry.rollback_target() == first

    release = registry.rollback("v2 regressed", actor="oncall@host")

    assert release.action == "rollback" and release.bento_tag == first.bento_tag
    assert [entry.bento_tag for entry in registry.history()] == ["textgate:v1", "textgate:v2"] + [
        "textgate:v1"
    ]
    with pytest.raises(RegistryError, match="already been rolled back"):
        registry.rollback("again")


def test_the_environment_variable_selects_the_database(
    postgres_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    Registry(tmp_path / "a.json", url=postgres_url).promote(make_release(1))
    monkeypatch.setenv(REGISTRY_URL_ENV, postgres_url)

    shared = Registry(tmp_path / "b.json")  # any path: the URL wins

    assert shared.production() == make_release(1)
    assert shared.location == postgres_url


def test_a_failing_check_rolls_the_transaction_back(registry: Registry) -> None:
    registry.promote(make_release(1))
    registry.promote(make_release(2))

    def refuse(target: Release) -> None:
        raise RegistryError(f"{target.bento_tag} is gone")

    with pytest.raises(RegistryError, match="textgate:v1 is gone"):
        registry.rollback("try", check=refuse)
    assert len(registry.history()) == 2


@pytest.mark.parametrize(
    "statement", [f"UPDATE {TABLE} SET seq = seq", f"DELETE FROM {TABLE}", f"TRUNCATE {TABLE}"]
)
def test_the_history_table_is_append_only(registry: Registry, statement: str) -> None:
    registry.promote(make_release(1))
    with psycopg.connect(registry.url) as connection, pytest.raises(psycopg.Error) as caught:
        connection.execute(statement)
    assert "append-only" in str(caught.value)
    assert registry.history() == [make_release(1)]


def _promote_many(url: str, start: int, count: int, barrier) -> None:
    registry = Registry("/nonexistent/registry.json", url=url)
    barrier.wait()
    for n in range(start, start + count):
        registry.promote(make_release(1, bento_tag=f"textgate:w{n}"))


def test_concurrent_promotions_from_processes_serialise_and_none_is_lost(
    registry: Registry,
) -> None:
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(4)
    workers = [
        context.Process(target=_promote_many, args=(registry.url, 100 * i, 10, barrier))
        for i in range(4)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
        assert worker.exitcode == 0

    tags = [release.bento_tag for release in registry.history()]
    assert sorted(tags) == sorted(f"textgate:w{100 * i + n}" for i in range(4) for n in range(10))
    # Each writer's own promotions keep their order: one queue, not interleaved rewrites.
    for i in range(4):
        mine = [tag for tag in tags if tag.startswith(f"textgate:w{100 * i}")]
        assert mine == sorted(mine, key=lambda tag: int(tag.split("w")[1]))


def test_a_reader_never_sees_an_open_promotion(registry: Registry) -> None:
    registry.promote(make_release(1))
    store = registry._store
    with store.locked() as writer:
        writer.append(writer.load(), make_release(2))
        # Inside the writer's transaction: another connection sees the old state whole.
        assert Registry(registry.path, url=registry.url).history() == [make_release(1)]
    assert registry.history() == [make_release(1), make_release(2)]


def test_an_unreachable_database_is_named_without_its_password(tmp_path: Path) -> None:
    from textgate.process import free_port

    url = f"postgresql://team:s3cret-pw@127.0.0.1:{free_port()}/registry"
    registry = Registry(tmp_path / "registry.json", url=url)

    with pytest.raises(RegistryError) as caught:
        registry.production()

    message = str(caught.value)
    assert "cannot be reached" in message and "TEXTGATE_REGISTRY" in message
    assert "127.0.0.1" in message and "s3cret-pw" not in message
    assert not (tmp_path / "registry.json").exists()


def test_a_url_that_is_not_postgresql_is_refused_without_its_secret(tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match="not a postgresql:// URL") as caught:
        Registry(tmp_path / "registry.json", url="mysql://me:pw123@db/x")
    assert "pw123" not in str(caught.value)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://u:pw@h:5432/d", "postgresql://u:***@h:5432/d"),
        (
            "postgresql://u@h/d?password=pw&sslmode=require",
            "postgresql://u@h/d?password=***&sslmode=require",
        ),
        ("postgresql://h/d", "postgresql://h/d"),
    ],
)
def test_display_url_hides_passwords(url: str, shown: str) -> None:
    assert display_url(url) == shown


def test_a_row_of_another_schema_version_is_an_error(registry: Registry) -> None:
    registry.promote(make_release(1))
    with psycopg.connect(registry.url) as connection:
        connection.execute(
            f"INSERT INTO {TABLE} (schema_version, release) VALUES (99, '{{}}'::jsonb)"
        )
    with pytest.raises(RegistryError, match="schema_version 99"):
        registry.history()
