import pandas as pd
import pytest

from textgate.errors import DataError
from textgate.io import read_json, read_labelled, sniff_delimiter, write_json


def test_read_labelled_csv_and_parquet(tmp_path):
    frame = pd.DataFrame({"message": ["hi", "yo"], "intent": ["a", "b"], "extra": [1, 2]})
    frame.to_csv(tmp_path / "d.csv", index=False)
    frame.to_parquet(tmp_path / "d.parquet")
    for name in ("d.csv", "d.parquet"):
        out = read_labelled(tmp_path / name, "message", "intent")
        assert out.to_dict("records") == [
            {"text": "hi", "label": "a"},
            {"text": "yo", "label": "b"},
        ]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "the file is empty"),
        (b"text,label\n", "has no rows"),
        (b"message,label\nhi,a\n", r"missing required column\(s\) \['text'\]"),
        (b"text,label\nhello \xff\xfe,refund\n", "not valid utf-8 at byte 17 \\(line 2\\)"),
    ],
)
def test_read_labelled_bad_input(tmp_path, content, message):
    path = tmp_path / "d.csv"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        read_labelled(path, "text", "label", encoding="utf-8")


def test_read_labelled_missing_file_and_bad_suffix(tmp_path):
    with pytest.raises(DataError, match="data file not found"):
        read_labelled(tmp_path / "none.csv", "text", "label")
    (tmp_path / "d.xls").write_bytes(b"x")
    with pytest.raises(DataError, match="unsupported file type '.xls'.*as .xlsx"):
        read_labelled(tmp_path / "d.xls", "text", "label")


def test_json_round_trip_and_corruption(tmp_path):
    write_json(tmp_path / "a" / "x.json", {"k": [1, 2]})
    assert read_json(tmp_path / "a" / "x.json") == {"k": [1, 2]}
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["x.json"]
    (tmp_path / "bad.json").write_text("{oops")
    with pytest.raises(DataError, match="corrupt"):
        read_json(tmp_path / "bad.json")


@pytest.mark.parametrize(
    "content",
    [
        "text;label\nhello, I lost my card;lost_card\nrefund please;refund\n",
        "text\tlabel\nhello, I lost my card\tlost_card\nrefund please\trefund\n",
        '\ufefftext;label\n"hello, I lost; my card";lost_card\nrefund please;refund\n',
    ],
    ids=["semicolon", "tab", "semicolon with bom and quotes"],
)
def test_read_labelled_reads_semicolon_and_tab_separated_csv(tmp_path, content):
    path = tmp_path / "d.csv"
    path.write_text(content, encoding="utf-8")
    out = read_labelled(path, "text", "label")
    assert out["label"].tolist() == ["lost_card", "refund"]
    assert out["text"].iloc[0].startswith("hello, I lost")


def test_read_labelled_keeps_commas_when_texts_hold_semicolons(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,label\na; b; c; d,x\ne; f,y\n", encoding="utf-8")
    out = read_labelled(path, "text", "label")
    assert out.to_dict("records") == [
        {"text": "a; b; c; d", "label": "x"},
        {"text": "e; f", "label": "y"},
    ]


@pytest.mark.parametrize(
    ("header", "delimiter"),
    [("text,label", ","), ("text;label", ";"), ("a\tb\tc", "\t"), ("a|b", "|"), ("text", ",")],
)
def test_sniff_delimiter_reads_the_header(header, delimiter):
    assert sniff_delimiter(f"{header}\nx;y,z\tw\n") == delimiter
