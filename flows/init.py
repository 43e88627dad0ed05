"""`textgate init`: inspect a data file, write the `data:` section of params.yaml that reads
it, start a must-pass file, and print what to check. Nothing else changes."""

from __future__ import annotations

import argparse
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from textgate.config import Params, load_params
from textgate.errors import ConfigError, DataError
from textgate.inspection import (
    INIT_MARK,
    DataFacts,
    Limits,
    data_section,
    describe_facts,
    gather_facts,
    guess_columns,
    replace_section,
)
from textgate.io import TableFormat, atomic_path, read_cases, read_table_format, select_labelled

# Encodings read from the bytes themselves (a byte-order mark, or valid UTF-8): anything else
# was a detector's guess, which init writes into data.encoding so every run reads the same.
CERTAIN_ENCODINGS = {None, "utf-8", "utf-8-sig", "utf-16", "utf-32"}

MUST_PASS_TEMPLATE = """\
# Must-pass cases: each one must be answered exactly as written, or the gate refuses the model
# (gate.behaviour.must_pass). One case per line: a text, a comma, its label, which must be one
# of the data's labels:
#   {labels}
# Quote a text with a comma in it:
#   "yes, cancel it please",{example}
# Lines starting with # are comments. With no cases the check does not apply: add the
# messages that must never be misrouted before the first release.
text,label
"""


@dataclass(frozen=True)
class _Read:
    frame: pd.DataFrame  # text, label
    format: TableFormat
    table_columns: list[str]


def _read(path: Path, text: str | None, label: str | None) -> tuple[_Read, str, str, str]:
    table, fmt = read_table_format(path)
    text, label, reason = guess_columns(table, text, label)
    selected = select_labelled(table, path, text, label)
    return _Read(selected, fmt, [str(c) for c in table.columns]), text, label, reason


def _relative(path: Path, root: Path) -> str:
    return os.path.relpath(path, root) if path.is_relative_to(root) else str(path)


def _encoding(train: TableFormat, test: TableFormat | None) -> tuple[str | None, str | None]:
    """data.encoding to write (None: detect per file), and a warning when files disagree."""
    found = {train.encoding} | ({test.encoding} if test else set())
    guessed = found - CERTAIN_ENCODINGS
    if not guessed:
        return None, None
    if len(found) == 1:
        return guessed.pop(), None
    return None, f"the files seem to use different encodings {sorted(map(str, found))}"


@dataclass(frozen=True)
class _Found:
    """What init read: the files, their columns and the facts about them."""

    train: _Read
    test: _Read | None
    text_column: str
    label_column: str
    facts: DataFacts


# Labels that name out-of-scope examples (CLINC150's `oos`), compared case-insensitively.
OUT_OF_SCOPE_NAMES = {"oos", "out_of_scope", "out-of-scope", "out of scope", "outofscope"}


def out_of_scope_label(class_sizes: dict[str, int]) -> str | None:
    """The data's label for out-of-scope examples, when one has such a name; else None."""
    found = [label for label in class_sizes if label.strip().lower() in OUT_OF_SCOPE_NAMES]
    return found[0] if len(found) == 1 else None


def _data_values(params: Params, args: argparse.Namespace, root: Path, found: _Found) -> dict:
    """The `data:` section init writes."""
    data_path = Path(args.data).resolve()
    test_path = Path(args.test).resolve() if args.test else None
    folder = Path(os.path.commonpath([data_path.parent, (test_path or data_path).parent]))
    facts = found.facts
    duplicate_share = facts.duplicates / max(facts.rows, 1)
    test_format = found.test.format if found.test else None
    # The labelled batches `textgate label import` writes are read with the file.
    batches = f"{params.label.batch_dir}/*.csv"
    return {
        "raw_dir": _relative(folder, root),
        "train_file": [data_path.relative_to(folder).as_posix(), batches],
        "test_file": test_path.relative_to(folder).as_posix() if test_path else None,
        "text_column": found.text_column,
        "label_column": found.label_column,
        "labels": None,
        "out_of_scope_label": out_of_scope_label(facts.class_sizes),
        "encoding": _encoding(found.train.format, test_format)[0],
        "label_aliases": facts.label_aliases,
        "on_duplicates": (
            "drop" if duplicate_share > params.validate_.max_duplicate_fraction else "fail"
        ),
        "on_test_overlap": "drop" if facts.test_overlap else "fail",
    }


def _tokenizer(params: Params) -> Any | None:
    from textgate.model import load_tokenizer

    try:
        return load_tokenizer(params.train.base_model)
    except ConfigError as error:
        print(f"warning: {error}")
        return None


def _inspect(params: Params, args: argparse.Namespace) -> _Found:
    train, text, label, reason = _read(Path(args.data), args.text_column, args.label_column)
    print(f"{args.data}: {_format(train.format)}; columns {list(train.table_columns)}")
    print(f"  columns used: {reason}")
    test = None
    if args.test:
        table, fmt = read_table_format(Path(args.test))
        test = _Read(select_labelled(table, args.test, text, label), fmt, list(table.columns))
        print(f"{args.test}: {_format(fmt)}")
    tokenizer = _tokenizer(params)
    facts = gather_facts(train.frame, test.frame if test else None, tokenizer)
    return _Found(train, test, text, label, facts)


def _format(fmt: TableFormat) -> str:
    parts = [fmt.format]
    if fmt.encoding:
        parts.append(f"encoding {fmt.encoding}")
    if fmt.delimiter:
        parts.append(f"delimiter {fmt.delimiter!r}")
    return ", ".join(parts)


def _write_params(path: Path, values: dict[str, Any], args: argparse.Namespace) -> None:
    command = f"textgate init --data {args.data}" + (f" --test {args.test}" if args.test else "")
    header = f"{INIT_MARK.removeprefix('# ')}: `{command}` wrote this section; check it."
    text = replace_section(path.read_text(encoding="utf-8"), "data", data_section(values, header))
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
        shutil.copymode(path, tmp)
    load_params(path)  # what init wrote must load


def _start_must_pass(path: Path, labels: list[str]) -> str:
    """Start an empty must-pass file; keep one whose labels all exist, else move it aside."""
    if path.is_file():
        try:
            unknown = sorted(set(read_cases(path)["label"].dropna()) - set(labels))
        except DataError:
            unknown = ["(unreadable)"]
        if not unknown:
            return f"kept {path}: its labels are all this data's"
        aside = path.with_name(f"{path.stem}.before-init{path.suffix}")
        os.replace(path, aside)
        kept = f"moved {path} (labels {unknown[:5]} are not this data's) to {aside}; "
    else:
        kept = ""
    shown = ", ".join(labels[:8]) + (", ..." if len(labels) > 8 else "")
    example = labels[0] if labels else "your_label"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(MUST_PASS_TEMPLATE.format(labels=shown, example=example), encoding="utf-8")
    return f"{kept}started {path} (no cases yet: add some, see its comments)"


def _checklist(params: Params, values: dict[str, Any], found: _Found) -> list[str]:
    """What the user should check before the first run."""
    facts, validate = found.facts, params.validate_
    todo = [
        f"the columns: data.text_column {values['text_column']!r}, data.label_column "
        f"{values['label_column']!r}"
    ]
    if values["encoding"]:
        todo.append(
            f"data.encoding {values['encoding']!r} was guessed: check that accented or "
            "non-Latin characters read right (python -m tasks.validate shows rows)"
        )
    if values["out_of_scope_label"]:
        oos = values["out_of_scope_label"]
        todo.append(
            f"data.out_of_scope_label is {oos!r}: its {facts.class_sizes[oos]} rows are "
            'out-of-scope examples, answered "unknown" (set null if it is an intent)'
        )
    if facts.label_aliases:
        todo.append(
            f"data.label_aliases merges {len(facts.label_aliases)} label variant(s) "
            "into one label each: check that each pair means the same"
        )
    if values["on_test_overlap"] == "drop":
        todo.append(
            f"data.on_test_overlap is drop: {facts.test_overlap} train rows that are also "
            "in the test file are dropped from training (fail refuses the data instead)"
        )
    if values["on_duplicates"] == "drop":
        todo.append(
            f"data.on_duplicates is drop: {facts.duplicates} exact duplicate rows are "
            f"dropped (over validate.max_duplicate_fraction={validate.max_duplicate_fraction})"
        )
    small = [k for k, n in facts.class_sizes.items() if n < validate.min_examples_per_class]
    if small:
        todo.append(
            f"{len(small)} class(es) have fewer than validate.min_examples_per_class="
            f"{validate.min_examples_per_class} examples: validate will refuse them; add "
            "examples, or merge or remove those classes"
        )
    if facts.test_only_labels:
        todo.append(
            f"the test file has labels the train file lacks ({facts.test_only_labels[:5]})"
            ": validate will refuse it; fix the files or map them with data.label_aliases"
        )
    if facts.conflicting_texts > validate.max_conflicting_texts:
        todo.append(
            f"{facts.conflicting_texts} texts appear with more than one label: validate "
            f"allows {validate.max_conflicting_texts} (validate.max_conflicting_texts)"
        )
    latin = facts.scripts.get("Latin", 0.0)
    if facts.scripts and latin < 0.8:
        todo.append(
            f"only {latin:.0%} of the letters are Latin: check that train.base_model "
            f"({params.train.base_model}) knows these scripts, or set a multilingual one"
        )
    if params.gate.class_recall_floors:
        todo.append("gate.class_recall_floors names labels of the old data: name this data's")
    return todo


def cmd_init(args: argparse.Namespace) -> int:
    """Inspect a data file (and a test file), write the `data:` section of params.yaml that
    reads it, start a must-pass file, and print what was found and what to check."""
    path = Path(args.params).resolve()
    params = load_params(path)
    found = _inspect(params, args)
    limits = Limits(
        min_examples_per_class=params.validate_.min_examples_per_class,
        max_duplicate_fraction=params.validate_.max_duplicate_fraction,
        max_truncated_fraction=params.validate_.max_truncated_fraction,
        max_length=params.train.max_length,
        base_model=params.train.base_model,
        min_accuracy=params.gate.min_accuracy,
    )
    print("\n".join(f"  {line}" for line in describe_facts(found.facts, limits)))
    root = path.parent
    values = _data_values(params, args, root, found)
    warning = _encoding(found.train.format, found.test.format if found.test else None)[1]
    if warning:
        print(f"warning: {warning}: set data.encoding if a file reads wrong")
    if not Path(args.data).resolve().is_relative_to(root):
        print(
            f"warning: {args.data} is outside {root}: DVC versions only data inside the "
            "repository; copy the files to data/raw/ and run init again to have it versioned"
        )
    _write_params(path, values, args)
    print(f"\nwrote the data: section of {path} (nothing else changed in it)")
    aliases = found.facts.label_aliases
    labels = sorted({aliases.get(label, label) for label in found.facts.class_sizes})
    must_pass = params.evaluate.must_pass_file
    print(_start_must_pass(must_pass if must_pass.is_absolute() else root / must_pass, labels))
    print("\ncheck:")
    print("\n".join(f"- {item}" for item in _checklist(params, values, found)))
    print("- then `textgate run` (`python -m tasks.validate` runs the data checks alone)")
    return 0
