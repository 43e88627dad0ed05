"""`textgate promote`, `rollback` and `status`: manual releases, undo, the last gate verdict.

The tests marked slow build real bentos from the tiny model into the session's throwaway
BentoML store; the others need no bento.
"""

from __future__ import annotations

import importlib
import json
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from flows.cli import main
from tests.helpers import make_params, merge, raw_params
from textgate.registry import Registry, Release

METRICS = {"accuracy": 0.91, "macro_f1": 0.9}
LINEAGE = {"git_commit": "abc123", "data_md5": "d41d8.dir", "model_md5": "m-1"}
VERDICT = {
    "passed": False,
    "checks": [
        {"name": "accuracy_floor", "passed": True, "reason": "accuracy 0.9300 >= 0.8000"},
        {"name": "macro_f1_floor", "passed": False, "reason": "macro_f1 0.5000 < 0.7000"},
    ],
    "run": {"flow_run_id": "1234"},
}


@pytest.fixture
def registry_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "registry.json"


@pytest.fixture
def params_file(tmp_path: Path, registry_path: Path) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(merge(raw_params(), {"registry": {"path": str(registry_path)}})))
    return path


def run_cli(*argv: str, params_file: Path) -> int:
    return main([*argv, "--params", str(params_file)])


def snapshot(path: Path) -> bytes | None:
    return path.read_bytes() if path.exists() else None


def release(n: int, action: str = "promote", **fields: object) -> Release:
    return Release.create(
        bento_tag=f"textgate:v{n}",
        model_tag=f"textgate-classifier:m{n}",
        reason=f"release {n}",
        metrics={"accuracy": 0.9},
        lineage={"git_commit": "abc123"},
        now=datetime(2026, 1, n, tzinfo=UTC),
        actor="ci@host",
        action=action,  # type: ignore[arg-type]
        **fields,  # type: ignore[arg-type]
    )


def write_verdict(registry_path: Path, content: str) -> Path:
    path = registry_path.parent / "verdicts" / "latest.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content, encoding="utf-8")
    return path


# Without bentos: status, the verdict file, errors that stop before BentoML is consulted.


def test_status_lists_each_release_with_its_action_and_the_rollback_target(
    params_file: Path, registry_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    registry = Registry(registry_path)
    for entry in (release(1), release(2, verdict={"passed": True, "checks": []}), release(3)):
        registry.promote(entry)
    registry.rollback("v3 regressed", actor="oncall@host")
    registry.promote(release(4, action="manual"))

    assert run_cli("status", params_file=params_file) == 0
    out = capsys.readouterr().out
    assert "production bento: textgate:v4" in out
    assert "by ci@host (manual)" in out
    assert "rollback to:      textgate:v2" in out
    assert "history (5 release(s), newest first)" in out
    lines = [line.split("  ", 2)[2] for line in out.splitlines() if line.startswith("  2026-")]
    assert lines == [
        "manual    textgate:v4  release 4",
        "rollback  textgate:v2  v3 regressed",
        "promote   textgate:v3  release 3",
        "promote   textgate:v2  release 2",
        "promote   textgate:v1  release 1",
    ]
    assert "last gate verdict" not in out  # no verdict file

    assert run_cli("status", "--json", params_file=params_file) == 0
    payload = json.loads(capsys.readouterr().out)
    assert [entry["action"] for entry in payload["history"]] == [
        "promote",
        "promote",
        "promote",
        "rollback",
        "manual",
    ]
    assert payload["history"][3]["verdict"] == {"passed": True, "checks": []}
    assert payload["rollback_target"]["bento_tag"] == "textgate:v2"
    assert payload["last_verdict"] is None


@pytest.mark.parametrize("with_production", [True, False], ids=["production", "none-yet"])
def test_status_shows_the_last_gate_verdict(
    params_file: Path,
    registry_path: Path,
    capsys: pytest.CaptureFixture[str],
    with_production: bool,
) -> None:
    if with_production:
        Registry(registry_path).promote(release(1))
    write_verdict(registry_path, json.dumps(VERDICT))

    assert run_cli("status", params_file=params_file) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    assert captured.out.splitlines()[-3:] == [
        "last gate verdict: FAILED",
        "  [pass] accuracy_floor: accuracy 0.9300 >= 0.8000",
        "  [FAIL] macro_f1_floor: macro_f1 0.5000 < 0.7000",
    ]
    assert ("production bento: textgate:v1" in captured.out) == with_production

    assert run_cli("status", "--json", params_file=params_file) == 0
    assert json.loads(capsys.readouterr().out)["last_verdict"] == VERDICT


def test_status_shows_a_passed_verdict(
    params_file: Path, registry_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    passed = {"passed": True, "checks": [{"name": "accuracy_floor", "passed": True}]}
    write_verdict(registry_path, json.dumps(passed))
    assert run_cli("status", params_file=params_file) == 0
    assert capsys.readouterr().out.splitlines()[-2:] == [
        "last gate verdict: PASSED",
        "  [pass] accuracy_floor:",
    ]


def test_status_reads_the_verdict_from_registry_verdicts_dir_relative_to_the_params_file(
    tmp_path: Path, registry_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    params_file = tmp_path / "params.yaml"
    overrides = {"registry": {"path": str(registry_path), "verdicts_dir": "elsewhere/verdicts"}}
    params_file.write_text(yaml.safe_dump(merge(raw_params(), overrides)))
    write_verdict(registry_path, json.dumps({**VERDICT, "passed": True}))  # not read any more
    moved = tmp_path / "elsewhere" / "verdicts" / "latest.json"
    moved.parent.mkdir(parents=True)
    moved.write_text(json.dumps(VERDICT), encoding="utf-8")

    assert run_cli("status", params_file=params_file) == 0
    assert "last gate verdict: FAILED" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        pytest.param('{"passed": true, "checks": [', "cannot be read", id="not-json"),
        pytest.param("[]", "expected a JSON object, got list", id="a-list"),
        pytest.param('{"checks": []}', "'passed'", id="no-passed"),
        pytest.param('{"passed": "yes", "checks": []}', "'passed'", id="passed-not-bool"),
        pytest.param('{"passed": true}', "'checks'", id="no-checks"),
        pytest.param('{"passed": true, "checks": [{"passed": true}]}', "checks[0]", id="no-name"),
    ],
)
def test_a_bad_verdict_file_warns_and_status_still_works(
    params_file: Path,
    registry_path: Path,
    capsys: pytest.CaptureFixture[str],
    content: str,
    problem: str,
) -> None:
    Registry(registry_path).promote(release(1))
    verdict_path = write_verdict(registry_path, content)

    assert run_cli("status", params_file=params_file) == 0
    captured = capsys.readouterr()
    assert "production bento: textgate:v1" in captured.out
    assert "last gate verdict" not in captured.out
    (warning,) = captured.err.splitlines()
    assert warning.startswith("textgate: warning: ignoring the last gate verdict ")
    assert str(verdict_path) in warning and problem in warning

    assert run_cli("status", "--json", params_file=params_file) == 0
    captured = capsys.readouterr()
    payload = json.loads(captured.out)  # the warning does not spoil the JSON on stdout
    assert payload["last_verdict"] is None
    assert payload["production"]["bento_tag"] == "textgate:v1"
    assert "ignoring the last gate verdict" in captured.err


@pytest.mark.parametrize(
    "command",
    [
        pytest.param(["status"], id="status"),
        pytest.param(["promote", "textgate:v9", "--reason", "hotfix"], id="promote"),
        pytest.param(["rollback", "--reason", "bad model"], id="rollback"),
    ],
)
def test_a_corrupt_registry_is_an_error_and_is_left_unchanged(
    params_file: Path, registry_path: Path, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    registry_path.parent.mkdir(parents=True)
    registry_path.write_text('{"schema_version": 1, "releases": [')

    assert run_cli(*command, params_file=params_file) == 2
    err = capsys.readouterr().err
    assert err.startswith("textgate: error: registry ")
    assert "corrupt" in err and str(registry_path) in err
    assert registry_path.read_text() == '{"schema_version": 1, "releases": ['


@pytest.mark.parametrize("releases", [0, 1], ids=["empty", "single"])
def test_rollback_with_nothing_to_go_back_to_fails_and_changes_nothing(
    params_file: Path, registry_path: Path, capsys: pytest.CaptureFixture[str], releases: int
) -> None:
    for n in range(1, releases + 1):
        Registry(registry_path).promote(release(n))
    before = snapshot(registry_path)

    assert run_cli("rollback", "--reason", "bad model", params_file=params_file) == 2
    assert capsys.readouterr().err.startswith("textgate: error: nothing to roll back to: ")
    assert snapshot(registry_path) == before


@pytest.mark.parametrize(
    "command",
    [
        pytest.param(["promote", "textgate:v1", "--reason", "  "], id="promote-blank"),
        pytest.param(["promote", "textgate:v1"], id="promote-missing"),
        pytest.param(["rollback", "--reason", ""], id="rollback-blank"),
        pytest.param(["rollback"], id="rollback-missing"),
    ],
)
def test_promote_and_rollback_need_a_reason(
    params_file: Path, registry_path: Path, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    Registry(registry_path).promote(release(1))
    Registry(registry_path).promote(release(2))
    before = snapshot(registry_path)

    with pytest.raises(SystemExit) as caught:
        run_cli(*command, params_file=params_file)
    assert caught.value.code == 2
    assert "--reason" in capsys.readouterr().err
    assert snapshot(registry_path) == before


def fake_bento(tag: str, labels: dict[str, str], models: list[str]) -> SimpleNamespace:
    infos = [SimpleNamespace(tag=model) for model in models]
    return SimpleNamespace(tag=tag, info=SimpleNamespace(labels=labels, all_models=infos))


@pytest.mark.parametrize(
    ("bento", "problem"),
    [
        pytest.param(
            fake_bento("other:1", {"project": "other"}, ["m:1"]),
            "not a textgate bento (label project='other'",
            id="not-textgate",
        ),
        pytest.param(
            fake_bento("textgate:two", {"project": "textgate"}, ["m:1", "m:2"]),
            "exactly one model, it serves ['m:1', 'm:2']",
            id="two-models",
        ),
        pytest.param(
            fake_bento("textgate:none", {"project": "textgate"}, []),
            "exactly one model, it serves []",
            id="no-model",
        ),
        pytest.param(
            fake_bento("textgate:gone", {"project": "textgate"}, ["textgate-classifier:gone"]),
            "its model textgate-classifier:gone is no longer in the BentoML model store",
            id="model-deleted",
        ),
    ],
)
def test_promote_refuses_a_bento_that_is_not_a_servable_textgate_bento(
    params_file: Path,
    registry_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    bentoml_home: Path,
    bento: SimpleNamespace,
    problem: str,
) -> None:
    # The module itself: `bentoml.bentos` may still be a lazy proxy that loading replaces.
    store = importlib.import_module("bentoml.bentos")
    monkeypatch.setattr(store, "get", lambda tag: bento)
    Registry(registry_path).promote(release(1))
    before = snapshot(registry_path)

    assert run_cli("promote", str(bento.tag), "--reason", "hotfix", params_file=params_file) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"textgate: error: cannot promote {bento.tag}: ")
    assert problem in err
    assert snapshot(registry_path) == before


# With real bentos in the session's BentoML store.


@pytest.fixture(scope="module")
def bentos(bentoml_home: Path, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """Three bentos of the tiny model: a, b, and `doomed`, which one test deletes."""
    from tasks.package import package_model

    params = make_params(
        {"registry": {"path": str(tmp_path_factory.mktemp("unused") / "registry.json")}}
    )
    built = {}
    for name in ("a", "b", "doomed"):
        result = package_model(
            tiny_model_dir,
            params=params,
            metrics={**METRICS, "name": name},
            lineage={**LINEAGE, "run": name},
        )
        built[name] = result
    return built


@pytest.mark.slow
def test_promote_an_unknown_bento_fails_and_changes_nothing(
    bentos, params_file: Path, registry_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for tag in ("textgate:doesnotexist", "Not A Tag!"):
        assert run_cli("promote", tag, "--reason", "hotfix", params_file=params_file) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"textgate: error: cannot promote {tag}: ")
        assert not registry_path.exists()

    Registry(registry_path).promote(release(1))
    before = snapshot(registry_path)
    assert run_cli("promote", "textgate:nope", "--reason", "x", params_file=params_file) == 2
    assert "no such bento in the BentoML store" in capsys.readouterr().err
    assert snapshot(registry_path) == before


@pytest.mark.slow
def test_promote_then_rollback_then_nothing_left(
    bentos, params_file: Path, registry_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = bentos["a"], bentos["b"]

    assert (
        run_cli("promote", a.bento_tag, "--reason", "first by hand", params_file=params_file) == 0
    )
    assert capsys.readouterr().out.splitlines() == [
        "production was: (none)",
        f"production now: {a.bento_tag} (model {a.model_tag}, manual)",
    ]
    production = Registry(registry_path).production()
    assert production is not None
    assert (production.bento_tag, production.model_tag) == (a.bento_tag, a.model_tag)
    assert (production.action, production.reason) == ("manual", "first by hand")
    # Metrics and lineage come from the model's BentoML metadata.
    assert production.metrics == {**METRICS, "name": "a"}
    assert production.lineage == {**LINEAGE, "run": "a"}
    assert production.verdict == {}

    assert run_cli("promote", b.bento_tag, "--reason", "second", params_file=params_file) == 0
    assert capsys.readouterr().out.splitlines()[0] == (
        f"production was: {a.bento_tag} (model {a.model_tag}, manual)"
    )
    assert run_cli("promote", b.bento_tag, "--reason", "again", params_file=params_file) == 2
    assert "it is production already" in capsys.readouterr().err

    assert run_cli("rollback", "--reason", "b regressed", params_file=params_file) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"rolled back production from {b.bento_tag} (model {b.model_tag}, manual)",
        f"                         to {a.bento_tag} (model {a.model_tag}, rollback)",
    ]
    registry = Registry(registry_path)
    production = registry.production()
    assert production is not None
    assert (production.bento_tag, production.action) == (a.bento_tag, "rollback")
    assert production.metrics == {**METRICS, "name": "a"}
    before = registry_path.read_bytes()

    assert run_cli("rollback", "--reason", "and again", params_file=params_file) == 2
    assert "nothing to roll back to" in capsys.readouterr().err
    assert registry_path.read_bytes() == before

    assert run_cli("status", params_file=params_file) == 0
    out = capsys.readouterr().out
    assert f"rollback  {a.bento_tag}  b regressed" in out
    assert f"manual    {b.bento_tag}  second" in out
    assert f"manual    {a.bento_tag}  first by hand" in out


@pytest.mark.slow
def test_rollback_to_a_deleted_bento_fails_and_changes_nothing(
    bentos, params_file: Path, registry_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import bentoml

    doomed, a = bentos["doomed"], bentos["a"]
    for result in (doomed, a):
        tag = result.bento_tag
        assert run_cli("promote", tag, "--reason", "promote", params_file=params_file) == 0
    bentoml.bentos.delete(doomed.bento_tag)
    capsys.readouterr()
    before = registry_path.read_bytes()

    assert run_cli("rollback", "--reason", "a regressed", params_file=params_file) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"textgate: error: cannot roll back: {doomed.bento_tag} cannot be ")
    assert "no such bento in the BentoML store" in err
    assert "production is unchanged" in err
    assert registry_path.read_bytes() == before
    production = Registry(registry_path).production()
    assert production is not None and production.bento_tag == a.bento_tag


@pytest.mark.slow
def test_promote_a_real_bento_into_a_corrupt_registry_writes_nothing(
    bentos, params_file: Path, registry_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    registry_path.parent.mkdir(parents=True)
    registry_path.write_text("{not json")
    tag = bentos["a"].bento_tag
    assert run_cli("promote", tag, "--reason", "hotfix", params_file=params_file) == 2
    assert "corrupt" in capsys.readouterr().err
    assert registry_path.read_text() == "{not json"
