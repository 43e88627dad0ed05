import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from textgate.artifacts import TRAINING_FILE
from textgate.language import (
    CHINESE_BASE_MODEL,
    MULTILINGUAL_BASE_MODEL,
    has_case,
    language_of,
    suggested_base_model,
    unknown_characters,
)
from textgate.model import TextClassifier


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Where is my parcel?", True),
        ("где мой заказ", True),
        ("我的包裹还没到", False),
        ("我的iPhone坏了", False),
        ("注文がまだ届きません", False),
        ("مرحبا", False),
        ("12345 !!", False),
    ],
)
def test_has_case(text, expected):
    assert has_case(text) is expected


@pytest.mark.parametrize(
    ("text", "language"),
    [("退款", "zh"), ("환불해 주세요", "ko"), ("ちょっと", "ja"), ("hola", "en"), ("123", None)],
)
def test_language_of(text, language):
    assert language_of(text) == language


def test_unknown_characters_counts_what_the_tokenizer_maps_to_unk(tiny_base_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_base_model)  # the MiniLM (English) vocabulary
    english = unknown_characters(tokenizer, ["where is my parcel", "refund please"])
    assert (english.n_unknown, english.share) == (0, 0.0)
    chinese = unknown_characters(tokenizer, ["我想退款", "退款什么时候到账"])
    assert chinese.n_chars == 12
    assert chinese.share > 0.5
    assert ("退", 2) in chinese.top and chinese.scripts == {"han": chinese.n_unknown}
    assert unknown_characters(tokenizer, []).share == 0.0


def test_the_suggested_model_reads_the_unknown_scripts():
    assert suggested_base_model(["han"]) == CHINESE_BASE_MODEL
    assert suggested_base_model(["han", "devanagari"]) == MULTILINGUAL_BASE_MODEL
    assert suggested_base_model([]) == MULTILINGUAL_BASE_MODEL


def test_a_model_trained_on_simplified_chinese_serves_traditional_the_same(
    tiny_model_dir: Path, tmp_path: Path
):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    training = json.loads((model_dir / TRAINING_FILE).read_text(encoding="utf-8"))
    recorded = {"chinese_script": "simplified", "pii_phone_regions": ["CN"]}
    (model_dir / TRAINING_FILE).write_text(json.dumps(training | recorded), encoding="utf-8")
    classifier = TextClassifier(model_dir)
    traditional, simplified = "請幫我退款，電話13812345678", "请帮我退款,电话[PHONE]"
    assert classifier.cleaning.apply(traditional) == simplified
    logits = classifier.predict_logits([traditional, simplified], batch_size=2)
    np.testing.assert_allclose(logits[0], logits[1], rtol=1e-5)
    unconverted = TextClassifier(tiny_model_dir)
    assert unconverted.cleaning.apply(traditional) != simplified
