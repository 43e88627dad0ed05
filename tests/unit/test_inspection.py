"""textgate init's core: encodings, columns, label variants, scripts and the params section."""

from __future__ import annotations

import pandas as pd
import pytest

from textgate.errors import DataError
from textgate.inspection import data_section, guess_columns, replace_section, script_shares
from textgate.io import detect_encoding
from textgate.repair import apply_label_aliases
from textgate.validation import label_variants, suggest_label_aliases

FRENCH = "text,label\ncafé crème à emporter,commande\nje n'ai pas reçu ma facture,facture\n"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("text,label\nhi,a\n".encode("utf-8-sig"), "utf-8-sig"),
        ("text,label\nhi,a\n".encode("utf-16"), "utf-16"),
        ("text,label\n你好,a\n".encode(), "utf-8"),
        (f"text,label\n{'我想查询一下我的账户余额，谢谢。' * 3},a\n".encode("gbk"), "gb18030"),
        (FRENCH.encode("latin-1"), "cp1252"),
    ],
    ids=["utf-8 bom", "utf-16 bom", "utf-8", "gbk", "latin-1"],
)
def test_detect_encoding(raw, expected):
    assert detect_encoding(raw) == expected


def test_columns_are_found_by_name_then_by_content():
    named = pd.DataFrame(
        {"id": ["1", "2"], "Message": ["hello there", "bye"], "Intent": ["a", "b"]}
    )
    assert guess_columns(named)[:2] == ("Message", "Intent")
    rows = 10
    unnamed = pd.DataFrame(
        {
            "c1": [str(i) for i in range(rows)],
            "c2": [f"a rather long message number {i}" for i in range(rows)],
            "c3": ["x", "y"] * (rows // 2),
        }
    )
    text, label, reason = guess_columns(unnamed)
    assert (text, label) == ("c2", "c3")
    assert "longest values" in reason and "fewest distinct values" in reason
    with pytest.raises(DataError, match="--label-column 'nope' is not a column"):
        guess_columns(named, label_column="nope")


def test_label_variants_merge_into_the_most_frequent_clean_spelling():
    labels = ["refund", "refund", "Refund ", "REFUND", "login", "Login", "Login", "card"]
    assert label_variants(labels) == {
        "refund": ["REFUND", "Refund ", "refund"],
        "Login": ["Login", "login"],
    }
    aliases = suggest_label_aliases(labels)
    assert aliases == {"REFUND": "refund", "Refund ": "refund", "login": "Login"}
    frame = pd.DataFrame({"text": list("abcdefgh"), "label": labels})
    merged, changed = apply_label_aliases(frame, aliases)
    assert changed == 3 and set(merged["label"]) == {"refund", "Login", "card"}


def test_script_shares_name_han_and_latin():
    shares = script_shares(["我想取消订单", "cancel"])
    assert set(shares) == {"Han", "Latin"} and shares["Han"] == pytest.approx(0.5)


def test_replace_section_keeps_every_other_byte():
    text = "# top\n\ndata:\n  a: 1  # old\n\n# about validate\nvalidate:\n  b: 2\n"
    values = {
        "raw_dir": "data/raw",
        "train_file": "t.csv",
        "test_file": None,
        "text_column": "body",
        "label_column": "queue",
        "labels": None,
        "out_of_scope_label": None,
        "encoding": "gb18030",
        "label_aliases": {"Refund ": "refund"},
        "on_duplicates": "fail",
        "on_test_overlap": "drop",
    }
    section = data_section(values, "textgate init: wrote this")
    out = replace_section(text, "data", section)
    assert out.startswith("# top\n\n# textgate init: wrote this\ndata:\n")
    assert out.endswith("\n# about validate\nvalidate:\n  b: 2\n")
    assert "    'Refund ': refund\n" in out and "  encoding: gb18030" in out
    assert replace_section(out, "data", section) == out
    with pytest.raises(DataError, match="no top-level `data:` section"):
        replace_section("validate:\n  b: 2\n", "data", section)
