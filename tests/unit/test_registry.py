"""The registry file: append-only history, rollback as undo, atomic writes, loud failure."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from textgate.errors import TextgateError
from textgate.io import atomic_path
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


def test_promoting_an_older_bento_again_appends_to_the_history(registry: Registry) -> None:
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
    with pytest.raises(RegistryError, match="corrupt"):
        registry.rollback("undo")
    with pytest.raises(RegistryError, match="corrupt"):
        registry.rollback_target()
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
        pytest.param(
            {
                "schema_version": 1,
                "releases": [{**make_release(1).model_dump(mode="json"), "action": "undo"}],
            },
            "releases.0.action",
            id="unknown-action",
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
    with pytest.raises(RegistryError):
        registry.rollback("undo")
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


# Rollback: history replayed as a stack, promote and manual push, rollback pops.


def apply(registry: Registry, steps: str) -> list[str]:
    """Run `steps` (a digit promotes release n, `m<digit>` promotes it by hand, `r` rolls
    back) and return the production bento after each rollback."""
    after_rollbacks = []
    manual = False
    for step in steps:
        if step == "m":
            manual = True
        elif step == "r":
            after_rollbacks.append(registry.rollback("undo", actor="oncall@host").bento_tag)
        else:
            action = "manual" if manual else "promote"
            registry.promote(make_release(int(step), action=action))
            manual = False
    return after_rollbacks


@pytest.mark.parametrize(
    ("steps", "productions", "target"),
    [
        pytest.param("123r", ["textgate:v2"], "textgate:v1", id="A-B-C-rollback"),
        pytest.param("123rr", ["textgate:v2", "textgate:v1"], None, id="A-B-C-rollback-twice"),
        pytest.param("12r4r", ["textgate:v1", "textgate:v1"], None, id="rollback-then-promote"),
        pytest.param("12r4", ["textgate:v1"], "textgate:v1", id="promote-after-rollback"),
        pytest.param("1m2r", ["textgate:v1"], None, id="manual-is-undone-like-promote"),
        pytest.param("12m3", [], "textgate:v2", id="manual-pushes"),
        pytest.param(
            "1234rr5r", ["textgate:v3", "textgate:v2", "textgate:v2"], "textgate:v1", id="long"
        ),
        pytest.param("1", [], None, id="single"),
        pytest.param("", [], None, id="empty"),
    ],
)
def test_rollback_undoes_promotions_like_a_stack(
    registry: Registry, steps: str, productions: list[str], target: str | None
) -> None:
    assert apply(registry, steps) == productions
    found = registry.rollback_target()
    assert (found.bento_tag if found else None) == target


def test_three_rollbacks_walk_back_then_fail_leaving_the_file_unchanged(
    registry: Registry,
) -> None:
    for n in (1, 2, 3):
        registry.promote(make_release(n))
    assert registry.rollback("v3 regressed").bento_tag == "textgate:v2"
    assert registry.rollback("v2 regressed too").bento_tag == "textgate:v1"
    before = registry.path.read_bytes()

    with pytest.raises(RegistryError, match="nothing to roll back to") as caught:
        registry.rollback("and v1?")
    assert isinstance(caught.value, TextgateError)
    assert "already been rolled back" in str(caught.value)
    assert registry.path.read_bytes() == before
    assert [(r.action, r.bento_tag) for r in registry.history()] == [
        ("promote", "textgate:v1"),
        ("promote", "textgate:v2"),
        ("promote", "textgate:v3"),
        ("rollback", "textgate:v2"),
        ("rollback", "textgate:v1"),
    ]


def test_rollback_copies_the_target_and_records_who_and_why(registry: Registry) -> None:
    verdict = {"passed": True, "checks": [{"name": "accuracy_floor", "passed": True}]}
    first = make_release(1, verdict=verdict)
    registry.promote(first)
    registry.promote(make_release(2, verdict={"passed": True, "checks": []}))

    release = registry.rollback("v2 mislabels refunds", actor="oncall@host")

    assert registry.production() == release
    assert release.action == "rollback"
    assert release.reason == "v2 mislabels refunds"
    assert release.promoted_by == "oncall@host"
    assert release.promoted_at > first.promoted_at
    copied = ("bento_tag", "model_tag", "metrics", "lineage", "verdict")
    assert {key: getattr(release, key) for key in copied} == {
        key: getattr(first, key) for key in copied
    }
    assert Registry(registry.path).history()[-1] == release  # it is in the file


def test_rollback_with_nothing_before_production_changes_nothing(registry: Registry) -> None:
    with pytest.raises(RegistryError, match="nothing to roll back to: the registry has no"):
        registry.rollback("undo")
    assert not registry.path.exists()

    registry.promote(make_release(1))
    before = registry.path.read_bytes()
    with pytest.raises(RegistryError, match="textgate:v1 is the only release"):
        registry.rollback("undo")
    assert registry.path.read_bytes() == before


def test_a_failing_check_sees_the_target_and_stops_the_rollback(registry: Registry) -> None:
    for n in (1, 2):
        registry.promote(make_release(n))
    before = registry.path.read_bytes()
    seen: list[Release] = []

    class BentoGone(TextgateError):
        pass

    def check(target: Release) -> None:
        seen.append(target)
        raise BentoGone(f"{target.bento_tag} was deleted")

    with pytest.raises(BentoGone, match="textgate:v1 was deleted"):
        registry.rollback("undo", check=check)
    assert seen == [make_release(1)]
    assert registry.path.read_bytes() == before

    passed: list[Release] = []
    assert registry.rollback("undo", check=passed.append).bento_tag == "textgate:v1"
    assert passed == [make_release(1)]


@pytest.mark.parametrize("reason", ["", "   "])
def test_rollback_needs_a_reason(registry: Registry, reason: str) -> None:
    for n in (1, 2):
        registry.promote(make_release(n))
    before = registry.path.read_bytes()
    with pytest.raises(RegistryError, match="needs a reason"):
        registry.rollback(reason)
    assert registry.path.read_bytes() == before


def test_a_file_written_before_action_and_verdict_existed_still_loads(
    registry: Registry,
) -> None:
    old = []
    for n in (1, 2):
        entry = make_release(n).model_dump(mode="json")
        del entry["action"], entry["verdict"]
        old.append(entry)
    registry.path.parent.mkdir(parents=True)
    registry.path.write_text(json.dumps({"schema_version": 1, "releases": old}))

    history = registry.history()
    assert [(r.bento_tag, r.action, r.verdict) for r in history] == [
        ("textgate:v1", "promote", {}),
        ("textgate:v2", "promote", {}),
    ]
    assert history == [make_release(1), make_release(2)]
    assert registry.rollback("undo").bento_tag == "textgate:v1"
    entries = json.loads(registry.path.read_text())["releases"]
    assert [entry["action"] for entry in entries] == ["promote", "promote", "rollback"]


def test_release_create_takes_action_and_verdict() -> None:
    release = make_release(1, action="manual", verdict={"passed": False, "checks": []})
    assert release.action == "manual"
    assert release.verdict == {"passed": False, "checks": []}
    assert make_release(1).action == "promote" and make_release(1).verdict == {}
    with pytest.raises(ValueError, match="action"):
        make_release(1, action="hotfix")


# Writers entered and never exited; kept alive because closing one (as garbage collection
# would) runs its clean-up and deletes the temporary file the tests need.
_ABANDONED: list[object] = []


def interrupted_write(path: Path, content: str) -> Path:
    """A temporary file exactly as a writer killed between writing and renaming leaves it."""
    writer = atomic_path(path)
    tmp = writer.__enter__()  # never exited: the rename and the clean-up do not happen
    _ABANDONED.append(writer)
    tmp.write_text(content, encoding="utf-8")
    return tmp


@pytest.mark.parametrize(
    "content",
    [
        pytest.param('{"schema_version": 1, "releases": [', id="half-written"),
        pytest.param(
            json.dumps(
                {"schema_version": 1, "releases": [make_release(9).model_dump(mode="json")]}
            ),
            id="complete-but-never-renamed",
        ),
    ],
)
def test_a_stray_temporary_file_is_never_read_and_is_removed_by_the_next_write(
    registry: Registry, content: str
) -> None:
    registry.path.parent.mkdir(parents=True)
    stray = interrupted_write(registry.path, content)
    assert stray.parent == registry.path.parent and stray.name.startswith(".registry.json.")
    assert registry.history() == []  # the registry file does not exist yet
    assert not registry.path.exists()

    registry.promote(make_release(1))  # the first write
    assert not stray.exists()

    stray = interrupted_write(registry.path, content)
    # Files that merely look alike stay: another file's temporary, and unrelated ones.
    others = [".registry.json.bak.abc123.tmp", "registry.json.tmp", "notes.tmp"]
    for name in others:
        (registry.path.parent / name).write_text("keep me")
    assert registry.history() == [make_release(1)]
    assert stray.exists()

    registry.promote(make_release(2))  # a later write
    assert not stray.exists()
    assert sorted(p.name for p in registry.path.parent.iterdir()) == sorted(
        ["registry.json", *others]
    )
    assert registry.history() == [make_release(1), make_release(2)]


def test_rollback_removes_stray_temporary_files_too(registry: Registry) -> None:
    for n in (1, 2):
        registry.promote(make_release(n))
    stray = interrupted_write(registry.path, "{")
    assert stray.exists()
    registry.rollback("undo")
    assert not stray.exists()
    assert [p.name for p in registry.path.parent.iterdir()] == ["registry.json"]
