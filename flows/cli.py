"""`textgate` command line: run the pipeline, show and change the production model, serve it."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from textgate.config import Params, load_params
from textgate.errors import TextgateError
from textgate.registry import Registry, Release

# Where the pipeline writes the latest gate verdict, relative to the registry's directory.
LAST_VERDICT = Path("verdicts") / "latest.json"


def _registry(params_path: str) -> tuple[Params, Registry]:
    """The params, with the registry path resolved against the params file's directory."""
    params = load_params(params_path)
    path = Path(params_path).resolve().parent / params.registry.path
    registry_config = params.registry.model_copy(update={"path": path})
    return params.model_copy(update={"registry": registry_config}), Registry(path)


def _reason(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be blank: say why, for the history")
    return text.strip()


def _label(release: Release | None) -> str:
    if release is None:
        return "(none)"
    return f"{release.bento_tag} (model {release.model_tag}, {release.action})"


def _last_verdict(registry: Registry) -> dict[str, Any] | None:
    """The pipeline's latest gate verdict, or None if there is none or it cannot be read.

    A bad file only warns (on stderr): status must still show production.
    """
    path = registry.path.parent / LAST_VERDICT
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
    from flows.pipeline import check_approval_possible, pipeline

    check_approval_possible(params)

    state = pipeline(
        params_path=str(Path(args.params).resolve().name),
        repo_dir=str(Path(args.params).resolve().parent),
        return_state=True,
    )
    print(f"\npipeline {state.name}: {state.message or ''}".rstrip())
    if state.is_failed() or state.is_crashed():
        return 1
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """Print the production model, its metrics and lineage, the history and the last verdict."""
    _, registry = _registry(args.params)
    history = registry.history()
    production = history[-1] if history else None
    target = registry.rollback_target()
    verdict = _last_verdict(registry)
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
    _, registry = _registry(args.params)
    production = registry.production()
    if production is None:
        raise TextgateError("no production model to serve: run `textgate run` first")
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
    os.execv(sys.executable, command)
    return 0  # not reached


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--params", default="params.yaml", help="path to params.yaml")
    parser = argparse.ArgumentParser(prog="textgate", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
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
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "port", "unset") is None:
            args.port = load_params(args.params).serve.port
        return args.func(args)
    except TextgateError as error:
        print(f"textgate: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
