"""The bento declares every third-party package its code imports.

In this virtualenv everything is installed, so a bento that forgot a requirement would still
serve here and fail only in a container; this test reads the imports instead.
"""

from __future__ import annotations

import ast
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import yaml

from tests.helpers import REPO_ROOT, first_party_imports


def _included_files(bentofile: dict) -> list[Path]:
    files: list[Path] = []
    for pattern in bentofile["include"]:
        files += [path for path in REPO_ROOT.glob(pattern) if path.suffix == ".py"]
    return files


def _top_level_imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_bento_carries_every_module_its_code_imports():
    bentofile = yaml.safe_load((REPO_ROOT / "bentos" / "bentofile.yaml").read_text())
    included = set(_included_files(bentofile))
    assert REPO_ROOT / "bentos" / "service.py" in included
    missing = {
        str(imported.relative_to(REPO_ROOT)): str(path.relative_to(REPO_ROOT))
        for path in included
        for imported in first_party_imports(path, {"textgate", "bentos"})
        if imported not in included
    }
    assert not missing, f"imported by the bento's code but not included: {missing}"


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_bento_requirements_cover_the_code_it_carries():
    bentofile = yaml.safe_load((REPO_ROOT / "bentos" / "bentofile.yaml").read_text())
    declared = {
        _normalise(re.split(r"[<>=!~ \[]", spec, maxsplit=1)[0])
        for spec in bentofile["python"]["packages"]
    }
    own = {"textgate", "bentos", "__future__"}
    distributions = packages_distributions()
    missing = {}
    for path in _included_files(bentofile):
        for module in _top_level_imports(path) - own - set(sys.stdlib_module_names):
            if module == "bentoml":  # the serving runtime itself
                continue
            dists = {_normalise(dist) for dist in distributions.get(module, [module])}
            if not dists & declared:
                missing.setdefault(module, []).append(str(path.relative_to(REPO_ROOT)))
    assert not missing, f"imported by the bento's code but not in bentofile.yaml: {missing}"
