"""`textgate` command line: run the pipeline, show the production model, serve it."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from textgate.config import load_params
from textgate.errors import TextgateError


def _registry(params_path: str):
    from textgate.registry import Registry

    params = load_params(params_path)
    return params, Registry(Path(params_path).resolve().parent / params.registry.path)


def cmd_run(args: argparse.Namespace) -> int:
    """Run the pipeline flow; exit 1 if validation, a stage or the gate fails."""
    load_params(args.params)  # fail fast, before Prefect starts, on a bad params file
    from flows.pipeline import pipeline

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
    """Print the production model, its metrics and lineage, and the promotion history."""
    _, registry = _registry(args.params)
    production = registry.production()
    history = registry.history()
    if args.json:
        payload = {
            "production": production.model_dump(mode="json") if production else None,
            "history": [release.model_dump(mode="json") for release in history],
        }
        print(json.dumps(payload, indent=2))
        return 0
    if production is None:
        print("no production model yet: run `textgate run` (or `make run`)")
        return 0
    print(f"production bento: {production.bento_tag}")
    print(f"model:            {production.model_tag}")
    print(f"promoted:         {production.promoted_at} by {production.promoted_by}")
    print(f"reason:           {production.reason}")
    metrics = ", ".join(
        f"{key} {value:.4f}" if isinstance(value, float) else f"{key} {value}"
        for key, value in production.metrics.items()
    )
    print(f"metrics:          {metrics}")
    lineage = production.lineage
    print(
        f"git commit:       {lineage.get('git_commit')}"
        f"{' (dirty)' if lineage.get('git_dirty') else ''}"
    )
    print(f"data md5:         {lineage.get('data_md5')}")
    print(f"model md5:        {lineage.get('model_md5')}")
    print(f"history ({len(history)} promotion(s), newest first):")
    for release in reversed(history):
        print(f"  {release.promoted_at}  {release.bento_tag}  {release.reason}")
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
