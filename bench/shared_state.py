"""The sample's shared-state transfers: `dvc push`/`pull` and bento export/import through S3,
against copying the same bytes on the local disk (the baseline), in the same run.

    python -m bench.shared_state            # clones this repository's HEAD, runs the sample

A moto S3 server and a PostgreSQL registry start on loopback. Machine A, a fresh clone with
`textgate remote add`, runs the whole pipeline on the embedded sample (`textgate run`: its
log gives `dvc pull`, the bento export and `dvc push`). Machine B, another fresh clone with
its own HOME and BentoML store, then times `dvc pull` (every output of the run) and the
import of production's bento. The baseline copies A's DVC cache and the bento archive on the
local disk. Loopback S3 has no network latency: a real bucket is slower.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import json_line, log, machine_info
from bench.registry import S3_KEYS
from textgate import pglocal
from textgate.process import free_port, start_process, wait_ready

ROOT = Path(__file__).resolve().parents[1]
TIMING = re.compile(r"(dvc pull|dvc push|exported bento \S+ to \S+ in):? ([\d.]+) s")


def machine(work: Path, name: str, shared: dict[str, str]) -> tuple[Path, dict[str, str]]:
    """A fresh clone of this repository's HEAD with a home and stores of its own."""
    root = work / name
    subprocess.run(["git", "clone", "-q", str(ROOT), str(root / "repo")], check=True)
    for folder in ("home", "bentoml", "prefect"):
        (root / folder).mkdir()
    env = {
        **os.environ,
        "HOME": str(root / "home"),
        "BENTOML_HOME": str(root / "bentoml"),
        "PREFECT_HOME": str(root / "prefect"),
        "PREFECT_API_URL": "",
        "PYTHONPATH": str(root / "repo"),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        **shared,
    }
    return root / "repo", env


def timed(command: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{(done.stdout + done.stderr)[-4000:]}")
    return elapsed, done.stdout + done.stderr


def size_mb(path: Path) -> float:
    return sum(item.stat().st_size for item in path.rglob("*") if item.is_file()) / 1e6


PRODUCTION = (
    "from textgate.registry import Registry; "
    "print('TAG', Registry('.textgate/registry.json').production().bento_tag)"
)
IMPORT = (
    "import sys; from tasks.remote import read_remote, import_bento; from pathlib import Path; "
)
IMPORT += "print('SECONDS', import_bento(read_remote(Path.cwd()), sys.argv[1]))"
EXPORT_LOCAL = "import sys, bentoml; bentoml.export_bento(sys.argv[1], sys.argv[2])"


def run(work: Path, endpoint: str, registry_url: str) -> dict[str, Any]:
    shared = {
        "AWS_ACCESS_KEY_ID": S3_KEYS["aws_access_key_id"],
        "AWS_SECRET_ACCESS_KEY": S3_KEYS["aws_secret_access_key"],
        "AWS_DEFAULT_REGION": "us-east-1",
        "TEXTGATE_REGISTRY": registry_url,
    }
    a, env_a = machine(work, "a", shared)
    timed([sys.executable, "-m", "flows.cli", "remote", "add", "s3://bench/sample",
           "--endpoint-url", endpoint], a, env_a)  # fmt: skip
    log("A: textgate run on the sample (trains the model)")
    run_s, output = timed([sys.executable, "-m", "flows.cli", "run"], a, env_a)
    figures: dict[str, Any] = {"run_s": run_s}
    for what, seconds in TIMING.findall(output):
        figures["a_" + what.split(" ")[0] + "_" + what.split(" ")[1] + "_s"] = float(seconds)
    figures["dvc_cache_mb"] = size_mb(a / ".dvc" / "cache")
    b, env_b = machine(work, "b", shared)
    # What `git pull` of A's commit would bring: the remote in .dvc/config and the run's dvc.lock.
    shutil.copy(a / ".dvc" / "config", b / ".dvc" / "config")
    shutil.copy(a / "dvc.lock", b / "dvc.lock")
    log("B: dvc pull, bento import")
    figures["b_dvc_pull_s"], _ = timed([sys.executable, "-m", "dvc", "pull"], b, env_b)
    _, tag = timed([sys.executable, "-c", PRODUCTION], b, env_b)
    tag = re.search(r"^TAG (\S+)$", tag, re.M).group(1)
    _, seconds = timed([sys.executable, "-c", IMPORT, tag], b, env_b)
    figures["b_bento_import_s"] = float(re.search(r"^SECONDS (\S+)$", seconds, re.M).group(1))
    archive = work / "local.bento"
    figures["local_export_s"], _ = timed([sys.executable, "-c", EXPORT_LOCAL, tag, str(archive)],
                                         a, env_a)  # fmt: skip
    figures["bento_mb"] = archive.stat().st_size / 1e6
    started = time.perf_counter()
    shutil.copytree(a / ".dvc" / "cache", work / "cache-copy")
    shutil.copy(archive, work / "bento-copy.bento")
    figures["baseline_local_copy_s"] = time.perf_counter() - started
    figures["bento_tag"] = tag
    return figures


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="bench-shared-state-"))
    pg_root = Path(tempfile.mkdtemp(prefix="bench-shared-pg-", dir="/tmp"))
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    moto = start_process([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                         log_path=work / "moto.log", name="moto")  # fmt: skip
    try:
        with moto:
            wait_ready(moto, f"{endpoint}/moto-api/", timeout_s=60)
            import boto3

            boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", **S3_KEYS)\
                .create_bucket(Bucket="bench")  # fmt: skip
            server = pglocal.start(pg_root)
            figures = run(work, endpoint, server.url)
    finally:
        pglocal.stop(pg_root)
        shutil.rmtree(pg_root, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    transfers = figures["a_dvc_push_s"] + figures["b_dvc_pull_s"] + figures["b_bento_import_s"]
    for key, value in figures.items():
        print(f"{key:>24}: {value:.2f}" if isinstance(value, float) else f"{key:>24}: {value}")
    print(
        f"push + pull + import {transfers:.1f} s vs copying the same bytes locally "
        f"{figures['baseline_local_copy_s']:.2f} s: "
        f"x{transfers / figures['baseline_local_copy_s']:.1f}"
    )
    print(json_line({**figures, "machine": machine_info("dvc", "bentoml", "moto")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
