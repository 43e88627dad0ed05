"""What every `python -m tasks.<stage>` entry point shares: argument parsing and error exits."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from textgate.config import PARAMS_FILE, Params, load_params
from textgate.errors import TextgateError

# Exit codes: 1 = the stage ran and its check failed; 2 = bad input or configuration.
EXIT_CHECK_FAILED = 1
EXIT_BAD_INPUT = 2


class StageFailed(TextgateError):
    """The stage ran to completion and found the data or model not good enough."""


def stage_main(stage: str, run: Callable[[Params], object], argv: list[str] | None = None) -> int:
    """Parse `--params`, run the stage, turn textgate errors into a clear message and exit code."""
    parser = argparse.ArgumentParser(prog=f"python -m tasks.{stage}", description=run.__doc__)
    parser.add_argument("--params", default=PARAMS_FILE, help="path to params.yaml")
    args = parser.parse_args(argv)
    try:
        run(load_params(args.params))
    except StageFailed as error:
        print(f"{stage} failed: {error}", file=sys.stderr)
        return EXIT_CHECK_FAILED
    except TextgateError as error:
        print(f"{stage}: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0
