"""What the benchmarks share: the strict one-line JSON report and package versions."""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
from importlib import metadata
from typing import Any


def json_ready(value: Any) -> Any:
    """NaN and infinities become None (JSON has neither); containers are walked."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: json_ready(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(item) for item in value]
    return value


def json_line(report: dict[str, Any]) -> str:
    """The report as one line of strict JSON (the last line each benchmark prints)."""
    return json.dumps(json_ready(report), allow_nan=False, separators=(",", ":"))


def package_version(package: str) -> str | None:
    """The installed version of `package`, or None."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def machine_info(*packages: str) -> dict[str, Any]:
    """Where the figures come from: CPUs, platform, versions of `packages`, load average now."""
    return {
        "cpu_count": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "platform": platform.platform(),
        "python": platform.python_version(),
        **{package: package_version(package) for package in packages},
        "load_average": [round(value, 2) for value in os.getloadavg()],
    }


def log(message: str) -> None:
    """A progress line on stderr (stdout holds only the results)."""
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def non_negative_int(text: str) -> int:
    """An argparse type: an integer of at least 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value
