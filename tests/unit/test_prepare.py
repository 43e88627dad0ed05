import pandas as pd
import pytest

from textgate.errors import DataError
from textgate.pii import PII_KINDS
from textgate.prepare import clean_frame, stratified_split
from textgate.text import TextCleaning


def cleaning(redact: bool) -> TextCleaning:
    return TextCleaning(redact_pii=redact, phone_regions=("CN", "US", "GB"), chinese_script=None)


def frame(rows):
    return pd.DataFrame(rows, columns=["text", "label"])


def test_clean_frame_drops_duplicates_after_normalising():
    cleaned, stats = clean_frame(
        frame([("Hi  there", "a"), ("Hi there", "a"), ("   ", "b"), ("x@y.com", "b")]),
        cleaning(True),
    )
    assert cleaned.to_dict("records") == [
        {"text": "Hi there", "label": "a"},
        {"text": "[EMAIL]", "label": "b"},
    ]
    assert (stats.rows_in, stats.rows_out, stats.duplicates_dropped, stats.empty_dropped) == (
        4,
        2,
        1,
        1,
    )
    assert stats.pii_redacted == {**dict.fromkeys(PII_KINDS, 0), "email": 1}


def test_clean_frame_without_redaction_keeps_pii():
    cleaned, stats = clean_frame(frame([("x@y.com", "b")]), cleaning(False))
    assert cleaned["text"].tolist() == ["x@y.com"]
    assert stats.pii_redacted == dict.fromkeys(PII_KINDS, 0)


@pytest.mark.parametrize("seed", [0, 1, 42])
def test_stratified_split_keeps_every_class_in_every_part(seed):
    rows = [(f"text {label} {i}", label) for label in "abc" for i in range(20)]
    parts = stratified_split(frame(rows), {"val": 0.1, "test": 0.2}, seed)
    assert list(parts) == ["train", "val", "test"]
    assert sum(len(part) for part in parts.values()) == 60
    for part in parts.values():
        assert set(part["label"]) == {"a", "b", "c"}
    assert len(parts["test"]) == 12 and len(parts["val"]) == 6
    texts = [set(part["text"]) for part in parts.values()]
    assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])
    again = stratified_split(frame(rows), {"val": 0.1, "test": 0.2}, seed)
    assert all(again[name].equals(parts[name]) for name in parts)


def test_stratified_split_names_classes_too_small_to_split():
    rows = [(f"t{i}", "big") for i in range(20)] + [("only one", "tiny"), ("two", "tiny")]
    with pytest.raises(DataError, match="fewer than 3 examples: {'tiny': 2}"):
        stratified_split(frame(rows), {"val": 0.1, "test": 0.2}, 0)
