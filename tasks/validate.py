"""Stage `validate`: check the raw labelled data with Great Expectations before anything trains.

Writes `report.json` and the same report as a self-contained page, `report.html` (no script,
no remote asset: it opens offline), to `validate.output_dir`, then raises StageFailed (exit 1)
when any check fails.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pandas as pd

from tasks.common import StageFailed, stage_main
from textgate import validation as v
from textgate.artifacts import ValidationReport, validate_outputs, write_artifact
from textgate.config import Params
from textgate.errors import ConfigError, DataError
from textgate.io import atomic_path, read_cases, read_labelled, read_training
from textgate.language import UnknownCharacters, suggested_base_model, unknown_characters
from textgate.repair import Repairs, repair_data
from textgate.text import normalise_text

EXAMPLES = 5  # offending rows or classes kept per check in report.json

# The frames expectations run on; each is one Great Expectations asset, suite and validation.
TRAIN_ROWS = "train_rows"  # v.row_features of the train file
TRAIN_CLASSES = "train_classes"  # v.class_features of the train rows, declared labels only
TRAIN_TEXTS = "train_texts"  # v.text_conflicts of the train rows
TEST_ROWS = "test_rows"  # v.row_features of the test file
TEST_CLASSES = "test_classes"  # v.class_features of the test rows
MUST_PASS = "must_pass"  # the cases of evaluate.must_pass_file (text, label)
RECALL_FLOORS = "recall_floors"  # one row per label of gate.class_recall_floors
TOKENIZER = "tokenizer"  # one row: the share of the texts' characters unknown to the tokenizer
UNKNOWN_SHARE = "unknown_char_share"

Frames = dict[str, pd.DataFrame]
Result = dict[str, Any]  # the `result` dict of one Great Expectations expectation result
Examples = list[dict[str, Any]]


@dataclass(frozen=True)
class _Check:
    """One expectation (by class name), the frame it runs on, and how to word its result."""

    name: str
    table: str
    expectation: str  # class name in great_expectations.expectations
    kwargs: dict[str, Any]
    summarise: Callable[[Result, Frames], str]
    examples: Callable[[Result, Frames], Examples]


def _no_examples(result: Result, frames: Frames) -> Examples:
    return []


def _unexpected_rows(table: str) -> Callable[[Result, Frames], Examples]:
    """Offending rows as Great Expectations lists them (by index of the row frame)."""

    def examples(result: Result, frames: Frames) -> Examples:
        index = result.get("partial_unexpected_index_list") or []
        return v.row_examples(frames[table], index, EXAMPLES)

    return examples


def _counted(table: str, what: str) -> Callable[[Result, Frames], str]:
    """Summary of a row check: 'N of M <what>; allowed: 0.'"""

    def summarise(result: Result, frames: Frames) -> str:
        total = result.get("element_count", len(frames[table]))
        return f"{result.get('unexpected_count', 0)} of {total} {what}; allowed: 0."

    return summarise


def _row_count_check(
    name: str, table: str, expectation: str, kwargs: dict[str, Any], what: str
) -> _Check:
    """A row check worded 'N of M <what>; allowed: 0.', with the offending rows as examples."""
    return _Check(name, table, expectation, kwargs, _counted(table, what), _unexpected_rows(table))


def _required_columns_check(params: Params, table: str, rows: str) -> _Check:
    """The text and label columns are present."""
    data = params.data

    def summarise(result: Result, frames: Frames) -> str:
        return (
            f"The text column {data.text_column!r} and the label column {data.label_column!r} "
            f"are present ({len(frames[table])} {rows})."
        )

    return _Check(
        "required_columns",
        table,
        "ExpectTableColumnsToMatchSet",
        {"column_set": [v.TEXT, v.LABEL], "exact_match": False},
        summarise,
        _no_examples,
    )


def _text_length_check(params: Params, table: str) -> _Check:
    """Each non-blank text is within validate.min_text_chars-max_text_chars once normalised."""
    cfg = params.validate_

    def summarise(result: Result, frames: Frames) -> str:
        lengths = frames[table][v.TEXT_CHARS].dropna()
        observed = f"observed {lengths.min():.0f}-{lengths.max():.0f}" if len(lengths) else "none"
        return (
            f"{result.get('unexpected_count', 0)} of {len(lengths)} non-blank texts are outside "
            f"{cfg.min_text_chars}-{cfg.max_text_chars} characters after stripping whitespace "
            f"({observed}); allowed: 0."
        )

    return _Check(
        "text_length",
        table,
        "ExpectColumnValuesToBeBetween",
        {"column": v.TEXT_CHARS, "min_value": cfg.min_text_chars, "max_value": cfg.max_text_chars},
        summarise,
        _unexpected_rows(table),
    )


def _labels_in_set_check(table: str, rows: str, labels: list[str], set_name: str) -> _Check:
    """Every label is one of `labels` (declared, or inferred from the train file)."""

    def summarise(result: Result, frames: Frames) -> str:
        found = sorted(set(frames[table][v.LABEL].dropna()) - set(labels))
        more = ", …" if len(found) > EXAMPLES else ""
        seen = f" (found {', '.join(map(repr, found[:EXAMPLES]))}{more})" if found else ""
        total = result.get("element_count", len(frames[table]))
        return (
            f"{result.get('unexpected_count', 0)} of {total} {rows} have a label outside the "
            f"{set_name} [{', '.join(labels)}]{seen}; allowed: 0. Map variants to a label "
            "with data.label_aliases, or list every label in data.labels."
        )

    return _Check(
        "labels_in_set",
        table,
        "ExpectColumnValuesToBeInSet",
        {"column": v.LABEL, "value_set": labels},
        summarise,
        _unexpected_rows(table),
    )


def _row_checks(params: Params, table: str, labels: list[str], set_name: str) -> list[_Check]:
    """Column, null, blank, length, label-set and header checks of one row frame (train or test)."""
    data = params.data
    is_test = table == TEST_ROWS
    prefix, rows = ("test_", "test rows") if is_test else ("", "rows")
    header = f"({data.text_column!r}, {data.label_column!r})"
    checks = [
        _required_columns_check(params, table, rows),
        _row_count_check(
            "text_not_null",
            table,
            "ExpectColumnValuesToNotBeNull",
            {"column": v.TEXT},
            f"{rows} have a null text",
        ),
        _row_count_check(
            "text_not_empty",
            table,
            "ExpectColumnValuesToBeInSet",
            {"column": v.TEXT_BLANK, "value_set": [False]},
            f"{rows} have a text that is empty after removing whitespace and invisible characters",
        ),
        _text_length_check(params, table),
        _row_count_check(
            "label_not_null",
            table,
            "ExpectColumnValuesToNotBeNull",
            {"column": v.LABEL},
            f"{rows} have no label (null or blank)",
        ),
        _labels_in_set_check(table, rows, labels, set_name),
        _row_count_check(
            "header_rows",
            table,
            "ExpectColumnValuesToBeInSet",
            {"column": v.IS_HEADER, "value_set": [False]},
            f"{rows} repeat the header {header} as data, as concatenated CSV exports do: "
            "delete those rows",
        ),
    ]
    if is_test:
        # The tokenizer truncates long test texts like any served input: not a data error.
        checks = [check for check in checks if check.name != "text_length"]
    return [
        _Check(prefix + c.name, c.table, c.expectation, c.kwargs, c.summarise, c.examples)
        for c in checks
    ]


def _offending_classes(result: Result, frames: Frames) -> Examples:
    """The train classes Great Expectations lists as unexpected."""
    index = result.get("partial_unexpected_index_list") or []
    return v.class_examples(frames[TRAIN_CLASSES], index, EXAMPLES)


def _min_examples_check(params: Params) -> _Check:
    """Each declared (or inferred) class has validate.min_examples_per_class distinct texts."""
    need = params.validate_.min_examples_per_class

    def summarise(result: Result, frames: Frames) -> str:
        classes = frames[TRAIN_CLASSES]
        if classes.empty:
            return (
                f"No labelled rows, so there are no classes to count; required: {need} per class."
            )
        smallest = classes.loc[classes[v.N_DISTINCT_TEXTS].idxmin()]
        summary = (
            f"{result.get('unexpected_count', 0)} of {len(classes)} classes have fewer than {need} "
            f"distinct texts (smallest: {smallest[v.LABEL]!r} with "
            f"{smallest[v.N_DISTINCT_TEXTS]} in {smallest[v.N_EXAMPLES]} rows); required: at "
            f"least {need} per class (validate.min_examples_per_class; prepare drops repeated "
            "texts, then splits each class). Add examples, or merge or drop the small classes."
        )
        if 2 * len(classes) > classes[v.N_EXAMPLES].sum():
            summary += (
                f" With {len(classes)} labels over {classes[v.N_EXAMPLES].sum()} rows the label "
                "column looks like free text or row ids: check data.label_column and that the "
                "columns are not shifted."
            )
        return summary

    return _Check(
        "min_examples_per_class",
        TRAIN_CLASSES,
        "ExpectColumnValuesToBeBetween",
        {"column": v.N_DISTINCT_TEXTS, "min_value": need},
        summarise,
        _offending_classes,
    )


def _duplicate_rows(result: Result, frames: Frames) -> Examples:
    """Train rows that repeat an earlier row's text and label."""
    rows = frames[TRAIN_ROWS]
    return v.row_examples(rows, rows.index[rows[v.IS_DUPLICATE]], EXAMPLES)


def _duplicate_fraction_check(params: Params) -> _Check:
    """At most validate.max_duplicate_fraction of the train rows repeat an earlier row."""
    allowed = params.validate_.max_duplicate_fraction

    def summarise(result: Result, frames: Frames) -> str:
        rows = frames[TRAIN_ROWS]
        n_duplicates = int(rows[v.IS_DUPLICATE].sum())
        return (
            f"{n_duplicates} of {len(rows)} rows ({n_duplicates / len(rows):.1%}) repeat an "
            f"earlier row's text and label; allowed: at most {allowed:.1%}."
        )

    # The mean of a 0/1 column is the fraction itself: exact at the threshold, where
    # `mostly=1 - fraction` can miss by a rounding error.
    return _Check(
        "duplicate_fraction",
        TRAIN_ROWS,
        "ExpectColumnMeanToBeBetween",
        {"column": v.IS_DUPLICATE, "max_value": allowed},
        summarise,
        _duplicate_rows,
    )


def _conflicting_rows(result: Result, frames: Frames) -> Examples:
    """Train rows whose text appears with more than one label, grouped by text."""
    rows = frames[TRAIN_ROWS]
    return v.row_examples(rows, v.conflicting_rows(rows).index, EXAMPLES)


def _conflicting_labels_check(params: Params) -> _Check:
    """At most validate.max_conflicting_texts distinct texts appear with more than one label."""
    allowed = params.validate_.max_conflicting_texts

    def summarise(result: Result, frames: Frames) -> str:
        texts = frames[TRAIN_TEXTS]
        return (
            f"{int(texts[v.CONFLICTING].sum())} of {len(texts)} distinct texts appear with more "
            f"than one label; allowed: at most {allowed}."
        )

    return _Check(
        "conflicting_labels",
        TRAIN_TEXTS,
        "ExpectColumnSumToBeBetween",
        {"column": v.CONFLICTING, "max_value": allowed},
        summarise,
        _conflicting_rows,
    )


def _label_count(result: Result, frames: Frames) -> str:
    """Summary of `two_or_more_labels`: the distinct labels, or the one (or none) found."""
    found = sorted(frames[TRAIN_ROWS][v.LABEL].dropna().unique())
    if len(found) >= 2:
        return f"{len(found)} distinct labels; required: at least 2."
    named = f"only the label {found[0]!r}" if found else "no label at all"
    return (
        f"The labelled rows have {named}: a classifier needs at least 2 labels to learn "
        "anything; check data.label_column and that the export kept every class."
    )


def _dataset_checks(params: Params, has_test: bool, repairs: Repairs) -> list[_Check]:
    """Class-size, duplicate, conflict, label-count, majority-class and train/test overlap checks.

    Each looks at a whole file (or at train against test) rather than at single rows.
    """
    duplicates = _duplicate_fraction_check(params)
    checks = [
        _min_examples_check(params),
        _with_hint(duplicates, _repair_hint(repairs.duplicates_dropped, DUPLICATES)),
        _conflicting_labels_check(params),
        _Check(
            "two_or_more_labels",
            TRAIN_ROWS,
            "ExpectColumnUniqueValueCountToBeBetween",
            {"column": v.LABEL, "min_value": 2},
            _label_count,
            _no_examples,
        ),
    ]
    # A floor of 0 is no floor: no class share can meet it "for free".
    has_floor = params.gate.min_accuracy > 0
    if has_floor:
        checks.append(_majority_check(params, TRAIN_CLASSES, ""))
    if has_test:
        if has_floor:
            checks.append(_majority_check(params, TEST_CLASSES, "test_"))
        overlap = _row_count_check(
            "train_test_overlap",
            TRAIN_ROWS,
            "ExpectColumnValuesToBeInSet",
            {"column": v.IN_TEST, "value_set": [False]},
            "train rows have a text that also appears in the test file",
        )
        checks.append(_with_hint(overlap, _repair_hint(repairs.test_overlap_dropped, OVERLAP)))
    return checks


# Each repairable check: its policy param, and the rows `drop` removes.
OVERLAP = ("data.on_test_overlap", "train rows that were also in the test file")
DUPLICATES = ("data.on_duplicates", "exact duplicate train rows")


def _repair_hint(dropped: int, repair: tuple[str, str]) -> Callable[[bool], str]:
    """The sentence a repairable check ends with: what was dropped, or the param to set."""
    param, rows = repair

    def hint(success: bool) -> str:
        if dropped:
            return f" {dropped} {rows} were dropped first ({param}: drop)."
        return "" if success else f" Set {param}: drop to drop them from training."

    return hint


def _with_hint(check: _Check, hint: Callable[[bool], str]) -> _Check:
    """`check` with `hint(success)` appended to its summary."""

    def summarise(result: Result, frames: Frames) -> str:
        return check.summarise(result, frames) + hint(bool(result["success"]))

    return _Check(
        check.name, check.table, check.expectation, check.kwargs, summarise, check.examples
    )


def _majority_check(params: Params, table: str, prefix: str) -> _Check:
    """The largest class's share of labelled rows stays under the gate's accuracy floor.

    At or above it, a model that always answers that class passes the floor, so the accuracy
    gate would say nothing about what the model learnt.
    """
    floor = params.gate.min_accuracy

    def largest(frames: Frames) -> pd.Series:
        classes = frames[table]
        return classes.loc[classes[v.SHARE].idxmax()]

    def summarise(result: Result, frames: Frames) -> str:
        classes = frames[table]
        if not classes[v.N_EXAMPLES].any():
            return "No labelled rows, so there is no class to compare with gate.min_accuracy."
        top = largest(frames)
        share = (
            f"The largest class {top[v.LABEL]!r} holds {top[v.SHARE]:.1%} of "
            f"{classes[v.N_EXAMPLES].sum()} labelled rows"
        )
        if result["success"]:
            return f"{share}, under gate.min_accuracy ({floor:.1%})."
        return (
            f"{share}: always answering it would meet gate.min_accuracy ({floor:.1%}) without "
            f"learning anything; allowed: under {floor:.1%}. Add examples of the other classes "
            f"or down-sample {top[v.LABEL]!r}."
        )

    def examples(result: Result, frames: Frames) -> Examples:
        classes = frames[table]
        return [] if classes.empty else v.class_examples(classes, [classes[v.SHARE].idxmax()])

    return _Check(
        prefix + "majority_class_share",
        table,
        "ExpectColumnMaxToBeBetween",
        {"column": v.SHARE, "max_value": floor, "strict_max": True},
        summarise,
        examples,
    )


def _label_variants_check() -> _Check:
    """No two train labels differ only by case or surrounding whitespace."""

    def summarise(result: Result, frames: Frames) -> str:
        rows = frames[TRAIN_ROWS]
        aliases = v.suggest_label_aliases(rows[v.LABEL])
        summary = (
            f"{result.get('unexpected_count', 0)} of {len(rows)} rows have a label that differs "
            "from another only by case or surrounding whitespace; allowed: 0."
        )
        if aliases:
            shown = json.dumps(dict(list(aliases.items())[:EXAMPLES]), ensure_ascii=False)
            summary += f" Merge them with data.label_aliases, e.g. {shown}."
        return summary

    return _Check(
        "label_variants",
        TRAIN_ROWS,
        "ExpectColumnValuesToBeInSet",
        {"column": v.LABEL_VARIANT, "value_set": [False]},
        summarise,
        _unexpected_rows(TRAIN_ROWS),
    )


def _labels_known_check(name: str, table: str, labels: list[str], what: str, fix: str) -> _Check:
    """Every label a param names (in a file or a mapping) is one of the data's labels."""

    def summarise(result: Result, frames: Frames) -> str:
        found = sorted(set(frames[table][v.LABEL].dropna()) - set(labels))
        unknown = f" (unknown: {', '.join(map(repr, found[:EXAMPLES]))})" if found else ""
        summary = (
            f"{result.get('unexpected_count', 0)} of {len(frames[table])} {what} name a label "
            f"that is not in the data's label set{unknown}; allowed: 0."
        )
        return summary if result["success"] else f"{summary} {fix}"

    def examples(result: Result, frames: Frames) -> Examples:
        index = result.get("partial_unexpected_index_list") or []
        return v.row_examples(frames[table], index, EXAMPLES)

    return _Check(
        name,
        table,
        "ExpectColumnValuesToBeInSet",
        {"column": v.LABEL, "value_set": labels},
        summarise,
        examples,
    )


def _unknown_characters(tokenizer: Any, texts: pd.Series) -> UnknownCharacters:
    """What train.base_model's tokenizer cannot read in the (normalised) texts."""
    return unknown_characters(tokenizer, [t for t in texts.dropna().map(normalise_text) if t])


def _tokenizer_check(params: Params, unknown: UnknownCharacters) -> _Check:
    """At most validate.max_unknown_char_share of the texts' characters are unknown tokens.

    An encoder reads an unknown token as one and the same symbol whatever the character: a
    model trained on such text learns from the rest, or from nothing (Chinese text through
    an English vocabulary).
    """
    allowed, base = params.validate_.max_unknown_char_share, params.train.base_model

    def summarise(result: Result, frames: Frames) -> str:
        found = (
            f"{unknown.n_unknown} of {unknown.n_chars} characters ({unknown.share:.1%}) of the "
            f"texts are unknown to the tokenizer of train.base_model ({base}); allowed: at "
            f"most {allowed:.1%} (validate.max_unknown_char_share)."
        )
        if result["success"]:
            return found
        return (
            f"{found} The model would see them all as one symbol. Most are "
            f"{', '.join(unknown.scripts) or 'not letters'}: set train.base_model to an "
            f"encoder that reads them, e.g. {suggested_base_model(unknown.scripts)}."
        )

    def examples(result: Result, frames: Frames) -> Examples:
        return [{"character": char, "count": count} for char, count in unknown.top[:EXAMPLES]]

    return _Check(
        "tokenizer_coverage",
        TOKENIZER,
        "ExpectColumnMaxToBeBetween",
        {"column": UNKNOWN_SHARE, "max_value": allowed},
        summarise,
        examples,
    )


def _truncation_check(params: Params) -> _Check:
    """At most validate.max_truncated_fraction of train texts exceed train.max_length tokens."""
    allowed, max_length = params.validate_.max_truncated_fraction, params.train.max_length

    def summarise(result: Result, frames: Frames) -> str:
        rows = frames[TRAIN_ROWS]
        cut = int(rows[v.TRUNCATED].sum())
        summary = (
            f"{cut} of {len(rows)} texts ({cut / max(len(rows), 1):.1%}) are longer than "
            f"train.max_length={max_length} tokens of {params.train.base_model} and would be "
            f"cut in training and serving; allowed: at most {allowed:.1%} "
            "(validate.max_truncated_fraction)."
        )
        if not result["success"]:
            summary += (
                " Raise train.max_length (slower; at most the base model's own limit), or "
                "split long texts into shorter ones before training."
            )
        return summary

    def examples(result: Result, frames: Frames) -> Examples:
        rows = frames[TRAIN_ROWS]
        return v.row_examples(rows, rows.index[rows[v.TRUNCATED]], EXAMPLES)

    return _Check(
        "text_tokens",
        TRAIN_ROWS,
        "ExpectColumnMeanToBeBetween",
        {"column": v.TRUNCATED, "max_value": allowed},
        summarise,
        examples,
    )


def _params_checks(params: Params, labels: list[str], tokenized: bool) -> list[_Check]:
    """What params name that the data must match: must-pass labels, recall-floor labels, and
    (with the base model's tokenizer) the share of texts the tokenizer would cut."""
    must_pass = params.evaluate.must_pass_file
    checks = [
        _label_variants_check(),
        _labels_known_check(
            "must_pass_labels",
            MUST_PASS,
            labels,
            f"must-pass cases in {must_pass} (evaluate.must_pass_file)",
            "Fix those cases, or point evaluate.must_pass_file at this data's own cases.",
        ),
        _labels_known_check(
            "class_recall_floor_labels",
            RECALL_FLOORS,
            labels,
            "labels of gate.class_recall_floors",
            "Name this data's labels in gate.class_recall_floors.",
        ),
    ]
    if tokenized:
        checks.append(_truncation_check(params))
    return checks


def _quiet_great_expectations() -> None:
    """Switch off usage statistics before Great Expectations is imported."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")


def _run_expectations(checks: list[_Check], frames: Frames) -> dict[str, Result]:
    """Validate each frame with its suite in an ephemeral context.

    No Data Docs: their pages load Bootstrap, jQuery and Vega from CDNs and render blank
    offline; `render_html` writes the report page instead.

    Returns:
        The `result` dict of each check by name, with `success` and `exception` added.
    """
    _quiet_great_expectations()
    import great_expectations as gx
    import great_expectations.expectations as gxe
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    source = context.data_sources.add_pandas("textgate")
    results: dict[str, Result] = {}
    for table, frame in frames.items():
        table_checks = [check for check in checks if check.table == table]
        if not table_checks:
            continue
        batch = source.add_dataframe_asset(table).add_batch_definition_whole_dataframe(table)
        suite = context.suites.add(gx.ExpectationSuite(name=table))
        for check in table_checks:
            kind = getattr(gxe, check.expectation)
            suite.add_expectation(kind(meta={"name": check.name}, **check.kwargs))
        definition = context.validation_definitions.add(
            gx.ValidationDefinition(name=table, data=batch, suite=suite)
        )
        outcome = definition.run(
            batch_parameters={"dataframe": frame},
            result_format={"result_format": "SUMMARY", "partial_unexpected_count": EXAMPLES},
        )
        for item in outcome.results:
            info = item.exception_info or {}
            results[item.expectation_config.meta["name"]] = {
                **item.result,
                "success": bool(item.success),
                "exception": info.get("exception_message")
                if info.get("raised_exception")
                else None,
            }
    return results


def _check_result(check: _Check, result: Result, frames: Frames) -> v.CheckResult:
    """Word one Great Expectations result as a report entry."""
    if result["exception"]:
        summary = f"Could not be evaluated: {result['exception']}"
        return v.CheckResult(check.name, False, summary, [])
    examples = [] if result["success"] else check.examples(result, frames)
    return v.CheckResult(check.name, result["success"], check.summarise(result, frames), examples)


def _base_model_check(params: Params) -> tuple[Any | None, v.CheckResult]:
    """The base model's tokenizer (None if it cannot be loaded) and the check saying so."""
    from textgate.model import load_tokenizer

    name = params.train.base_model
    try:
        tokenizer = load_tokenizer(name)
    except ConfigError as error:
        summary = (
            f"{error}. Set train.base_model to a local model directory, a hub id this machine "
            "can download (or has cached), or bundled:all-MiniLM-L6-v2."
        )
        return None, v.CheckResult("base_model_available", False, summary)
    summary = f"train.base_model {name!r} loads (its config and tokenizer)."
    return tokenizer, v.CheckResult("base_model_available", True, summary)


def _read_data(params: Params) -> tuple[pd.DataFrame, pd.DataFrame | None, Repairs, int]:
    """The train and test files with the declared repairs applied, and the train rows read."""
    data = params.data
    train = read_training(data)
    test = None
    if data.test_path is not None:
        test = read_labelled(data.test_path, data.text_column, data.label_column, data.encoding)
    repaired, test, repairs = repair_data(train, test, data)
    return repaired, test, repairs, len(train)


def _must_pass_frame(params: Params) -> pd.DataFrame:
    path = params.evaluate.must_pass_file
    if not path.is_file():
        raise DataError(
            f"evaluate.must_pass_file {path} not found: `textgate init` starts one, or point "
            "the param at your file of must-pass cases (columns text,label)"
        )
    cases = read_cases(path)
    return cases.assign(label=v.normalise_labels(cases[v.LABEL]))


def _frames(
    params: Params, train: pd.DataFrame, test: pd.DataFrame | None, tokenizer: Any | None
) -> Frames:
    """Every frame the checks run on (test ones only with a test file)."""
    data = params.data
    header = (data.text_column, data.label_column)
    rows = v.row_features(train, () if test is None else test[v.TEXT], header)
    if tokenizer is not None:
        keys = rows[v.TEXT_KEY].fillna("").tolist()
        lengths = pd.Series(v.token_lengths(tokenizer, keys), index=rows.index)
        rows[v.TRUNCATED] = (lengths > params.train.max_length) & rows[v.TEXT_KEY].notna()
    named = list(params.gate.class_recall_floors)
    floors = pd.DataFrame({v.TEXT: ["(a recall floor)"] * len(named), v.LABEL: named}, dtype=object)
    frames: Frames = {
        TRAIN_ROWS: rows,
        TRAIN_TEXTS: v.text_conflicts(rows),
        MUST_PASS: _must_pass_frame(params),
        RECALL_FLOORS: floors,
    }
    if test is not None:
        frames[TEST_ROWS] = v.row_features(test, header=header)
        frames[TEST_CLASSES] = v.class_features(frames[TEST_ROWS], data.labels)
    return frames


def run(params: Params) -> v.ValidationReport:
    """Validate the raw train (and test) data with Great Expectations; exit 1 on a failed check."""
    data, outputs = params.data, validate_outputs(params)
    # Outputs of an earlier run must not outlive a run that stops on bad input.
    for path in (outputs.report, outputs.page):
        path.unlink(missing_ok=True)
    train, test, repairs, n_rows = _read_data(params)
    if data.labels is not None:
        labels, label_source = list(data.labels), "declared"
    else:
        labels, label_source = v.infer_labels(train[v.LABEL]), "inferred"
    tokenizer, model_check = _base_model_check(params)
    frames = _frames(params, train, test, tokenizer)
    counts = v.class_features(frames[TRAIN_ROWS], data.labels)
    # Undeclared labels already fail `labels_in_set`; their size is not checked again.
    frames[TRAIN_CLASSES] = counts[counts[v.LABEL].isin(labels)].reset_index(drop=True)
    checks = _row_checks(params, TRAIN_ROWS, labels, f"{label_source} label set")
    if test is not None:
        checks += _row_checks(params, TEST_ROWS, labels, f"training label set ({label_source})")
    checks += _dataset_checks(params, has_test=test is not None, repairs=repairs)
    checks += _params_checks(params, labels, tokenized=tokenizer is not None)
    if tokenizer is not None:
        texts = train[v.TEXT] if test is None else pd.concat([train[v.TEXT], test[v.TEXT]])
        unknown = _unknown_characters(tokenizer, texts)
        frames[TOKENIZER] = pd.DataFrame({UNKNOWN_SHARE: [unknown.share]})
        checks.append(_tokenizer_check(params, unknown))
    results = _run_expectations(checks, frames)
    report = v.ValidationReport(
        n_rows=n_rows,
        n_test_rows=None if test is None else len(test),
        labels=labels,
        label_source=label_source,
        class_counts=dict(zip(counts[v.LABEL], map(int, counts[v.N_EXAMPLES]), strict=True)),
        checks=[_check_result(c, results[c.name], frames) for c in checks] + [model_check],
        repairs=repairs.as_dict(),
    )
    write_artifact(ValidationReport, outputs.report, report.to_dict())
    with atomic_path(outputs.page) as tmp:
        tmp.write_text(v.render_html(report), encoding="utf-8")
    if not report.success:
        raise StageFailed(
            f"{v.format_failures(report)}\nDetails: {outputs.report} and {outputs.page}"
        )
    return report


if __name__ == "__main__":
    sys.exit(stage_main("validate", run))
