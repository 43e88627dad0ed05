"""`textgate` command line: run the pipeline, show and change the production model, serve it;
deploy the pipeline and the drift monitor to a Prefect server, run them, set up alerts."""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flows.processes import stop_on_signals
from textgate.artifacts import evaluate_outputs, verdict_outputs
from textgate.config import PARAMS_FILE, Params, api_key_from_env, load_params, resolve_paths
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
    live, live_line = _live_accuracy(args.params)
    from flows.serving import read_serve_states

    serving = read_serve_states(registry.path.parent)
    if args.json:
        payload = {
            "serving": serving,
            "production": production.model_dump(mode="json") if production else None,
            "live_accuracy": live,
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
        print(live_line)
    for state in serving:
        _print_serving(state, production)
    if verdict is not None:
        _print_verdict(verdict)
    return 0


def _live_accuracy(params_path: str) -> tuple[dict[str, Any] | None, str]:
    """Production's live accuracy (labelled random sample) for `status`, and its sentence."""
    from tasks.label import production_live_accuracy

    root = Path(params_path).resolve().parent
    try:
        estimate, line = production_live_accuracy(resolve_paths(load_params(params_path), root))
    except TextgateError as error:
        return None, f"live accuracy: unavailable ({error})"
    if estimate is None:
        return None, line
    payload = {
        "accuracy": estimate.accuracy,
        "n": estimate.n,
        "ci": [estimate.low, estimate.high],
        "model_tag": estimate.model_tag,
    }
    return payload, line


def _print_serving(state: dict[str, Any], production: Release | None) -> None:
    """One running `textgate serve`: what it serves, and why not production if it does not."""
    print(
        f"served on port {state.get('port')} (textgate serve, pid {state.get('pid')}): "
        f"{state.get('serving') or '(nothing yet)'} since {state.get('since')}"
    )
    if production is not None and state.get("serving") != production.bento_tag:
        print(f"  WARNING: production is {production.bento_tag}, but it is not served")
    if state.get("connections") == "direct":
        print("  connections: straight to the bento (textgate serve steers its port)")
    elif state.get("connections") == "proxy":
        print("  connections: through textgate serve's proxy (a switch, a shadow, or no steering)")
    if state.get("problem"):
        print(f"  PROBLEM at {state.get('problem_at')}: {state['problem']}")


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

    if ":" in args.bento_tag:
        _import_if_missing(args.params, args.bento_tag)
    release = promote_existing(params, args.bento_tag, reason=args.reason)
    print(f"production was: {_label(before)}")
    print(f"production now: {_label(release)}")
    return 0


def _import_if_missing(params_path: str, bento_tag: str) -> None:
    """Import `bento_tag` from the workspace's remote store when the local store lacks it."""
    from tasks.remote import ensure_local_bento

    ensure_local_bento(Path(params_path).resolve().parent, bento_tag, print)


def _servable(target: Release, params_path: str = PARAMS_FILE) -> None:
    """The rollback's check; BentoML is imported only when there is a target to check."""
    from tasks.promote import PromotionError, ensure_servable
    from tasks.remote import RemoteError

    try:
        _import_if_missing(params_path, target.bento_tag)
        ensure_servable(target)
    except RemoteError as error:
        raise TextgateError(f"cannot roll back: {error}; production is unchanged") from None
    except PromotionError as error:
        raise TextgateError(f"cannot roll back: {error}; production is unchanged") from None


def cmd_rollback(args: argparse.Namespace) -> int:
    """Undo the latest promotion: production goes back to the release before it."""
    _, registry = _registry(args.params)
    before = registry.production()
    if registry.rollback_target() is not None:
        import tasks.promote  # noqa: F401  (BentoML takes seconds to import: not under the lock)
    release = registry.rollback(args.reason, check=lambda t: _servable(t, args.params))
    print(f"rolled back production from {_label(before)}")
    print(f"                         to {_label(release)}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve the production bento and follow the registry: a promotion or rollback switches
    live traffic to the new bento once it answers as offline (until stopped with Ctrl-C)."""
    params, registry = _registry(args.params)
    if registry.production() is None:
        raise TextgateError("no production model to serve: run `textgate run` first")
    api_key_from_env(os.environ)  # a blank key is an error here, before BentoML's tracebacks
    # A serving machine of a team imports production from the shared store if it lacks it.
    _import_if_missing(args.params, registry.production().bento_tag)
    from flows.serving import ServeOptions, Supervisor

    serve = params.serve
    options = ServeOptions(
        host=args.host,
        port=args.port,
        registry=registry,
        state_dir=registry.path.parent,
        # The bento records serve.request_log_* as packaged; the current params.yaml's win.
        env={
            **os.environ,
            MAX_BYTES_ENV: str(serve.request_log_max_bytes),
            BACKUPS_ENV: str(serve.request_log_backups),
        },
        golden_file=_golden_file(params, Path(args.params).resolve().parent),
        score_tolerance=params.gate.served_score_tolerance,
        shadow=serve.shadow,
        shadow_sample_rate=params.shadow.sample_rate,
        poll_s=serve.follow_poll_s,
        ready_timeout_s=serve.switch_ready_timeout_s,
        drain_timeout_s=serve.drain_timeout_s,
        standby_s=serve.standby_s,
    )
    Supervisor(
        options,
        alert=_alerter(params.notify.block),
        servable=lambda release: _switchable(release, args.params),
    ).run(on_ready=lambda line: print(line, flush=True))
    return 0


def _golden_file(params: Params, base: Path) -> Path:
    path = evaluate_outputs(params).golden
    return path if path.is_absolute() else base / path


def _switchable(release: Release, params_path: str = PARAMS_FILE) -> None:
    """The switch's first check: the bento and its model are in the BentoML store (imported
    from the team's shared store first when one is configured and the local store lacks it)."""
    from tasks.promote import PromotionError, ensure_servable
    from tasks.remote import RemoteError

    try:
        _import_if_missing(params_path, release.bento_tag)
        ensure_servable(release)
    except (PromotionError, RemoteError) as error:
        raise TextgateError(str(error)) from None


def _alerter(block: str | None) -> Callable[[str, str], None]:
    """Send an alert through the notification block, in the background; without a Prefect
    server configured (PREFECT_API_URL) it is only printed."""

    def alert(subject: str, body: str) -> None:
        from prefect.settings import PREFECT_API_URL

        if block is None or not PREFECT_API_URL.value():
            print(
                f"textgate: alert not sent (notify.block or PREFECT_API_URL unset): {subject}",
                file=sys.stderr,
                flush=True,
            )
            return
        from flows.notify import send_alert

        threading.Thread(target=send_alert, args=(block, subject, body), daemon=True).start()

    return alert


def cmd_shadow(args: argparse.Namespace) -> int:
    """Serve a candidate bento in shadow: `textgate serve` (serve.shadow: true) mirrors a
    sample of live requests to it and logs both answers; --stop ends it."""
    params, registry = _registry(args.params)
    from flows.serving import SHADOW_LOG, write_shadow_target

    state_dir = registry.path.parent
    if args.stop:
        write_shadow_target(state_dir, None)
        print("no shadow candidate now")
        return 0
    if args.bento_tag is None:
        raise TextgateError("name the candidate bento (or pass --stop)")
    import bentoml

    from tasks.promote import PromotionError, ensure_servable

    try:
        bento = bentoml.bentos.get(args.bento_tag)
        release = Release.create(
            bento_tag=str(bento.tag),
            model_tag=str(bento.info.all_models[0].tag),
            reason="shadow candidate",
        )
        ensure_servable(release)
    except (bentoml.exceptions.BentoMLException, PromotionError, IndexError) as error:
        # BentoMLException: not found, or a version prefix that several bentos share
        raise TextgateError(f"cannot shadow {args.bento_tag}: {error}") from None
    (state_dir / SHADOW_LOG).unlink(missing_ok=True)  # evidence is about this candidate only
    write_shadow_target(state_dir, release)
    if not params.serve.shadow:
        print("note: serve.shadow is false: `textgate serve` mirrors nothing until it is true")
    print(f"shadow candidate: {release.bento_tag}; `textgate shadow-check` compares it")
    return 0


def cmd_shadow_check(args: argparse.Namespace) -> int:
    """Compare the shadow candidate with production on the mirrored requests; exit 0 if the
    shadow checks pass, 1 if not (or not enough evidence yet). --promote promotes it then."""
    params, registry = _registry(args.params)
    from datetime import UTC, datetime

    from flows.serving import SHADOW_LOG, read_shadow_target
    from textgate.shadow import read_shadow_log, shadow_checks, summarise

    state_dir = registry.path.parent
    target = read_shadow_target(state_dir)
    if target is None:
        raise TextgateError("no shadow candidate: name one with `textgate shadow BENTO_TAG`")
    summary = summarise(read_shadow_log(state_dir / SHADOW_LOG, target.bento_tag))
    waited = (datetime.now(UTC) - target.promoted_at).total_seconds() / 3600
    checks = shadow_checks(summary, params.shadow, waited)
    verdict = {
        "passed": all(check.passed for check in checks),
        "checks": [check.model_dump(mode="json") for check in checks],
        "shadow": {"candidate": target.bento_tag, **vars(summary)},
    }
    if args.json:
        print(json.dumps(verdict, indent=2))
    else:
        print(f"shadow candidate {target.bento_tag}: {summary.requests} mirrored requests")
        _print_verdict(verdict)
    if verdict["passed"] and args.promote:
        from tasks.promote import promote_existing

        reason = args.reason or "passed the shadow checks"
        release = promote_existing(params, target.bento_tag, reason=reason, verdict=verdict)
        print(f"production now: {_label(release)}")
    return 0 if verdict["passed"] else 1


def cmd_remote_add(args: argparse.Namespace) -> int:
    """Make an S3 bucket the team's store: the default DVC remote for data (in .dvc/config,
    to commit) and the place bentos are exported to. Credentials come from the AWS
    environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY or a profile), never from here."""
    from tasks.remote import add_remote, check_remote

    root = Path(args.params).resolve().parent
    remote = add_remote(root, args.url, args.endpoint_url)
    print(f"the default DVC remote is now {remote.describe()}; commit .dvc/config to share it")
    check_remote(remote)
    print(f"bucket {remote.bucket!r} answers; bentos go to {args.url.rstrip('/')}/bentos/")
    return 0


def _add_remote_parser(commands: Any, common: argparse.ArgumentParser) -> None:
    remote = commands.add_parser("remote", help="the shared S3 store for data and bentos")
    actions = remote.add_subparsers(dest="remote_command", required=True)
    add = actions.add_parser("add", help=cmd_remote_add.__doc__, parents=[common])
    add.add_argument("url", metavar="URL", help="s3://bucket/prefix")
    add.add_argument("--endpoint-url", default=None, help="an S3-compatible server (not AWS)")
    add.set_defaults(func=cmd_remote_add)


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
    shadow = commands.add_parser("shadow", help=cmd_shadow.__doc__, parents=[common])
    shadow.add_argument("bento_tag", metavar="BENTO_TAG", nargs="?", help="the candidate")
    shadow.add_argument("--stop", action="store_true", help="stop shadowing")
    shadow.set_defaults(func=cmd_shadow)
    check = commands.add_parser("shadow-check", help=cmd_shadow_check.__doc__, parents=[common])
    check.add_argument("--json", action="store_true", help="machine-readable output")
    check.add_argument("--promote", action="store_true", help="promote it if the checks pass")
    check.add_argument("--reason", type=_reason, default=None, help="why, for the history")
    check.set_defaults(func=cmd_shadow_check)
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
    _add_remote_parser(commands, common)
    from flows.label import add_parser as add_label_parser

    add_label_parser(commands, common)
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
