"""The pandas side of validation: derived columns, counts, examples and the failure message."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from tests.browser import remote_resources
from textgate import validation as v


def labelled(rows: list[tuple[object, object]]) -> pd.DataFrame:
    """A frame shaped like `read_labelled`'s: object columns, None for nulls."""
    return pd.DataFrame(rows, columns=[v.TEXT, v.LABEL], dtype=object)


@pytest.mark.parametrize(
    ("value", "key"),
    [
        ("Hello  world ", "Hello world"),
        ("ｆｕｌｌ\u200bwidth", "fullwidth"),
        ("Case Kept", "Case Kept"),
        ("   ", None),
        ("", None),
        (None, None),
    ],
)
def test_text_key(value, key):
    assert v.text_key(value) == key


def test_text_chars_strips_and_nulls_blank_and_missing():
    lengths = v.text_chars(pd.Series(["  ab ", "x", "", "  ", None, "a\u200b  b"], dtype=object))
    assert lengths.dtype == "float64"
    assert lengths.iloc[[0, 1, 5]].tolist() == [2.0, 1.0, 3.0]
    assert lengths.iloc[2:5].isna().all()


@pytest.mark.parametrize(
    ("value", "blank"),
    [("", True), ("  \t\n", True), ("\u200b \ufeff", True), (" a ", False), (None, False)],
)
def test_is_blank(value, blank):
    assert v.is_blank(pd.Series([value], dtype=object)).tolist() == [blank]


def test_normalise_labels_turns_blank_into_none_and_keeps_the_rest():
    labels = v.normalise_labels(pd.Series(["a", "", "  ", None, " b "], dtype=object))
    assert labels.tolist() == ["a", None, None, None, " b "]


def test_infer_labels_is_sorted_and_skips_missing():
    assert v.infer_labels(pd.Series(["b", "a", None, "", "b"], dtype=object)) == ["a", "b"]


def test_row_features_derived_columns():
    train = labelled(
        [
            ("hello there", "a"),  # 0
            ("hello there", "a"),  # 1 exact duplicate of 0
            ("Hello  there", "a"),  # 2 not an exact duplicate (spacing) but the same text key
            ("same words", "a"),  # 3 conflicts with 4 after normalising whitespace
            ("same  words ", "b"),  # 4
            ("   ", "b"),  # 5 blank
            (None, "b"),  # 6 null
            ("in the test", ""),  # 7 blank label, also in the test file
        ]
    )
    rows = v.row_features(train, test_texts=["in  the test", None, "unrelated"])
    assert list(rows.columns) == [
        v.TEXT,
        v.LABEL,
        v.TEXT_KEY,
        v.TEXT_CHARS,
        v.TEXT_BLANK,
        v.LABELS_PER_TEXT,
        v.IS_DUPLICATE,
        v.IN_TEST,
        v.IS_HEADER,
        v.LABEL_VARIANT,
    ]
    assert rows[v.IS_DUPLICATE].tolist() == [False, True, False, False, False, False, False, False]
    assert rows[v.LABELS_PER_TEXT].tolist() == [1, 1, 1, 2, 2, 0, 0, 0]
    assert rows[v.TEXT_BLANK].tolist() == [False] * 5 + [True, False, False]
    assert rows[v.IN_TEST].tolist() == [False] * 7 + [True]
    assert rows.at[7, v.LABEL] is None
    assert rows.at[2, v.TEXT_KEY] == "Hello there"
    assert math.isnan(rows.at[5, v.TEXT_CHARS])


def test_row_features_without_test_file_marks_nothing_in_test():
    rows = v.row_features(labelled([("a b", "x"), ("c d", "y")]))
    assert not rows[v.IN_TEST].any()
    assert not rows[v.IS_HEADER].any()


def test_row_features_marks_rows_that_repeat_the_header():
    frame = labelled([("Message", " Intent"), ("message", "refund"), (None, "intent")])
    rows = v.row_features(frame, header=("message", "intent"))
    assert rows[v.IS_HEADER].tolist() == [True, False, False]


def test_class_features_count_distinct_texts_and_shares():
    frame = labelled(
        [("x y", "a"), ("x  y", "a"), ("z", "a"), ("  ", "a"), ("w", "b"), ("q", None)]
    )
    classes = v.class_features(v.row_features(frame), declared=["a", "b", "c"])
    assert classes[v.LABEL].tolist() == ["a", "b", "c"]
    assert classes[v.N_EXAMPLES].tolist() == [4, 1, 0]
    assert classes[v.N_DISTINCT_TEXTS].tolist() == [2, 1, 0]  # blank and repeated texts drop
    assert classes[v.SHARE].tolist() == [0.8, 0.2, 0.0]  # of the 5 labelled rows


def test_class_features_of_no_labelled_rows_has_no_shares():
    classes = v.class_features(v.row_features(labelled([("x", None)])))
    assert classes.empty
    assert list(classes.columns) == [v.LABEL, v.N_EXAMPLES, v.N_DISTINCT_TEXTS, v.SHARE]


@pytest.mark.parametrize(
    ("labels", "declared", "expected"),
    [
        (["b", "a", "b"], None, {"a": 1, "b": 2}),
        (["b", "a", "b", None, ""], None, {"a": 1, "b": 2}),
        (["b", "b"], ["b", "a"], {"b": 2, "a": 0}),  # a declared class without rows counts 0
        (["z", "b"], ["b"], {"b": 1, "z": 1}),  # undeclared labels follow, sorted
        ([None], None, {}),
    ],
)
def test_class_counts(labels, declared, expected):
    counts = v.class_counts(pd.Series(labels, dtype=object), declared)
    assert list(counts.columns) == [v.LABEL, v.N_EXAMPLES]
    assert dict(zip(counts[v.LABEL], counts[v.N_EXAMPLES], strict=True)) == expected
    assert list(counts[v.LABEL]) == list(expected)
    assert list(counts.index) == list(range(len(expected)))


def test_text_conflicts_counts_texts_with_several_labels():
    rows = v.row_features(
        labelled([("x y", "a"), ("x  y", "b"), ("x y", "a"), ("z", "a"), ("  ", "b"), (None, "a")])
    )
    texts = v.text_conflicts(rows)
    assert texts[v.TEXT_KEY].tolist() == ["x y", "z"]
    assert texts[v.N_LABELS].tolist() == [2, 1]
    assert texts[v.CONFLICTING].tolist() == [1, 0]
    assert int(texts[v.CONFLICTING].sum()) == 1


def test_text_conflicts_of_no_texts_is_empty():
    texts = v.text_conflicts(v.row_features(labelled([(None, "a")])))
    assert texts.empty
    assert int(texts[v.CONFLICTING].sum()) == 0


def test_conflicting_rows_groups_by_first_appearance():
    rows = v.row_features(
        labelled([("b b", "1"), ("a a", "1"), ("ok", "1"), ("a a", "2"), ("b b", "2")])
    )
    assert v.conflicting_rows(rows).index.tolist() == [0, 4, 1, 3]


def test_row_examples_use_row_index_and_keep_nulls():
    rows = v.row_features(labelled([("a", "x"), (None, "y"), ("c", "")]))
    assert v.row_examples(rows, [1, 2, 0], limit=2) == [
        {"row": 1, "text": None, "label": "y"},
        {"row": 2, "text": "c", "label": None},
    ]


def test_class_examples():
    classes = v.class_counts(pd.Series(["a", "b", "b"], dtype=object))
    assert v.class_examples(classes, [0]) == [{"label": "a", "n_examples": 1}]


def make_report(*checks: v.CheckResult) -> v.ValidationReport:
    return v.ValidationReport(
        n_rows=3,
        n_test_rows=None,
        labels=["a"],
        label_source="inferred",
        class_counts={"a": 3},
        checks=list(checks),
    )


def test_report_dict_shape_and_success():
    ok = v.CheckResult("text_not_null", True, "0 of 3 rows have a null text; allowed: 0.")
    report = make_report(ok)
    assert report.success
    assert report.to_dict() == {
        "success": True,
        "n_rows": 3,
        "n_test_rows": None,
        "labels": ["a"],
        "label_source": "inferred",
        "class_counts": {"a": 3},
        "checks": [
            {
                "name": "text_not_null",
                "success": True,
                "summary": "0 of 3 rows have a null text; allowed: 0.",
                "examples": [],
            }
        ],
        "repairs": {},
    }
    assert list(report.to_dict()) == [
        "success",
        "n_rows",
        "n_test_rows",
        "labels",
        "label_source",
        "class_counts",
        "checks",
        "repairs",
    ]


@pytest.mark.parametrize(
    ("text", "max_chars", "expected"),
    [("short", 80, "short"), ("x" * 80, 80, "x" * 80), ("x" * 81, 80, "x" * 79 + "…")],
)
def test_clip(text, max_chars, expected):
    assert v.clip(text, max_chars) == expected
    assert len(v.clip(text, max_chars)) <= max_chars


def test_format_failures_lists_failed_checks_with_three_examples_each():
    long_text = "word " * 40
    rows = [{"row": i, "text": f"text {i}", "label": "a"} for i in range(5)]
    report = make_report(
        v.CheckResult("text_not_null", True, "fine."),
        v.CheckResult(
            "text_length",
            False,
            "1 of 3 texts too long.",
            [{"row": 7, "text": long_text, "label": "a"}],
        ),
        v.CheckResult("duplicate_fraction", False, "5 of 3 rows.", rows),
        v.CheckResult("text_not_empty", False, "null.", [{"row": 2, "text": None, "label": None}]),
        v.CheckResult("min_examples_per_class", False, "small.", [{"label": "b", "n_examples": 1}]),
    )
    message = v.format_failures(report)
    lines = message.splitlines()
    assert lines[0] == "4 of 5 data checks failed (rows are 0-based):"
    assert "text_not_null" not in message
    assert "- text_length: 1 of 3 texts too long." in lines
    assert f"    row 7 [label 'a']: \"{long_text[:79]}…\"" in lines
    assert "text 2" in message and "text 3" not in message  # at most 3 rows per check
    assert "    row 2 [label None]: <null>" in lines
    assert "    class 'b': 1 example(s)" in lines


def test_the_report_page_escapes_the_data_and_loads_nothing_remote():
    hostile = '<script src="https://cdn.example.com/x.js"></script>'
    page = v.render_html(
        make_report(
            v.CheckResult("text_length", True, "0 of 3 texts are too long; allowed: 0."),
            v.CheckResult(
                "text_not_empty",
                False,
                "1 of 3 rows are blank; allowed: 0.",
                [{"row": 4, "text": hostile, "label": "refund"}],
            ),
        )
    )
    assert 'Data validation: <span class="failed">failed</span>' in page
    assert "1 of 2 checks passed" in page
    assert '<td>text_not_empty</td><td><span class="failed">failed</span>' in page
    assert "row 4 [label &#x27;refund&#x27;]" in page
    assert "<script" not in page
    assert remote_resources(page) == []
