"""textgate.tokenizer.FastTokenizer gives the ids transformers' tokenizer gives."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from textgate.errors import DataError
from textgate.tokenizer import TOKENIZER_FILE, FastTokenizer

TEXTS = [
    "I lost my card yesterday",
    "x",
    "",
    "password reset does not work " * 20,  # truncated
    "Ünïcödé ß café 東京 😀 \u200b tab\there",
    "  lots   of   spaces  ",
    "[MASK] and [CLS] are special tokens",
    "don't can't won't",
    "ÉCOLE naïve résumé",
]


@pytest.fixture(scope="module")
def tokenizers(tiny_model_dir: Path) -> tuple[FastTokenizer, object]:
    return FastTokenizer(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.mark.parametrize("max_length", [8, 32, 512])
def test_a_batch_gets_the_ids_transformers_gives(tokenizers: tuple, max_length: int) -> None:
    fast, reference = tokenizers
    ours = fast(TEXTS, truncation=True, max_length=max_length)
    theirs = reference(TEXTS, truncation=True, max_length=max_length)
    assert set(ours) == set(theirs)
    for key in theirs:
        assert ours[key] == theirs[key], key
    assert max(map(len, ours["input_ids"])) <= max_length


@pytest.mark.parametrize("text", TEXTS)
def test_one_text_with_its_special_tokens_mask(tokenizers: tuple, text: str) -> None:
    fast, reference = tokenizers
    ours = fast(text, truncation=True, max_length=16, return_special_tokens_mask=True)
    theirs = reference(text, truncation=True, max_length=16, return_special_tokens_mask=True)
    assert {key: ours[key] for key in theirs} == dict(theirs)
    ids = ours["input_ids"]
    assert fast.convert_ids_to_tokens(ids) == reference.convert_ids_to_tokens(ids)


def test_the_truncation_of_one_call_does_not_leak_into_the_next(tokenizers: tuple) -> None:
    fast, reference = tokenizers
    fast(TEXTS[3], truncation=True, max_length=8)
    assert fast(TEXTS[3])["input_ids"] == reference(TEXTS[3])["input_ids"]


def test_special_token_ids(tokenizers: tuple) -> None:
    fast, reference = tokenizers
    assert fast.pad_token_id == reference.pad_token_id is not None
    assert fast.mask_token_id == reference.mask_token_id is not None


def test_a_model_without_tokenizer_json_is_named(tiny_model_dir: Path, tmp_path: Path) -> None:
    model_dir = shutil.copytree(tiny_model_dir, tmp_path / "model")
    (model_dir / TOKENIZER_FILE).unlink()
    with pytest.raises(DataError, match=f"no {TOKENIZER_FILE}.*torch runtime"):
        FastTokenizer(model_dir)
