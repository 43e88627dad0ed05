"""`textgate` command line: run the pipeline, show and change the production model, serve it;
deploy the pipeline and the drift monitor to a Prefect server, run them, set up alerts."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from flows.processes import stop_on_signals
from textgate.artifacts import verdict_outputs
from textgate.config import PARAMS_FILE, Params, api_key_from_env, load_params
from textgate.errors import TextgateError
from textgate.registry import Registry, Release
from textgate.requestlog import BACKUPS_ENV, MAX_BYTES_ENV


def _registry(params_path: str) -> tuple[Params, Registry]:
    """The params, with the registry path resolved against the params file's directory."""
    params = load_params(params_path)
    base = Path(params_path).resolve().parent
    path = base / params.registry.path
    verdicts = params.registry.verdicts_dir
    registry_config = params.registry.model_copy(
        update={"path": path, "verdicts_dir": base / verdicts if verdicts else None}
    )
    return params.model_copy(update={"registry": registry_config}), Registry(path)


def _reason(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be blank: say why, for the history")
    return text.strip()


def _label(release: Release | None) -> str:
    if release is None:
        return "(none)"
    return f"{release.bento_tag} (model {release.model_tag}, {release.action})"


def _last_verdict(params: Params) -> dict[str, Any] | None:
    """The pipeline's latest gate verdict, or None if there is none or it cannot be read.

    A bad file only warns (on stderr): status must still show production.
    """
    path = verdict_outputs(params.registry).latest
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        problem = f"cannot be read: {error}"
    else:
        problem = _verdict_problem(payload)
        if problem is None:
            return payload
    print(f"textgate: warning: ignoring the last gate verdict {path}: {problem}", file=sys.stderr)
    return None


def _verdict_problem(payload: Any) -> str | None:
    """What is wrong with the shape of a verdict, or None if it can be shown."""
    if not isinstance(payload, dict):
        return f"expected a JSON object, got {type(payload).__name__}"
    if not isinstance(payload.get("passed"), bool):
        return "'passed' is missing or not true/false"
    checks = payload.get("checks")
    if not isinstance(checks, list):
        return "'checks' is missing or not a list"
    for index, check in enumerate(checks):
        if not (
            isinstance(check, dict)
            and isinstance(check.get("name"), str)
            and isinstance(check.get("passed"), bool)
            and isinstance(check.get("reason", ""), str)
        ):
            return f"checks[{index}] needs a string 'name', true/false 'passed', string 'reason'"
    return None


def _print_verdict(verdict: dict[str, Any]) -> None:
    print(f"last gate verdict: {'PASSED' if verdict['passed'] else 'FAILED'}")
    for check in verdict["checks"]:
        mark = "pass" if check["passed"] else "FAIL"
        print(f"  [{mark}] {check['name']}: {check.get('reason', '')}".rstrip())


def cmd_run(args: argparse.Namespace) -> int:
    """Run the pipeline flow; exit 1 if validation, a stage or the gate fails."""
    params = load_params(args.params)  # fail fast, before Prefect starts, on a bad params file
    source = Path(args.params).resolve()
    from flows.server import early_server, use_server

    # Without a configured server, a temporary one boots while Prefect and the pipeline are
    # imported (see flows/server.py).
    server = early_server()
    try:
        from flows.server import check_approval_possible

        check_approval_possible(params)
        root = _run_root(source)
        _check_server()
    except BaseException:
        if server is not None:
            server.stop()
        raise
    from flows.pipeline import pipeline

    target = root / PARAMS_FILE
    before = target.read_bytes() if target.is_file() else None
    with use_server(server):
        state = pipeline(
            params_path=source.name if source.parent == root else str(source),
            repo_dir=str(root),
            return_state=True,
        )
    if before is not None and target.is_file() and target.read_bytes() != before:
        print(
            f"{target} now holds this run's parameters, from {source} "
            f"(`git diff {PARAMS_FILE}` shows them)"
        )
    print(f"\npipeline {state.name}: {state.message or ''}".rstrip())
    if state.is_failed() or state.is_crashed():
        return 1
    return 0


def _run_root(source: Path) -> Path:
    """The workspace a run uses: the params file's directory if it holds dvc.yaml (the file
    is that workspace's own), else the current directory (the file lies elsewhere)."""
    for root in (source.parent, Path.cwd().resolve()):
        if (root / "dvc.yaml").is_file():
            return root
    raise TextgateError(
        f"no dvc.yaml next to {source} nor in the current directory {Path.cwd()}: run "
        "textgate in the project's directory"
    )


def _check_server(command: str | None = None) -> None:
    """Fail early, with what to do, when the configured Prefect server does not answer.

    Args:
        command: a command that needs a server; without one configured it is an error.
    """
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        if command is None:
            return  # each run starts a temporary server
        raise TextgateError(
            f"`textgate {command}` needs a Prefect server: start one with `make ui` (it points "
            "the `textgate` Prefect profile at it), or set PREFECT_API_URL"
        )
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        problem = client.api_healthcheck()
    if problem is not None:
        raise TextgateError(
            f"the Prefect server at PREFECT_API_URL={url} does not answer ({problem}): start it "
            "with `make ui`, or run without a server (unset PREFECT_API_URL, or `prefect "
            "profile use ephemeral` if a profile sets it)"
        )


def _workspace(params_path: str) -> tuple[Params, Path, str]:
    """The params, the workspace (the params file's directory) and the file's name in it."""
    path = Path(params_path).resolve()
    return load_params(path), path.parent, path.name


def cmd_deploy(args: argparse.Namespace) -> int:
    """Register the pipeline (on its cron) and the drift monitor (on its interval) with the
    Prefect server, in the work pool deploy.work_pool (created if missing)."""
    params, root, name = _workspace(args.params)
    _check_server("deploy")
    from flows.deploy import deploy_all, ensure_work_pool
    from flows.lock import ensure_concurrency_limit

    pool = params.deploy.work_pool
    if ensure_work_pool(pool):
        print(f"created the process work pool {pool!r}")
    if (
        params.deploy.concurrency_limit
        and ensure_concurrency_limit(params.deploy.concurrency_limit)[0]
    ):
        print(f"created the global concurrency limit {params.deploy.concurrency_limit!r} (1 slot)")
    for deployed in deploy_all(root, params, name):
        print(f"deployed {deployed.name}: {deployed.schedule} (id {deployed.id})")
    print(f"runs start once a worker polls {pool!r}: `textgate worker` (or `make worker`)")
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    """Run the deployments: a Prefect process worker on deploy.work_pool (replaces this
    process; stop it with Ctrl-C)."""
    params = load_params(args.params)
    _check_server("worker")
    from flows.deploy import WORK_POOL_TYPE, ensure_work_pool

    pool = params.deploy.work_pool
    if ensure_work_pool(pool):
        print(f"created the process work pool {pool!r}")
    command = [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool]
    command += ["--type", WORK_POOL_TYPE]
    print(" ".join(["prefect", *command[3:]]), flush=True)
    os.execv(sys.executable, command)
    return 0  # not reached


def cmd_monitor(args: argparse.Namespace) -> int:
    """Check serving traffic for drift once (the deployed monitor does it on an interval);
    exit 1 if the check could not be made."""
    _, root, name = _workspace(args.params)
    _check_server()
    from flows.monitor import drift_monitor

    state = drift_monitor(params_path=name, repo_dir=str(root), return_state=True)
    print(f"\nmonitor {state.name}: {state.message or ''}".rstrip())
    return 1 if state.is_failed() or state.is_crashed() else 0


def _url(text: str) -> str:
    if not text.startswith(("http://", "https://")):
        raise argparse.ArgumentTypeError(f"expected an http(s) URL, got {text!r}")
    return text


def cmd_notify_setup(args: argparse.Namespace) -> int:
    """Save the Prefect notification block alerts go through: a JSON webhook (default) or a
    Slack incoming webhook, named notify.block."""
    params = load_params(args.params)
    name = args.name or params.notify.block
    if name is None:
        raise TextgateError("notify.block is null (alerts are off): set it, or pass --name")
    name = name.rsplit("/", 1)[-1]
    _check_server("notify-setup")
    from flows.notify import save_webhook_block, send_alert

    slug = save_webhook_block(name, args.url, kind=args.kind)
    print(f"saved the notification block {slug}")
    if params.notify.block is None or params.notify.block.rsplit("/", 1)[-1] != name:
        print(f"alerts use notify.block: set it to {name!r} in {args.params}")
    if args.test:
        sent = send_alert(slug, "textgate: test alert", "notifications from textgate work")
        print("test alert sent" if sent else "test alert NOT sent (see the warning above)")
        return 0 if sent else 1
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """Print the production model, its metrics and lineage, the history and the last verdict."""
    params, registry = _registry(args.params)
    history = registry.history()
    production = history[-1] if history else None
    target = registry.rollback_target()
    verdict = _last_verdict(params)
    if args.json:
        payload = {
            "production": production.model_dump(mode="json") if production else None,
            "rollback_target": target.model_dump(mode="json") if target else None,
            "history": [release.model_dump(mode="json") for release in history],
            "last_verdict": verdict,
        }
        print(json.dumps(payload, indent=2))
        return 0
    if production is None:
        print("no production model yet: run `textgate run` (or `make run`)")
    else:
        _print_production(production)
        print(f"rollback to:      {target.bento_tag if target else '(nothing to roll back to)'}")
        print(f"history ({len(history)} release(s), newest first):")
        for release in reversed(history):
            print(
                f"  {release.promoted_at}  {release.action:<8}  {release.bento_tag}  "
                f"{release.reason}"
            )
    if verdict is not None:
        _print_verdict(verdict)
    return 0


def _format_metrics(metrics: dict[str, Any]) -> str:
    """`accuracy 0.9832, ..., behaviour (casing 1.0000, ...)`: nested groups in brackets."""

    def one(key: str, value: Any) -> str:
        if isinstance(value, dict):
            return f"{key} ({_format_metrics(value)})"
        if isinstance(value, float):
            return f"{key} {value:.4f}"
        return f"{key} {value}"

    return ", ".join(one(key, value) for key, value in metrics.items())


def _print_production(production: Release) -> None:
    print(f"production bento: {production.bento_tag}")
    print(f"model:            {production.model_tag}")
    print(
        f"promoted:         {production.promoted_at} by {production.promoted_by} "
        f"({production.action})"
    )
    print(f"reason:           {production.reason}")
    print(f"metrics:          {_format_metrics(production.metrics)}")
    lineage = production.lineage
    print(
        f"git commit:       {lineage.get('git_commit')}"
        f"{' (dirty)' if lineage.get('git_dirty') else ''}"
    )
    print(f"data md5:         {lineage.get('data_md5')}")
    print(f"model md5:        {lineage.get('model_md5')}")


def cmd_promote(args: argparse.Namespace) -> int:
    """Promote a bento already in the BentoML store to production by hand."""
    params, registry = _registry(args.params)
    # Read first: a corrupt registry is reported before BentoML is even imported.
    before = registry.production()
    from tasks.promote import promote_existing

    release = promote_existing(params, args.bento_tag, reason=args.reason)
    print(f"production was: {_label(before)}")
    print(f"production now: {_label(release)}")
    return 0


def _servable(target: Release) -> None:
    """The rollback's check; BentoML is imported only when there is a target to check."""
    from tasks.promote import PromotionError, ensure_servable

    try:
        ensure_servable(target)
    except PromotionError as error:
        raise TextgateError(f"cannot roll back: {error}; production is unchanged") from None


def cmd_rollback(args: argparse.Namespace) -> int:
    """Undo the latest promotion: production goes back to the release before it."""
    _, registry = _registry(args.params)
    before = registry.production()
    if registry.rollback_target() is not None:
        import tasks.promote  # noqa: F401  (BentoML takes seconds to import: not under the lock)
    release = registry.rollback(args.reason, check=_servable)
    print(f"rolled back production from {_label(before)}")
    print(f"                         to {_label(release)}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve the production bento with `bentoml serve` (replaces this process)."""
    params, registry = _registry(args.params)
    production = registry.production()
    if production is None:
        raise TextgateError("no production model to serve: run `textgate run` first")
    api_key_from_env(os.environ)  # a blank key is an error here, before BentoML's tracebacks
    # The bento records serve.request_log_* as packaged; the current params.yaml's win.
    env = {
        **os.environ,
        MAX_BYTES_ENV: str(params.serve.request_log_max_bytes),
        BACKUPS_ENV: str(params.serve.request_log_backups),
    }
    command = [
        sys.executable,
        "-m",
        "bentoml",
        "serve",
        production.bento_tag,
        "--port",
        str(args.port),
        "--host",
        args.host,
    ]
    print(" ".join(command[1:]), flush=True)
    os.execve(sys.executable, command, env)
    return 0  # not reached


def cmd_init(args: argparse.Namespace) -> int:
    """Inspect your data file and write the params that read it (see README)."""
    from flows.init import cmd_init as init

    return init(args)


def _add_init(commands: Any, common: argparse.ArgumentParser) -> None:
    init = commands.add_parser("init", help=cmd_init.__doc__, parents=[common])
    init.add_argument("--data", required=True, metavar="FILE", help="the training data file")
    init.add_argument("--test", metavar="FILE", help="a fixed test file (same columns)")
    init.add_argument("--text-column", metavar="C", help="default: found by name or content")
    init.add_argument("--label-column", metavar="L", help="default: found by name or content")
    init.set_defaults(func=cmd_init)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--params", default=PARAMS_FILE, help="path to params.yaml")
    parser = argparse.ArgumentParser(prog="textgate", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    _add_init(commands, common)
    run = commands.add_parser("run", help=cmd_run.__doc__, parents=[common])
    run.set_defaults(func=cmd_run)
    status = commands.add_parser("status", help=cmd_status.__doc__, parents=[common])
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(func=cmd_status)
    promote = commands.add_parser("promote", help=cmd_promote.__doc__, parents=[common])
    promote.add_argument("bento_tag", metavar="BENTO_TAG", help="e.g. textgate:abc123")
    promote.add_argument("--reason", required=True, type=_reason, help="why, for the history")
    promote.set_defaults(func=cmd_promote)
    rollback = commands.add_parser("rollback", help=cmd_rollback.__doc__, parents=[common])
    rollback.add_argument("--reason", required=True, type=_reason, help="why, for the history")
    rollback.set_defaults(func=cmd_rollback)
    serve = commands.add_parser("serve", help=cmd_serve.__doc__, parents=[common])
    serve.add_argument("--port", type=int, default=None, help="default: serve.port in params")
    serve.add_argument("--host", default="127.0.0.1", help="use 0.0.0.0 to listen on all")
    serve.set_defaults(func=cmd_serve)
    deploy = commands.add_parser("deploy", help=cmd_deploy.__doc__, parents=[common])
    deploy.set_defaults(func=cmd_deploy)
    worker = commands.add_parser("worker", help=cmd_worker.__doc__, parents=[common])
    worker.set_defaults(func=cmd_worker)
    monitor = commands.add_parser("monitor", help=cmd_monitor.__doc__, parents=[common])
    monitor.set_defaults(func=cmd_monitor)
    notify = commands.add_parser("notify-setup", help=cmd_notify_setup.__doc__, parents=[common])
    notify.add_argument("--url", required=True, type=_url, help="where alerts are posted")
    notify.add_argument(
        "--kind", choices=("webhook", "slack"), default="webhook", help="default: webhook"
    )
    notify.add_argument("--name", default=None, help="block name (default: notify.block)")
    notify.add_argument("--test", action="store_true", help="send a test alert")
    notify.set_defaults(func=cmd_notify_setup)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "port", "unset") is None:
            args.port = load_params(args.params).serve.port
        # SIGTERM, SIGINT, SIGHUP: exit 128 + signum, the processes started here stopped.
        with stop_on_signals():
            return args.func(args)
    except TextgateError as error:
        print(f"textgate: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
