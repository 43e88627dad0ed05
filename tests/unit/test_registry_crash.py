"""A real `kill -9` in the middle of promotions never leaves a registry that is lost or torn.

A writer process promotes releases 0, 1, 2, ... in a tight loop, each with a large payload
so that much of its time is spent writing; the test kills it with SIGKILL, either after a
random delay or the moment its temporary file appears (mid-write), then reads the file.

Importing textgate takes most of a second, so one helper process imports it once and forks
a fresh writer for each kill: every writer is still a separate process killed outright.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from textgate.registry import Registry, Release

REPO_ROOT = Path(__file__).resolve().parents[2]
KILLS = 20
BLOB = 256 * 1024  # characters of payload per release

# Reads "REGISTRY PROGRESS" lines; for each forks a writer that promotes into REGISTRY and
# appends the number of each promotion that returned to PROGRESS. Prints the writer's pid,
# then, once it has died, how (a negative number is the signal that killed it).
HELPER = """
import os, sys
from textgate.registry import Registry, Release

blob = "x" * int(sys.argv[1])
print("ready", flush=True)
for line in sys.stdin:
    path, progress = line.split()
    pid = os.fork()
    if pid == 0:
        try:
            registry = Registry(path)
            out = os.open(progress, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            n = 0
            while True:
                registry.promote(
                    Release.create(
                        bento_tag=f"textgate:v{n}",
                        model_tag=f"textgate-classifier:m{n}",
                        reason=f"release {n}",
                        metrics={"n": n, "blob": blob},
                        actor="crash@test",
                    )
                )
                os.write(out, f"{n}\\n".encode())
                n += 1
        finally:
            os._exit(1)  # only if a promotion raised: never back into the loop above
    print(pid, flush=True)
    _, status = os.waitpid(pid, 0)
    print(-os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status), flush=True)
"""


@pytest.fixture
def helper():
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    process = subprocess.Popen(
        [sys.executable, "-c", HELPER, str(BLOB)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO_ROOT,
    )
    assert process.stdout is not None
    assert process.stdout.readline() == "ready\n"
    yield process
    process.kill()
    process.communicate(timeout=10)


def start_writer(helper: subprocess.Popen[str], path: Path, progress: Path) -> int:
    assert helper.stdin is not None and helper.stdout is not None
    helper.stdin.write(f"{path} {progress}\n")
    helper.stdin.flush()
    return int(helper.stdout.readline())


def wait_for_a_temporary(directory: Path, deadline: float) -> None:
    """Return as soon as a writer's temporary file exists (it is mid-write), or at deadline."""
    while time.monotonic() < deadline:
        if any(name.endswith(".tmp") for name in os.listdir(directory)):
            return


def test_kill_9_during_promotions_leaves_a_whole_prefix_of_the_history(
    tmp_path: Path, helper: subprocess.Popen[str]
) -> None:
    assert helper.stdout is not None
    rng = random.Random(20260101)
    killed_mid_write = 0
    for attempt in range(KILLS):
        path = tmp_path / f"kill-{attempt}" / "registry.json"
        path.parent.mkdir()
        progress = tmp_path / f"progress-{attempt}"
        pid = start_writer(helper, path, progress)
        if attempt % 2:
            # Let a few promotions finish, then kill the moment the next one is writing.
            time.sleep(rng.uniform(0, 0.05))
            wait_for_a_temporary(path.parent, time.monotonic() + 2)
        else:
            time.sleep(rng.uniform(0, 0.08))
        os.kill(pid, signal.SIGKILL)
        assert int(helper.stdout.readline()) == -signal.SIGKILL, f"kill {attempt}"
        returned = progress.read_text().split() if progress.exists() else []

        killed_mid_write += any(entry.name.endswith(".tmp") for entry in path.parent.iterdir())
        if not path.exists():
            assert returned == [], f"kill {attempt}: promotions returned but there is no file"
            continue
        history = Registry(path).history()  # loads: never half-written
        assert [release.bento_tag for release in history] == [
            f"textgate:v{n}" for n in range(len(history))
        ], f"kill {attempt}: releases missing or out of order"
        for n, release in enumerate(history):
            assert release.metrics == {"n": n, "blob": "x" * BLOB}, f"kill {attempt}"
        # Every promotion that returned is in the file; at most the one in flight is extra.
        assert returned == [str(n) for n in range(len(returned))]
        assert len(returned) <= len(history) <= len(returned) + 1, f"kill {attempt}"

        # The killed writer's lock died with it, and the next write removes its temporary.
        Registry(path).promote(
            Release.create(bento_tag="textgate:after", model_tag="m:after", reason="after")
        )
        assert [entry.name for entry in path.parent.iterdir()] == ["registry.json"]
        assert len(Registry(path).history()) == len(history) + 1

    # Otherwise the test would not have exercised what it is for.
    assert killed_mid_write > 0
