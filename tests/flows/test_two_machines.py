"""Two machines on one host, sharing only an S3 server and a PostgreSQL.

The team's repository (git, with a DVC remote in .dvc/config and its raw data pushed there)
is cloned twice. Each clone is a machine of its own: its own HOME, BENTOML_HOME and
PREFECT_HOME, and no folder in common; what they share is the moto S3 server (data, bentos)
and the PostgreSQL registry (TEXTGATE_REGISTRY). A trains and promotes from a fresh clone;
B serves production (imported from S3) while A's folder is moved away; both promote at
once; B rolls back and A sees it. The log of who did what is printed at the end.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.flows.conftest import git, make_workspace
from tests.shared_state import fresh_database
from textgate.process import free_port, start_process, wait_ready
from textgate.registry import Registry

pytestmark = [pytest.mark.slow, pytest.mark.two_machines]

RUN_TIMEOUT_S = 900
COMMAND_TIMEOUT_S = 300
TIMINGS = re.compile(
    r"(dvc (?:pull|push): [\d.]+ s|(?:exported|imported) bento \S+ .* in [\d.]+ s)"
)


@dataclass
class Machine:
    """One machine: a clone and the environment its commands run in."""

    name: str
    root: Path
    env: dict[str, str]
    log: list[str] = field(default_factory=list)


class Journal:
    """Who did what, in what order, with the wall-clock offset since the test began."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.lines: list[str] = []

    def say(self, who: str, what: str) -> None:
        line = f"[{time.monotonic() - self.started:7.1f} s] {who}: {what}"
        self.lines.append(line)
        print(line, flush=True)


def team_repository(root: Path, base_model: Path, bucket: str, endpoint: str, env) -> Path:
    """The upstream repository: the project, its raw data tracked by DVC and pushed."""
    upstream = make_workspace(
        root,
        base_model,
        per_class=20,
        overrides={
            "train": {"epochs": 2, "learning_rate": 1.0e-3},
            "evaluate": {"golden_requests": 5, "behaviour_examples": 20},
            "notify": {"block": None},
        },
    )
    run = {"cwd": upstream, "env": env, "check": True, "capture_output": True}
    subprocess.run([sys.executable, "-m", "flows.cli", "remote", "add", f"s3://{bucket}/team",
                    "--endpoint-url", endpoint], **run)  # fmt: skip
    git(upstream, "rm", "-r", "-q", "--cached", "data/raw")
    subprocess.run([sys.executable, "-m", "dvc", "add", "-q", "data/raw"], **run)
    subprocess.run([sys.executable, "-m", "dvc", "push", "-q"], **run)
    git(upstream, "add", "-A")
    git(upstream, "-c", "user.email=t@example.com", "-c", "user.name=t", "commit", "-qm", "team")
    return upstream


def clone(upstream: Path, root: Path, name: str, shared_env: dict[str, str]) -> Machine:
    """A fresh clone with a home, a BentoML store and a Prefect home of its own."""
    subprocess.run(["git", "clone", "-q", str(upstream), str(root / "repo")], check=True)
    for folder in ("home", "bentoml", "prefect"):
        (root / folder).mkdir()
    env = {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "HOME": str(root / "home"),
        "BENTOML_HOME": str(root / "bentoml"),
        "PREFECT_HOME": str(root / "prefect"),
        "PREFECT_API_URL": "",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "BENTOML_DO_NOT_TRACK": "True",
        "DO_NOT_TRACK": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": str(root / "repo"),
        **shared_env,
    }
    return Machine(name, root / "repo", env)


def textgate(machine: Machine, *args: str, timeout: float = COMMAND_TIMEOUT_S) -> str:
    """`textgate <args>` on `machine`; its output (the test fails if it fails)."""
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", *args],
        cwd=machine.root,
        env=machine.env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    output = done.stdout + done.stderr
    machine.log += TIMINGS.findall(output)
    assert done.returncode == 0, f"{machine.name}: textgate {' '.join(args)}:\n{output[-6000:]}"
    return output


PACKAGE_AGAIN = """
import sys
from tasks.package import package_model
from tasks.remote import export_if_remote
from textgate.config import load_params, resolve_paths
from pathlib import Path
root = Path.cwd()
params = resolve_paths(load_params(root / "params.yaml"), root)
packaged = package_model(params.train.output_dir / "model", params=params,
                         metrics={"accuracy": 0.5}, lineage={"run": sys.argv[1]}, build_ctx=root)
export_if_remote(root, packaged.bento_tag, print)
print("BENTO", packaged.bento_tag)
"""


def package_again(machine: Machine, label: str) -> str:
    """Package A's trained model as one more bento and export it (a second candidate)."""
    done = subprocess.run(
        [sys.executable, "-c", PACKAGE_AGAIN, label],
        cwd=machine.root,
        env=machine.env,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_S,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    machine.log += TIMINGS.findall(done.stdout)
    return re.search(r"^BENTO (\S+)$", done.stdout, re.M).group(1)


def test_two_machines_share_data_bentos_and_the_registry(
    tmp_path, tiny_base_model, s3_env, postgres_server, capsys
):
    server, bucket = s3_env
    journal = Journal()
    database = fresh_database(postgres_server)
    shared = {**server.env(), "TEXTGATE_REGISTRY": database}
    journal.say("setup", f"S3 at {server.endpoint} (bucket {bucket}); PostgreSQL registry")
    upstream = team_repository(
        tmp_path / "upstream", tiny_base_model, bucket, server.endpoint, {**os.environ, **shared}
    )
    journal.say("setup", "team repository: DVC remote in .dvc/config, data/raw pushed to S3")
    a = clone(upstream, tmp_path / "machine-a", "A", shared)
    b = clone(upstream, tmp_path / "machine-b", "B", shared)
    assert not (a.root / "data" / "raw" / "train.csv").exists()  # only in the remote

    _a_trains_and_promotes(a, journal)
    first = Registry("/nonexistent", url=database).production()
    bento_a = package_again(a, "A-second")
    bento_b = package_again(a, "B-candidate")
    journal.say("A", f"packaged and exported two more bentos: {bento_a}, {bento_b}")

    _b_serves_production(b, a, first.bento_tag, journal, tmp_path)
    _both_promote_at_once(a, b, bento_a, bento_b, journal)
    history = Registry("/nonexistent", url=database).history()
    assert [r.bento_tag for r in history[:1]] == [first.bento_tag]
    assert sorted(r.bento_tag for r in history[1:]) == sorted([bento_a, bento_b])
    journal.say("registry", "order: " + ", ".join(f"{r.bento_tag} ({r.reason})" for r in history))

    textgate(b, "rollback", "--reason", "B rolls back")
    journal.say("B", "textgate rollback --reason 'B rolls back'")
    status = json.loads(textgate(a, "status", "--json"))
    assert status["production"]["action"] == "rollback"
    assert status["production"]["reason"] == "B rolls back"
    assert status["production"]["bento_tag"] == history[1].bento_tag
    assert len(status["history"]) == 4
    journal.say(
        "A", f"textgate status: production {status['production']['bento_tag']} (rollback by B)"
    )
    for machine in (a, b):
        for timing in machine.log:
            journal.say(machine.name, f"timing: {timing}")
    with capsys.disabled():
        print("\n--- two-machine log ---\n" + "\n".join(journal.lines))
    (tmp_path / "two_machines.log").write_text("\n".join(journal.lines) + "\n")
    destination = os.environ.get("TEXTGATE_TWO_MACHINES_LOG")
    if destination:
        shutil.copy(tmp_path / "two_machines.log", destination)


def _a_trains_and_promotes(a: Machine, journal: Journal) -> None:
    journal.say("A", "textgate run (fresh clone: dvc pull, train, gate, package, export, promote)")
    output = textgate(a, "run", timeout=RUN_TIMEOUT_S)
    assert (a.root / "data" / "raw" / "train.csv").exists()  # pulled
    assert "pipeline Completed" in output, output[-4000:]
    assert any(line.startswith("dvc pull") for line in a.log)
    assert any(line.startswith("exported bento") for line in a.log)
    assert any(line.startswith("dvc push") for line in a.log)
    journal.say("A", "run completed: " + "; ".join(a.log))


def _b_serves_production(b: Machine, a: Machine, tag: str, journal, tmp_path: Path) -> None:
    """B serves production with A's folder moved away: nothing of A's is on B's paths."""
    hidden = a.root.parent.with_name(a.root.parent.name + "-away")
    a.root.parent.rename(hidden)
    try:
        port = free_port()
        journal.say("B", f"textgate serve (production {tag}; local store empty; A's folder away)")
        command = [sys.executable, "-m", "flows.cli", "serve", "--port", str(port)]
        log = tmp_path / "b-serve.log"
        with start_process(command, env=b.env, cwd=b.root, log_path=log, name="B serve") as proc:
            wait_ready(proc, f"http://127.0.0.1:{port}/readyz", timeout_s=180)
            response = httpx.post(
                f"http://127.0.0.1:{port}/classify", json={"texts": ["refund please"]}, timeout=30
            )
        assert response.status_code == 200, response.text
        b.log += TIMINGS.findall(log.read_text())
        assert any(line.startswith(f"imported bento {tag}") for line in b.log), log.read_text()
        journal.say("B", f"answered /classify: {response.json()[0]['label']}")
    finally:
        hidden.rename(a.root.parent)


def _both_promote_at_once(a: Machine, b: Machine, bento_a: str, bento_b: str, journal) -> None:
    journal.say("A+B", f"promote at the same moment: A {bento_a}, B {bento_b}")
    processes = {
        machine.name: subprocess.Popen(
            [
                sys.executable,
                "-m",
                "flows.cli",
                "promote",
                tag,
                "--reason",
                f"{machine.name} promotes",
            ],
            cwd=machine.root,
            env=machine.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for machine, tag in ((a, bento_a), (b, bento_b))
    }
    for name, process in processes.items():
        output, _ = process.communicate(timeout=COMMAND_TIMEOUT_S)
        assert process.returncode == 0, f"{name}: {output[-4000:]}"
        (a if name == "A" else b).log += TIMINGS.findall(output)
        journal.say(name, "promote done: " + output.strip().splitlines()[-1])
