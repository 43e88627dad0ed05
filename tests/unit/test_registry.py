"""The registry file: append-only history, atomic writes, loud failure on a bad file."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from textgate.errors import TextgateError
from textgate.registry import Registry, RegistryError, Release


def make_release(n: int, **overrides: object) -> Release:
    fields: dict[str, object] = {
        "bento_tag": f"textgate:v{n}",
        "model_tag": f"textgate-classifier:m{n}",
        "reason": f"release {n}",
        "metrics": {"accuracy": 0.9 + n / 100, "per_class": {"refund": 0.95}},
        "lineage": {"data": f"md5-{n}", "commit": "abc123"},
        "now": datetime(2025, 1, n, 12, tzinfo=UTC),
        "actor": "ci@builder",
    }
    fields.update(overrides)
    return Release.create(**fields)  # type: ignore[arg-type]


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "state" / "registry.json")


def test_missing_file_is_an_empty_registry(registry: Registry) -> None:
    assert registry.production() is None
    assert registry.history() == []
    assert registry.load().releases == []
    assert not registry.path.exists()  # reading never creates the file


def test_promote_twice_keeps_history_and_the_last_is_production(registry: Registry) -> None:
    first, second = make_release(1), make_release(2)
    registry.promote(first)
    registry.promote(second)

    assert registry.history() == [first, second]
    assert registry.production() == second
    # A fresh reader sees the same state: it is all in the file.
    assert Registry(registry.path).production() == second


def test_rollback_is_a_new_promotion_appended_to_the_history(registry: Registry) -> None:
    first, second = make_release(1), make_release(2)
    rollback = make_release(
        1, reason="rollback: v2 regressed", now=datetime(2025, 1, 3, tzinfo=UTC)
    )
    for release in (first, second, rollback):
        registry.promote(release)

    assert [r.bento_tag for r in registry.history()] == [
        "textgate:v1",
        "textgate:v2",
        "textgate:v1",
    ]
    assert registry.production() == rollback


def test_the_file_is_plain_json_with_utc_iso_times(registry: Registry) -> None:
    registry.promote(make_release(1))
    payload = json.loads(registry.path.read_text(encoding="utf-8"))

    assert payload["schema_version"] == 1
    (entry,) = payload["releases"]
    assert entry["bento_tag"] == "textgate:v1"
    assert entry["promoted_by"] == "ci@builder"
    assert entry["metrics"]["per_class"] == {"refund": 0.95}
    stamp = datetime.fromisoformat(entry["promoted_at"])
    assert stamp.utcoffset() == timedelta(0)


def test_create_stamps_utc_now_and_user_at_host() -> None:
    release = Release.create(bento_tag="textgate:v1", model_tag="m:1", reason="first")
    assert release.promoted_at.utcoffset() == timedelta(0)
    assert abs(datetime.now(UTC) - release.promoted_at) < timedelta(minutes=1)
    user, _, host = release.promoted_by.partition("@")
    assert user and host

    local = datetime(2025, 1, 1, 14, tzinfo=timezone(timedelta(hours=2)))
    converted = Release.create(bento_tag="b:1", model_tag="m:1", reason="r", now=local)
    assert converted.promoted_at == datetime(2025, 1, 1, 12, tzinfo=UTC)
    assert converted.promoted_at.utcoffset() == timedelta(0)


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b'{"schema_version": 1, "releases": [', id="truncated-json"),
        pytest.param(b"", id="empty-file"),
        pytest.param(b"\xff\xfe not utf-8", id="not-utf8"),
    ],
)
def test_corrupt_file_raises_and_is_left_unchanged(registry: Registry, content: bytes) -> None:
    registry.path.parent.mkdir(parents=True)
    registry.path.write_bytes(content)

    with pytest.raises(RegistryError, match="corrupt") as caught:
        registry.production()
    assert str(registry.path) in str(caught.value)
    assert isinstance(caught.value, TextgateError)

    with pytest.raises(RegistryError):
        registry.promote(make_release(1))
    assert registry.path.read_bytes() == content  # never a silent reset


@pytest.mark.parametrize(
    ("payload", "problem"),
    [
        pytest.param([], "wrong shape", id="a-list"),
        pytest.param({"releases": []}, "schema_version None", id="no-version"),
        pytest.param({"schema_version": 99, "releases": []}, "schema_version 99", id="newer"),
        pytest.param({"schema_version": 1, "releases": {}}, "releases", id="releases-not-list"),
        pytest.param(
            {"schema_version": 1, "releases": [{"bento_tag": "textgate:v1"}]},
            "releases.0.model_tag",
            id="missing-fields",
        ),
        pytest.param(
            {
                "schema_version": 1,
                "releases": [
                    {
                        **make_release(1).model_dump(mode="json"),
                        "promoted_at": "2025-01-01T12:00:00",  # no time zone
                    }
                ],
            },
            "promoted_at",
            id="naive-time",
        ),
        pytest.param(
            {"schema_version": 1, "releases": [], "production": "textgate:v1"},
            "production",
            id="unknown-key",
        ),
    ],
)
def test_wrong_shape_raises_naming_file_and_problem(
    registry: Registry, payload: object, problem: str
) -> None:
    registry.path.parent.mkdir(parents=True)
    text = json.dumps(payload)
    registry.path.write_text(text, encoding="utf-8")

    with pytest.raises(RegistryError) as caught:
        registry.history()
    message = str(caught.value)
    assert str(registry.path) in message
    assert problem in message

    with pytest.raises(RegistryError):
        registry.promote(make_release(2))
    assert registry.path.read_text(encoding="utf-8") == text


def test_promote_leaves_no_temporary_files(registry: Registry) -> None:
    for n in (1, 2, 3):
        registry.promote(make_release(n))
    assert sorted(p.name for p in registry.path.parent.iterdir()) == ["registry.json"]


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary_files(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry.promote(make_release(1))
    before = registry.path.read_bytes()

    def crash(*args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("textgate.registry.os.fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        registry.promote(make_release(2))

    assert registry.path.read_bytes() == before
    assert sorted(p.name for p in registry.path.parent.iterdir()) == ["registry.json"]
    monkeypatch.undo()
    assert registry.history() == [make_release(1)]


def test_release_rejects_empty_fields() -> None:
    with pytest.raises(ValueError, match="reason"):
        make_release(1, reason="")
    with pytest.raises(ValueError, match="bento_tag"):
        make_release(1, bento_tag="")
