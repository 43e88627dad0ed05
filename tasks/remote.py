"""Shared object storage: the DVC remote, and the bentos exported next to its data.

`textgate remote add s3://bucket/prefix [--endpoint-url URL]` makes `storage` the default
DVC remote in .dvc/config (a file to commit: every clone then knows it). With a remote set,
the pipeline checks it answers and `dvc pull`s before any stage runs, `dvc push`es after a
successful run, and exports each packaged bento (with its model) to
`s3://bucket/prefix/bentos/<name>/<version>.bento` before it is promoted; `textgate serve`
and rollbacks import production from there when the local BentoML store lacks it.

Credentials come from the usual AWS sources (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a
profile, an instance role), read by DVC and boto3 themselves: textgate never writes, prints
or logs them.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from textgate.errors import TextgateError

REMOTE_NAME = "storage"
BENTOS_FOLDER = "bentos"
# A store that does not answer in this time is reported as unreachable, before training.
CONNECT_TIMEOUT_S = 10
DVC_TIMEOUT_S = 3600


class RemoteError(TextgateError):
    """The remote is misconfigured, unreachable, or lacks what was asked for."""


@dataclass(frozen=True)
class Remote:
    """The default DVC remote: an `s3://bucket/prefix` URL and its endpoint (None: AWS)."""

    name: str
    url: str
    endpoint_url: str | None = None

    @property
    def bucket(self) -> str:
        return self.url.removeprefix("s3://").split("/", 1)[0]

    @property
    def prefix(self) -> str:
        parts = self.url.removeprefix("s3://").split("/", 1)
        return parts[1].strip("/") if len(parts) > 1 else ""

    def bento_key(self, tag: str) -> str:
        """The object key of bento `name:version` in the store."""
        name, _, version = tag.partition(":")
        return "/".join(p for p in (self.prefix, BENTOS_FOLDER, name, f"{version}.bento") if p)

    def describe(self) -> str:
        where = f" at {self.endpoint_url}" if self.endpoint_url else ""
        return f"DVC remote {self.name!r} ({self.url}{where})"


def _dvc(root: Path, *args: str, timeout: float = DVC_TIMEOUT_S) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dvc", *args],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def add_remote(root: Path, url: str, endpoint_url: str | None = None) -> Remote:
    """Make `url` the default DVC remote `storage` in `root`/.dvc/config (replacing it).

    Raises:
        RemoteError: the URL is not `s3://bucket[/prefix]`, or DVC refused it.
    """
    if not url.startswith("s3://") or not url.removeprefix("s3://").split("/", 1)[0]:
        raise RemoteError(f"expected an s3://bucket/prefix URL, got {url!r}")
    if endpoint_url is not None and not endpoint_url.startswith(("http://", "https://")):
        raise RemoteError(f"--endpoint-url must be an http(s) URL, got {endpoint_url!r}")
    steps = [("remote", "add", "--default", "--force", REMOTE_NAME, url)]
    if endpoint_url:
        steps.append(("remote", "modify", REMOTE_NAME, "endpointurl", endpoint_url))
    else:
        steps.append(("remote", "modify", "--unset", REMOTE_NAME, "endpointurl"))
    for step in steps:
        done = _dvc(root, *step, timeout=120)
        if done.returncode != 0:
            raise RemoteError(f"`dvc {' '.join(step)}` failed: {done.stderr.strip()}")
    return Remote(REMOTE_NAME, url, endpoint_url)


def read_remote(root: Path) -> Remote | None:
    """The default DVC remote of the workspace `root`, or None when none is set."""
    from dvc.config import Config, ConfigError

    try:
        config = Config(dvc_dir=str(root / ".dvc"))
    except ConfigError as error:
        raise RemoteError(f"{root / '.dvc' / 'config'} cannot be read: {error}") from None
    name = config["core"].get("remote")
    if not name:
        return None
    section = config["remote"].get(name)
    if section is None:
        raise RemoteError(
            f"core.remote is {name!r} but .dvc/config has no such remote: `textgate remote "
            "add s3://bucket/prefix` sets one"
        )
    url = str(section["url"])
    if not url.startswith("s3://"):
        raise RemoteError(f"the default DVC remote {name!r} is {url}: textgate needs s3://")
    return Remote(name, url, section.get("endpointurl"))


def s3_client(remote: Remote) -> Any:
    """A boto3 S3 client for the remote's endpoint, with short timeouts and few retries."""
    import boto3
    from botocore.config import Config as BotoConfig

    config = BotoConfig(
        connect_timeout=CONNECT_TIMEOUT_S,
        read_timeout=60,
        retries={"max_attempts": 2, "mode": "standard"},
    )
    return boto3.client("s3", endpoint_url=remote.endpoint_url, config=config)


def check_remote(remote: Remote) -> None:
    """Fail with the remote's name and URL unless its bucket answers.

    Raises:
        RemoteError: the endpoint does not answer, the bucket is missing or access is denied.
    """
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        s3_client(remote).head_bucket(Bucket=remote.bucket)
    except ClientError as error:
        code = error.response.get("Error", {}).get("Code", "?")
        raise RemoteError(
            f"{remote.describe()} refused access to bucket {remote.bucket!r} (S3 error {code}): "
            "check the bucket exists and AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or the AWS "
            "profile) may use it"
        ) from None
    except BotoCoreError as error:
        raise RemoteError(
            f"{remote.describe()} cannot be reached: {error}; start the store, fix the URL "
            "with `textgate remote add`, or remove it with `dvc remote default --unset`"
        ) from None


def sync(root: Path, action: str, log: Callable[[str], None]) -> float:
    """`dvc pull --allow-missing` or `dvc push`; the seconds it took.

    `pull` fetches every output dvc.lock names that the remote has (a first run has none:
    the stages then build them); `push` uploads every output in the local cache.

    Raises:
        RemoteError: DVC failed (its last lines say why).
    """
    started = time.perf_counter()
    arguments = ("pull", "--allow-missing") if action == "pull" else ("push",)
    done = _dvc(root, *arguments)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-8:])
        raise RemoteError(f"`dvc {' '.join(arguments)}` failed after {elapsed:.1f} s:\n{tail}")
    log(f"dvc {action}: {elapsed:.1f} s")
    return elapsed


def export_bento(remote: Remote, tag: str) -> float:
    """Export bento `tag` (with its models) to the store; the seconds it took.

    Raises:
        RemoteError: the export or the upload failed.
    """
    import bentoml
    from botocore.exceptions import BotoCoreError, ClientError

    started = time.perf_counter()
    key = remote.bento_key(tag)
    with tempfile.TemporaryDirectory(prefix="textgate-bento-") as work:
        archive = Path(work) / "bento.bento"
        bentoml.export_bento(tag, str(archive))
        try:
            s3_client(remote).upload_file(str(archive), remote.bucket, key)
        except (BotoCoreError, ClientError) as error:
            raise RemoteError(
                f"uploading bento {tag} to s3://{remote.bucket}/{key} failed: {error}"
            ) from None
    return time.perf_counter() - started


def import_bento(remote: Remote, tag: str) -> float:
    """Import bento `tag` (with its models) from the store into the local one; seconds taken.

    Raises:
        RemoteError: the store has no such bento, or the download or import failed.
    """
    import bentoml
    from botocore.exceptions import BotoCoreError, ClientError

    started = time.perf_counter()
    key = remote.bento_key(tag)
    with tempfile.TemporaryDirectory(prefix="textgate-bento-") as work:
        archive = Path(work) / "bento.bento"
        try:
            s3_client(remote).download_file(remote.bucket, key, str(archive))
        except ClientError as error:
            code = error.response.get("Error", {}).get("Code", "?")
            missing = code in ("404", "NoSuchKey", "NotFound")
            problem = "is not in the store" if missing else f"cannot be downloaded ({code})"
            raise RemoteError(
                f"bento {tag} {problem}: s3://{remote.bucket}/{key} ({remote.describe()})"
            ) from None
        except BotoCoreError as error:
            raise RemoteError(f"{remote.describe()} cannot be reached: {error}") from None
        bentoml.import_bento(str(archive))
    return time.perf_counter() - started


def ensure_local_bento(root: Path, tag: str, log: Callable[[str], None]) -> bool:
    """Import `tag` from the store when the local BentoML store lacks it; True if imported.

    Without a remote, nothing happens (the caller's own check reports the missing bento).

    Raises:
        RemoteError: the remote is set but the bento cannot be imported from it.
    """
    from bentoml.exceptions import NotFound

    from tasks.package import local_bento

    try:
        local_bento(tag)
        return False
    except NotFound:
        pass
    remote = read_remote(root)
    if remote is None:
        return False
    elapsed = import_bento(remote, tag)
    log(
        f"imported bento {tag} from s3://{remote.bucket}/{remote.bento_key(tag)} in {elapsed:.1f} s"
    )
    return True


def prepare_run(root: Path, registry_path: Path, log: Callable[[str], None]) -> Remote | None:
    """Before any stage: the registry answers; with a DVC remote, it answers and data is
    pulled. The remote (None without one) is returned for the push after the run.

    Raises:
        RegistryError: the registry (file or database) cannot be read.
        RemoteError: the remote does not answer, or the pull failed.
    """
    from textgate.registry import Registry

    registry = Registry(registry_path)
    registry.load()
    log(f"registry: {registry.location}")
    remote = read_remote(root)
    if remote is None:
        log("no DVC remote: data and bentos stay on this machine (`textgate remote add`)")
        return None
    check_remote(remote)
    sync(root, "pull", log)
    return remote


def export_if_remote(root: Path, tag: str, log: Callable[[str], None]) -> None:
    """Export bento `tag` to the default remote's store, if the workspace has a remote."""
    remote = read_remote(root)
    if remote is None:
        return
    elapsed = export_bento(remote, tag)
    log(f"exported bento {tag} to s3://{remote.bucket}/{remote.bento_key(tag)} in {elapsed:.1f} s")
