"""Each bento declares every third-party package its code imports.

In this virtualenv everything is installed, so a bento that forgot a requirement would still
serve here and fail only in a container; this test reads the imports instead. The CPU bento
(bentofile.yaml) leaves out what only the torch runtime or the pipeline's stages import
(textgate.model, torch, transformers, scipy, pandas), imported inside functions that CPU
serving never calls: tests/bentos/test_lean.py serves in a fresh interpreter and checks.
"""

from __future__ import annotations

import ast
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
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


BENTOFILES = ["bentofile.yaml", "bentofile.torch.yaml"]
# Not in the CPU bento: imported only by the torch runtime and the stages' table and statistics
# functions, inside the functions.
NOT_IN_CPU_BENTO = {"textgate/model.py"}
NOT_IN_CPU_PACKAGES = {"torch", "transformers", "scipy", "pandas"}


@pytest.mark.parametrize("name", BENTOFILES)
def test_bento_carries_every_module_its_code_imports(name: str):
    bentofile = yaml.safe_load((REPO_ROOT / "bentos" / name).read_text())
    included = set(_included_files(bentofile))
    allowed = {REPO_ROOT / path for path in NOT_IN_CPU_BENTO} if name == "bentofile.yaml" else set()
    assert REPO_ROOT / "bentos" / "service.py" in included
    assert not allowed & included
    missing = {
        str(imported.relative_to(REPO_ROOT)): str(path.relative_to(REPO_ROOT))
        for path in included
        for imported in first_party_imports(path, {"textgate", "bentos"})
        if imported not in included | allowed
    }
    assert not missing, f"imported by the bento's code but not included: {missing}"


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@pytest.mark.parametrize("name", BENTOFILES)
def test_bento_requirements_cover_the_code_it_carries(name: str):
    bentofile = yaml.safe_load((REPO_ROOT / "bentos" / name).read_text())
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
            if name == "bentofile.yaml" and module in NOT_IN_CPU_PACKAGES:
                continue
            dists = {_normalise(dist) for dist in distributions.get(module, [module])}
            if not dists & declared:
                missing.setdefault(module, []).append(str(path.relative_to(REPO_ROOT)))
    assert not missing, f"imported by the bento's code but not in bentofile.yaml: {missing}"
