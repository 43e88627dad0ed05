"""No-op benchmark: an unchanged rerun of the whole flow against a bare `dvc repro`, in one run.

On a workspace where the pipeline has run and nothing changed since, it times, `--repeats`
times each and alternating, (1) `textgate run` as a user types it (a fresh process: imports,
a temporary Prefect server, the flow with its DVC stages, gate and artifacts) and (2) a bare
`dvc repro` on the same workspace. It prints both medians, the overhead (flow - DVC) and the
target (overhead <= 10 s), then PASS or FAIL; the last line printed is one JSON object.

    python -m bench.noop                          # builds a throwaway workspace first
    python -m bench.noop --workspace DIR          # an existing workspace, left as it is
    python -m bench.noop --server                 # against a running server, as after `make ui`

By default the workspace is built in a temporary directory the way the flow tests build
theirs: the project's code and params, a stratified subset of the sample data, a tiny
randomly initialised BERT (no download) and a lenient gate, committed to a fresh git repo; a
first `textgate run` trains, packages and promotes (untimed). BentoML and Prefect homes are
temporary too, and `PREFECT_API_URL` is unset, so the flow runs as `make run` does without a
server. With `--workspace`, the workspace must be up to date (`dvc status` clean): the
benchmark never retrains. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from bench.common import log, machine_info
from bench.workspace import LENIENT_GATE, build_tiny_bert, copy_project, merge
from textgate.config import PARAMS_FILE
from textgate.process import ProcessStartError, free_port, start_process, wait_ready

ROOT = Path(__file__).resolve().parents[1]
MAX_OVERHEAD_S = 10.0
SERVER_READY_TIMEOUT_S = 120.0
ROWS_PER_LABEL = 20


def _git(workspace: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-c", "user.email=bench@example.com", "-c", "user.name=bench", *args],
        cwd=workspace,
        check=True,
        capture_output=True,
    )


def build_workspace(root: Path) -> Path:
    """A git + DVC copy of the project on a small data subset and a tiny model (not yet run)."""
    workspace = root / "workspace"
    copy_project(workspace)
    params = yaml.safe_load((ROOT / PARAMS_FILE).read_text(encoding="utf-8"))
    data = params["data"]
    train_file = data["train_file"]
    first = train_file if isinstance(train_file, str) else train_file[0]
    sample = pd.read_csv(ROOT / data["raw_dir"] / first, dtype=str)
    subset = sample.groupby(data["label_column"], group_keys=False).head(ROWS_PER_LABEL)
    (workspace / "data" / "raw").mkdir(parents=True)
    subset.to_csv(workspace / "data" / "raw" / "train.csv", index=False)
    shutil.copy2(ROOT / params["evaluate"]["must_pass_file"], workspace / "data" / "must_pass.csv")
    base = build_tiny_bert(root / "tiny-bert")
    overrides = {
        "data": {"train_file": "train.csv"},
        "validate": {"min_examples_per_class": 5},
        "prepare": {"val_fraction": 0.2, "test_fraction": 0.2},
        "train": {
            "base_model": str(base),
            "epochs": 2,
            "batch_size": 16,
            "max_length": 32,
            "learning_rate": 1.0e-3,
        },
        "evaluate": {"golden_requests": 10, "behaviour_examples": 50},
        "gate": LENIENT_GATE,
    }
    (workspace / PARAMS_FILE).write_text(yaml.safe_dump(merge(params, overrides)))
    _git(workspace, "init", "-q")
    _git(workspace, "add", "-A")
    _git(workspace, "commit", "-qm", "bench workspace")
    return workspace


def bench_env(home: Path) -> dict[str, str]:
    """This interpreter first on PATH; throwaway BentoML and Prefect homes; no Prefect server."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.pop("PREFECT_API_URL", None)
    env.pop("PREFECT_PROFILE", None)
    env.update(
        BENTOML_HOME=str(home / "bentoml"),
        PREFECT_HOME=str(home / "prefect"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        BENTOML_DO_NOT_TRACK="true",
        DO_NOT_TRACK="1",
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
    )
    return env


def timed(command: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, str, int]:
    """Wall seconds, combined output and exit code of one command."""
    started = time.perf_counter()
    completed = subprocess.run(
        command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    return time.perf_counter() - started, completed.stdout, completed.returncode


def flow_command(workspace: Path) -> list[str]:
    return [sys.executable, "-m", "flows.cli", "run", "--params", str(workspace / PARAMS_FILE)]


def dvc_command() -> list[str]:
    return [sys.executable, "-m", "dvc", "repro"]


def _tail(output: str, lines: int = 30) -> str:
    return "\n".join(output.rstrip().splitlines()[-lines:])


def check_up_to_date(workspace: Path, env: dict[str, str]) -> None:
    seconds, output, code = timed([sys.executable, "-m", "dvc", "status"], workspace, env)
    if code != 0 or "up to date" not in output:
        raise SystemExit(
            f"bench: {workspace} is not up to date (dvc status), and the benchmark never "
            f"retrains; run `textgate run` there first:\n{_tail(output)}"
        )


@contextmanager
def running_server(env: dict[str, str], log_path: Path) -> Iterator[str]:
    """`prefect server start` on a free loopback port (the bench's Prefect home); its API URL.

    Its output goes to `log_path`; it is stopped, with its whole process group, on exit.
    """
    port = free_port()
    command = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1"]
    url = f"http://127.0.0.1:{port}/api"
    with start_process(
        [*command, "--port", str(port)],
        env=env,
        log_path=log_path,
        name="`prefect server start`",
    ) as server:
        try:
            wait_ready(server, f"{url}/health", SERVER_READY_TIMEOUT_S)
        except ProcessStartError as error:
            raise SystemExit(f"bench: `prefect server start` did not come up: {error}") from error
        log(f"Prefect server on {url}")
        yield url


def run_benchmark(workspace: Path, env: dict[str, str], repeats: int) -> dict[str, Any]:
    """Alternate unchanged flow reruns and bare `dvc repro`s; every figure in a dict."""
    flow_s: list[float] = []
    dvc_s: list[float] = []
    for index in range(repeats):
        order = ("flow", "dvc") if index % 2 == 0 else ("dvc", "flow")
        for which in order:
            if which == "flow":
                seconds, output, code = timed(flow_command(workspace), workspace, env)
                if code != 0 or "stages ran: none" not in output:
                    raise SystemExit(
                        f"bench: the flow rerun was not a no-op (exit {code}):\n{_tail(output)}"
                    )
                flow_s.append(seconds)
            else:
                seconds, output, code = timed(dvc_command(), workspace, env)
                if code != 0 or "Running stage" in output:
                    raise SystemExit(
                        f"bench: `dvc repro` was not a no-op (exit {code}):\n{_tail(output)}"
                    )
                dvc_s.append(seconds)
            log(f"round {index + 1}/{repeats}: {which} {seconds:.2f} s")
    flow = statistics.median(flow_s)
    dvc = statistics.median(dvc_s)
    overhead = flow - dvc
    return {
        "flow_s": round(flow, 3),
        "dvc_repro_s": round(dvc, 3),
        "overhead_s": round(overhead, 3),
        "flow_runs_s": [round(value, 3) for value in flow_s],
        "dvc_runs_s": [round(value, 3) for value in dvc_s],
        "target": {
            "overhead_s": round(overhead, 3),
            "threshold_s": MAX_OVERHEAD_S,
            "passed": overhead <= MAX_OVERHEAD_S,
        },
        "passed": overhead <= MAX_OVERHEAD_S,
    }


def build_parser() -> argparse.ArgumentParser:
    summary = __doc__.split("\n")[0]
    parser = argparse.ArgumentParser(prog="python -m bench.noop", description=summary)
    parser.add_argument(
        "--workspace", type=Path, default=None, help="an up-to-date workspace (default: build one)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each (default 3)")
    parser.add_argument(
        "--keep", action="store_true", help="keep the built workspace (its path is printed)"
    )
    parser.add_argument(
        "--server",
        action="store_true",
        help="time the runs against a running Prefect server (as after `make ui`) instead of "
        "the temporary server each `textgate run` starts without one",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.repeats < 1:
        raise SystemExit("bench: --repeats must be at least 1")
    home = Path(tempfile.mkdtemp(prefix="textgate-bench-noop-"))
    env = bench_env(home)
    try:
        if args.workspace is None:
            log(f"building a workspace in {home}")
            workspace = build_workspace(home)
            log("first run (trains, packages, promotes; untimed)")
            seconds, output, code = timed(flow_command(workspace), workspace, env)
            if code != 0:
                raise SystemExit(f"bench: the first run failed (exit {code}):\n{_tail(output)}")
            log(f"first run took {seconds:.1f} s")
        else:
            workspace = args.workspace.resolve()
            # An existing workspace keeps its own stores: its production bento lives there.
            for name in ("BENTOML_HOME", "PREFECT_HOME"):
                if name in os.environ:
                    env[name] = os.environ[name]
                else:
                    env.pop(name)
        check_up_to_date(workspace, env)
        machine = machine_info("prefect", "dvc")
        if args.server:
            with running_server(env, home / "prefect-server.log") as url:
                result = run_benchmark(workspace, {**env, "PREFECT_API_URL": url}, args.repeats)
        else:
            result = run_benchmark(workspace, env, args.repeats)
    finally:
        if args.keep:
            log(f"kept {home}")
        else:
            shutil.rmtree(home, ignore_errors=True)
    report = {
        **result,
        "prefect_server": "running (prefect server start)" if args.server else "temporary per run",
        "workspace": "built" if args.workspace is None else str(args.workspace),
        "repeats": args.repeats,
        "machine": machine,
    }
    mark = "PASS" if result["passed"] else "FAIL"
    print(f"unchanged flow rerun (textgate run): {result['flow_s']:8.2f} s (median)")
    print(f"bare dvc repro:                      {result['dvc_repro_s']:8.2f} s (median)")
    print(f"overhead (flow - dvc):               {result['overhead_s']:8.2f} s")
    print(f"Prefect server:                      {report['prefect_server']}")
    print(f"target: overhead <= {MAX_OVERHEAD_S:.0f} s: {mark}")
    print(json.dumps(report), flush=True)
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
