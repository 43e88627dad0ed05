"""What a bento weighs: its own files, its model, and the Python packages it installs.

A bento in the store holds its code and requirements, not the packages (those go into the
image at `bentoml containerize`), so the packages are measured here as they are installed in
this environment: the bento's `env/python/requirements.txt`, with everything they depend on
(BentoML's own dependencies included, as an image has them), each counted once by the size of
its installed files. Prints one table per bento, then one JSON line.

    python -m bench.bento_size TAG [TAG ...]
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from bench.common import json_line

MIB = 1024 * 1024


def _name(requirement: str) -> str:
    return re.sub(r"[-_.]+", "-", re.split(r"[<>=!~ \[;(]", requirement.strip(), maxsplit=1)[0])


def dependency_closure(roots: Sequence[str]) -> dict[str, metadata.Distribution]:
    """The installed distributions `roots` need, by normalised name (extras are not followed)."""
    found: dict[str, metadata.Distribution] = {}
    todo = [_name(root).lower() for root in roots if root.strip()]
    while todo:
        name = todo.pop()
        if name in found:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        found[name] = dist
        for requirement in dist.requires or []:
            if "extra ==" not in requirement:
                todo.append(_name(requirement).lower())
    return found


def installed_mib(dist: metadata.Distribution) -> float:
    """The size of the files a distribution installed."""
    total = 0
    for file in dist.files or []:
        path = Path(dist.locate_file(file))
        if path.is_file():
            total += path.stat().st_size
    return total / MIB


def directory_mib(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / MIB


def bento_size(tag: str) -> dict[str, Any]:
    """A bento's own files, its models and its packages (with their dependencies), in MiB."""
    import bentoml

    bento = bentoml.bentos.get(tag)
    requirements = (Path(bento.path) / "env" / "python" / "requirements.txt").read_text()
    roots = [line for line in requirements.splitlines() if line and not line.startswith("#")]
    packages = {
        name: installed_mib(dist) for name, dist in dependency_closure([*roots, "bentoml"]).items()
    }
    models = sum(directory_mib(Path(bentoml.models.get(m.tag).path)) for m in bento.info.all_models)
    return {
        "bento": str(bento.tag),
        "requirements": roots,
        "bento_files_mib": directory_mib(Path(bento.path)),
        "models_mib": models,
        "packages": len(packages),
        "packages_mib": sum(packages.values()),
        "largest": dict(sorted(packages.items(), key=lambda item: -item[1])[:12]),
        "package_names": sorted(packages),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bento_size", description=__doc__)
    parser.add_argument("tags", nargs="+")
    args = parser.parse_args(argv)
    sizes = [bento_size(tag) for tag in args.tags]
    for size in sizes:
        print(f"{size['bento']}: requirements {', '.join(size['requirements'])}")
        print(
            f"  bento files {size['bento_files_mib']:.2f} MiB, models "
            f"{size['models_mib']:.1f} MiB, {size['packages']} packages installed "
            f"{size['packages_mib']:.0f} MiB"
        )
        largest = ", ".join(f"{name} {mib:.0f}" for name, mib in size["largest"].items())
        print(f"  largest packages (MiB): {largest}")
    print(json_line({"bentos": sizes}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
