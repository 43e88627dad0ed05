"""Each default and each shared name is written in one place (params.yaml, its typed mirror
textgate/config.py, or one textgate module), not copied into the code that uses it."""

from __future__ import annotations

import ast
from collections.abc import Iterator

import pytest

from tests.helpers import REPO_ROOT

CODE_DIRS = ("textgate", "tasks", "flows", "bentos", "bench")


def _modules() -> Iterator[tuple[str, ast.Module]]:
    for folder in CODE_DIRS:
        for path in sorted((REPO_ROOT / folder).rglob("*.py")):
            relative = path.relative_to(REPO_ROOT).as_posix()
            yield relative, ast.parse(path.read_text(encoding="utf-8"), filename=relative)


def _where_spelt(value: str) -> list[str]:
    """The modules with `value` as a whole string literal (not inside a docstring)."""
    return sorted(
        {
            relative
            for relative, tree in _modules()
            for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and node.value == value
        }
    )


@pytest.mark.parametrize(
    ("value", "home"),
    [
        ("params.yaml", "textgate/config.py"),
        ("TEXTGATE_REQUEST_LOG", "textgate/requestlog.py"),
        ("TEXTGATE_THREADS", "textgate/runtime.py"),
        ("TEXTGATE_TORCH_THREADS", "textgate/runtime.py"),
        ("typos", "textgate/behaviour.py"),
        ("filler", "textgate/behaviour.py"),
    ],
)
def test_a_shared_name_is_spelt_in_one_module(value: str, home: str) -> None:
    assert _where_spelt(value) == [home]


def test_no_signature_repeats_a_batch_size_default() -> None:
    repeated = [
        f"{relative}:{node.lineno} {node.name}"
        for relative, tree in _modules()
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        for argument, default in _defaults(node.args)
        if argument.arg == "batch_size" and default is not None
    ]
    assert repeated == []


def _defaults(args: ast.arguments) -> list[tuple[ast.arg, ast.expr | None]]:
    positional = [*args.posonlyargs, *args.args]
    padded = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
    keyword = zip(args.kwonlyargs, args.kw_defaults, strict=True)
    return [*zip(positional, padded, strict=True), *keyword]


def test_the_tree_scanned_is_the_project() -> None:
    # Guards the scans above against passing on an empty walk.
    assert any(relative == "bentos/service.py" for relative, _ in _modules())
