"""The shared S3 store on a real (moto) S3 server: `textgate remote add`, the reachability
check, `dvc push`/`pull`, and bento export/import with clear errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from flows.cli import main
from tasks import remote as remote_tasks
from tasks.remote import Remote, RemoteError
from tests.shared_state import S3_SECRET_KEY


def _git_dvc_repo(path: Path) -> Path:
    path.mkdir(parents=True)
    subprocess.run(["git", "init", "-q"], cwd=path, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=path, check=True)
    (path / "params.yaml").write_text("{}\n")
    return path


def test_remote_add_writes_the_default_remote_to_dvc_config(s3_env, tmp_path: Path, capsys):
    server, bucket = s3_env
    repo = _git_dvc_repo(tmp_path / "repo")

    code = main(
        ["remote", "add", f"s3://{bucket}/team", "--endpoint-url", server.endpoint,
         "--params", str(repo / "params.yaml")]
    )  # fmt: skip

    assert code == 0
    config = (repo / ".dvc" / "config").read_text()
    assert f"url = s3://{bucket}/team" in config and server.endpoint in config
    assert "secret" not in config.lower() and "access" not in config.lower()
    assert remote_tasks.read_remote(repo) == Remote(
        "storage", f"s3://{bucket}/team", server.endpoint
    )
    out = capsys.readouterr()
    assert S3_SECRET_KEY not in out.out + out.err


@pytest.mark.parametrize("url", ["/local/dir", "s3://", "gs://bucket/x"])
def test_remote_add_refuses_what_is_not_an_s3_url(tmp_path: Path, url: str, capsys) -> None:
    repo = _git_dvc_repo(tmp_path / "repo")
    assert main(["remote", "add", url, "--params", str(repo / "params.yaml")]) == 2
    assert "s3://bucket/prefix" in capsys.readouterr().err
    assert "storage" not in (repo / ".dvc" / "config").read_text()


def test_an_unreachable_store_is_named_and_no_secret_shown(s3_env) -> None:
    from textgate.process import free_port

    endpoint = f"http://127.0.0.1:{free_port()}"
    remote = Remote("storage", "s3://nowhere/x", endpoint)

    with pytest.raises(RemoteError) as caught:
        remote_tasks.check_remote(remote)

    message = str(caught.value)
    assert "cannot be reached" in message and endpoint in message and "s3://nowhere/x" in message
    assert S3_SECRET_KEY not in message


def test_a_missing_bucket_is_refused_by_name(s3_env) -> None:
    server, _ = s3_env
    with pytest.raises(RemoteError, match="bucket 'no-such-bucket'"):
        remote_tasks.check_remote(Remote("storage", "s3://no-such-bucket/x", server.endpoint))


def test_dvc_push_then_pull_restores_data_in_a_fresh_clone(s3_env, tmp_path: Path) -> None:
    server, bucket = s3_env
    origin = _git_dvc_repo(tmp_path / "origin")
    remote_tasks.add_remote(origin, f"s3://{bucket}/data", server.endpoint)
    (origin / "data.txt").write_text("hello shared world\n")
    subprocess.run([sys.executable, "-m", "dvc", "add", "-q", "data.txt"], cwd=origin, check=True)
    subprocess.run(["git", "add", "-A"], cwd=origin, check=True)
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "data"],
        cwd=origin,
        check=True,
    )
    remote_tasks.sync(origin, "push", print)
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(origin), str(clone)], check=True)
    assert not (clone / "data.txt").exists()

    remote_tasks.sync(clone, "pull", print)

    assert (clone / "data.txt").read_text() == "hello shared world\n"


def test_a_bento_exported_to_the_store_imports_into_an_empty_store(
    s3_env, packaged_twice, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import bentoml

    server, bucket = s3_env
    remote = Remote("storage", f"s3://{bucket}/team", server.endpoint)
    first, _ = packaged_twice
    remote_tasks.export_bento(remote, first.bento_tag)
    bentoml.bentos.delete(first.bento_tag)
    bentoml.models.delete(first.model_tag)

    remote_tasks.import_bento(remote, first.bento_tag)

    bento = bentoml.bentos.get(first.bento_tag)
    assert [str(model.tag) for model in bento.info.all_models] == [first.model_tag]
    from tasks.promote import ensure_servable
    from textgate.registry import Release

    release = Release.create(bento_tag=first.bento_tag, model_tag=first.model_tag, reason="t")
    ensure_servable(release)  # the model is back in the model store too


def test_a_bento_missing_from_the_store_is_a_clear_error(s3_env) -> None:
    server, bucket = s3_env
    remote = Remote("storage", f"s3://{bucket}/team", server.endpoint)

    with pytest.raises(RemoteError) as caught:
        remote_tasks.import_bento(remote, "textgate:nosuchversion")

    message = str(caught.value)
    assert "textgate:nosuchversion is not in the store" in message
    assert f"s3://{bucket}/team/bentos/textgate/nosuchversion.bento" in message


def _workspace_with_remote(tmp_path: Path, s3_env, releases: int) -> tuple[Path, Path]:
    """A git+DVC workspace whose remote is the test bucket and whose registry holds
    `releases` releases of bentos that exist nowhere; its params file and registry."""
    from datetime import UTC, datetime

    import yaml

    from tests.helpers import merge, raw_params
    from textgate.registry import Registry, Release

    server, bucket = s3_env
    repo = _git_dvc_repo(tmp_path / "ws")
    remote_tasks.add_remote(repo, f"s3://{bucket}/team", server.endpoint)
    registry_path = repo / ".textgate" / "registry.json"
    params_file = repo / "params.yaml"
    params_file.write_text(
        yaml.safe_dump(merge(raw_params(), {"registry": {"path": str(registry_path)}}))
    )
    for n in range(1, releases + 1):
        Registry(registry_path).promote(
            Release.create(
                bento_tag=f"textgate:gone{n}",
                model_tag=f"textgate-classifier:gone{n}",
                reason=f"release {n}",
                now=datetime(2026, 1, n, tzinfo=UTC),
            )
        )
    return params_file, registry_path


def test_a_rollback_to_a_bento_missing_everywhere_leaves_production_unchanged(
    s3_env, tmp_path: Path, capsys
) -> None:
    params_file, registry_path = _workspace_with_remote(tmp_path, s3_env, releases=2)
    before = registry_path.read_bytes()

    code = main(["rollback", "--reason", "bad", "--params", str(params_file)])

    assert code == 2
    err = capsys.readouterr().err
    assert "cannot roll back: bento textgate:gone1 is not in the store" in err
    assert "production is unchanged" in err and S3_SECRET_KEY not in err
    assert registry_path.read_bytes() == before


def test_serving_a_production_bento_missing_from_the_store_is_a_clear_error(
    s3_env, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    params_file, registry_path = _workspace_with_remote(tmp_path, s3_env, releases=1)
    monkeypatch.setenv("TEXTGATE_API_KEY", "k")
    before = registry_path.read_bytes()

    code = main(["serve", "--port", "1", "--params", str(params_file)])

    assert code == 2
    assert "bento textgate:gone1 is not in the store" in capsys.readouterr().err
    assert registry_path.read_bytes() == before


@pytest.mark.parametrize(
    ("tag", "url", "key"),
    [
        ("textgate:abc", "s3://bucket/team/x", "team/x/bentos/textgate/abc.bento"),
        ("textgate:abc", "s3://bucket", "bentos/textgate/abc.bento"),
        ("textgate:abc", "s3://bucket/", "bentos/textgate/abc.bento"),
    ],
)
def test_bento_keys_sit_under_the_remote_prefix(tag: str, url: str, key: str) -> None:
    assert Remote("storage", url).bento_key(tag) == key


def test_no_default_remote_means_none(tmp_path: Path) -> None:
    assert remote_tasks.read_remote(_git_dvc_repo(tmp_path / "repo")) is None


def test_a_default_remote_that_is_not_s3_is_refused_by_name(tmp_path: Path) -> None:
    repo = _git_dvc_repo(tmp_path / "repo")
    (repo / ".dvc" / "config").write_text(
        "[core]\n    remote = local\n['remote \"local\"']\n    url = /mnt/dvc-store\n"
    )
    with pytest.raises(RemoteError, match="'local' is /mnt/dvc-store: textgate needs s3://"):
        remote_tasks.read_remote(repo)
