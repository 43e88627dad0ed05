"""`textgate label export|serve|import` (the flow the drift monitor runs is flows/label_flow.py).

    textgate label export --out review.json      # the review queue (and review.csv beside it)
    textgate label serve [--install]             # a local Label Studio with the queue loaded
    textgate label import review-labelled.csv    # or a Label Studio JSON export
    textgate label import --from-label-studio PROJECT_ID

See README, "Labelling loop".
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from tasks import label as steps
from tasks import labelstudio
from textgate.config import Params, load_params, resolve_paths
from textgate.errors import TextgateError

DEFAULT_OUT = Path(".textgate") / "label" / "review.json"


def _params(params_path: str) -> tuple[Params, Path]:
    path = Path(params_path).resolve()
    return resolve_paths(load_params(path), path.parent), path.parent


def cmd_export(args: argparse.Namespace) -> int:
    """Write the review queue: Label Studio tasks (JSON) and a CSV beside them."""
    params, root = _params(args.params)
    out = Path(args.out) if args.out else root / DEFAULT_OUT
    try:
        result = steps.export_for_review(params, out)
    except steps.NothingToReview as nothing:
        print(nothing)
        return 0
    print(result.line())
    for note in result.notes:
        print(f"note: {note}")
    print(
        f"next: label them (`textgate label serve`, or fill in the label column of "
        f"{result.csv_path}), then `textgate label import FILE`"
    )
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    """Check labelled texts and add them as a new batch of training data."""
    params, root = _params(args.params)
    if args.from_label_studio is not None:
        client, process = _client(root, args.label_studio_url)
        try:
            payload = client.export(args.from_label_studio)
        finally:
            if process is not None:
                labelstudio_stop(process)
        rows, unlabelled = steps.lab.read_label_studio_export(
            payload, f"Label Studio project {args.from_label_studio}"
        )
    elif args.file:
        rows, unlabelled = steps.read_labels_file(Path(args.file))
    else:
        raise TextgateError("name a FILE to import, or --from-label-studio PROJECT")
    result = steps.import_labels(params, rows, unlabelled, allow_new_labels=args.allow_new_labels)
    print("\n".join(result.lines()))
    print("next: `textgate run` retrains on the new batch (DVC sees the new file)")
    return 0


def labelstudio_stop(process: Any) -> None:
    from textgate.process import stop

    stop(process)


def _client(root: Path, url: str | None) -> tuple[labelstudio.Client, Any]:
    """A client of the running Label Studio at `url`, else of one started now (returned)."""
    if url:
        return labelstudio.Client(url, labelstudio.token(root)), None
    process, started = labelstudio.start(root)
    return labelstudio.Client(started, labelstudio.token(root)), process


def cmd_serve(args: argparse.Namespace) -> int:
    """Start a local Label Studio with a project of the intents and the review queue loaded
    (runs until Ctrl-C)."""
    params, root = _params(args.params)
    tasks_file = Path(args.tasks) if args.tasks else root / DEFAULT_OUT
    if args.install and labelstudio.executable(root) is None:
        print(f"installing Label Studio {labelstudio.LABEL_STUDIO_VERSION} (a few minutes)")
        labelstudio.install(root)
    process, url = labelstudio.start(root, args.ls_port, args.host)
    try:
        client = labelstudio.Client(url, labelstudio.token(root))
        project = client.project(params.package.model_name, steps.label_set(params))
        if tasks_file.is_file():
            count = client.import_tasks(project, steps.lab.read_tasks(tasks_file))
            print(f"loaded {count} task(s) from {tasks_file} into project {project}")
        else:
            print(f"no review queue at {tasks_file} yet: run `textgate label export` first")
        print(f"Label Studio: {url}/projects/{project} (user {labelstudio.USER}; the password is")
        print(f"the first 16 characters of {root / labelstudio.HOME / 'token'}). When done:")
        print(f"  textgate label import --from-label-studio {project} --label-studio-url {url}")
        while process.running():
            time.sleep(1)
        return process.popen.returncode or 0
    finally:
        labelstudio_stop(process)


def add_parser(commands: Any, common: argparse.ArgumentParser) -> None:
    """`textgate label ...` under the main parser's subcommands."""
    label = commands.add_parser("label", help="the labelling loop: export, serve, import")
    sub = label.add_subparsers(dest="label_command", required=True)
    export = sub.add_parser("export", help=cmd_export.__doc__, parents=[common])
    export.add_argument("--out", default=None, help=f"tasks JSON (default {DEFAULT_OUT})")
    export.set_defaults(func=cmd_export)
    serve = sub.add_parser("serve", help=cmd_serve.__doc__, parents=[common])
    serve.add_argument("--tasks", default=None, help=f"tasks to load (default {DEFAULT_OUT})")
    serve.add_argument("--install", action="store_true", help="install Label Studio if missing")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080, dest="ls_port")
    serve.set_defaults(func=cmd_serve)
    imp = sub.add_parser("import", help=cmd_import.__doc__, parents=[common])
    imp.add_argument("file", nargs="?", help="a Label Studio JSON export, or a CSV text,label")
    imp.add_argument("--from-label-studio", type=int, metavar="PROJECT", default=None)
    imp.add_argument("--label-studio-url", default=None, help="a running Label Studio")
    imp.add_argument("--allow-new-labels", action="store_true", help="accept new intents")
    imp.set_defaults(func=cmd_import)
