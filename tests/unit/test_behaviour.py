import random
import re

import pytest
from pydantic import ValidationError

from textgate.behaviour import (
    PERTURBATIONS,
    MustPassCase,
    invariance,
    load_must_pass,
    must_pass,
    perturb,
)
from textgate.errors import DataError
from textgate.language import GREETINGS, NEGATION_CHARS, NEGATION_WORDS, SIGN_OFFS

LABELS = ["refund", "delivery", "account"]
KEYWORDS = {"refund": 0, "money back": 0, "parcel": 1, "delivery": 1, "password": 2}
PLACEHOLDER = re.compile(r"\[[A-Z]+\]")
# As evaluate.behaviour_examples and evaluate.seed give them.
SAMPLE = {"max_examples": 500, "seed": 0}

TEXTS = [
    "I want a refund for order 1234, please.",
    "Email me at [EMAIL] about the refund on my [CARD]",
    "where is my parcel? call [PHONE] today",
    "¿Dónde está mi reembolso? Necesito ayuda…",
    "can't reset my password (again)",
    "The delivery never arrived!!",
]


def keyword_label(text: str, case_sensitive: bool = False) -> int:
    haystack = text if case_sensitive else text.lower()
    for keyword, label in KEYWORDS.items():
        if keyword in haystack:
            return label
    return 2


def keyword_model(texts: list[str]) -> list[int]:
    return [keyword_label(text) for text in texts]


def case_sensitive_model(texts: list[str]) -> list[int]:
    """Only recognises lower-case keywords: casing changes flip its predictions."""
    return [keyword_label(text, case_sensitive=True) for text in texts]


class CountingModel:
    def __init__(self, predict):
        self.predict = predict
        self.calls: list[list[str]] = []

    def __call__(self, texts: list[str]) -> list[int]:
        self.calls.append(list(texts))
        return self.predict(texts)


def many_texts(n: int) -> list[str]:
    stems = ["i need a refund for order", "my parcel is late, order", "reset password for user"]
    return [f"{stems[i % 3]} {i}" for i in range(n)]


# --- perturb -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", PERTURBATIONS)
@pytest.mark.parametrize("text", TEXTS)
def test_each_perturbation_changes_the_text_and_keeps_placeholders(kind, text):
    rng = random.Random(0)
    for _ in range(25):
        out = perturb(text, kind, rng)
        assert out is not None
        assert out != text
        assert PLACEHOLDER.findall(out) == PLACEHOLDER.findall(text)


def test_perturb_is_seeded():
    first = [perturb(text, kind, random.Random(3)) for text in TEXTS for kind in PERTURBATIONS]
    again = [perturb(text, kind, random.Random(3)) for text in TEXTS for kind in PERTURBATIONS]
    assert first == again


def test_casing_variants_only_change_case():
    text = "Don't charge my [CARD] twice"
    rng = random.Random(0)
    outs = {perturb(text, "casing", rng) for _ in range(60)}
    assert outs == {
        "don't charge my [CARD] twice",
        "DON'T CHARGE MY [CARD] TWICE",
        "Don't Charge My [CARD] Twice",  # not str.title()'s "Don'T"
    }  # swapping the first letter's case gives the lower-case text, counted once


def test_punctuation_strips_unicode_punctuation_or_appends_a_mark():
    text = "¿Dónde está mi reembolso? [EMAIL]…"
    rng = random.Random(0)
    outs = {perturb(text, "punctuation", rng) for _ in range(60)}
    assert outs == {
        "Dónde está mi reembolso [EMAIL]",
        text + "?",
        text + "!",
        text + "...",
    }


def test_typo_changes_one_word_of_four_or_more_letters_by_one_edit():
    text = "my card at [EMAIL] was charged twice"
    rng = random.Random(0)
    for _ in range(50):
        out = perturb(text, "typos", rng)
        before, after = text.split(), out.split()
        changed = [(b, a) for b, a in zip(before, after, strict=True) if b != a]
        assert len(changed) == 1
        original, typo = changed[0]
        assert len(original) >= 4 and original != "[EMAIL]"
        assert abs(len(original) - len(typo)) <= 1
        assert sorted(original) == sorted(typo) or len(original) != len(typo)


def test_filler_adds_a_greeting_and_or_a_sign_off_around_the_text():
    text = "where is my parcel"
    rng = random.Random(0)
    outs = [perturb(text, "filler", rng) for _ in range(60)]
    for out in outs:
        assert text in out
        prefix, _, suffix = out.partition(text)
        assert prefix in ("", *GREETINGS["en"]) and suffix in ("", *SIGN_OFFS["en"])
        assert prefix or suffix
    assert any(out.startswith(text) for out in outs)  # suffix only
    assert any(out.endswith(text) for out in outs)  # prefix only
    assert any(not out.startswith(text) and not out.endswith(text) for out in outs)  # both


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("123 456", "casing"),
        ("[EMAIL] [CARD]", "casing"),  # the only letters are in placeholders
        ("hi, ok me", "typos"),  # no word of 4+ letters
        ("[EMAIL] [PHONE]", "typos"),
        ("   ", "filler"),
        ("", "punctuation"),
    ],
)
def test_perturb_returns_none_when_it_cannot_change_the_text(text, kind):
    assert perturb(text, kind, random.Random(0)) is None


def test_perturb_rejects_an_unknown_kind():
    with pytest.raises(ValueError, match="unknown perturbation 'emoji'"):
        perturb("hello", "emoji", random.Random(0))


# --- invariance --------------------------------------------------------------------------


def test_case_insensitive_model_is_invariant_to_casing_punctuation_and_filler():
    results = invariance(keyword_model, TEXTS, **SAMPLE)
    assert list(results) == list(PERTURBATIONS)
    for kind in ("casing", "punctuation", "filler"):
        assert results[kind].rate == 1.0
        assert results[kind].n == len(TEXTS)
        assert results[kind].failures == []


def test_case_sensitive_model_fails_casing_invariance_and_lists_failures():
    texts = many_texts(30)
    results = invariance(case_sensitive_model, texts, **SAMPLE)
    casing = results["casing"]
    assert casing.n == 30
    assert casing.rate is not None and casing.rate < 1.0
    assert 1 <= len(casing.failures) <= 5
    for original, perturbed in casing.failures:
        assert original in texts
        assert perturbed.lower() == original.lower() and perturbed != original
        assert case_sensitive_model([perturbed]) != case_sensitive_model([original])
    assert results["filler"].rate == 1.0


def test_invariance_compares_with_the_models_own_prediction_not_the_gold_label():
    results = invariance(lambda texts: [7] * len(texts), TEXTS, **SAMPLE)  # constant, always wrong
    assert all(result.rate == 1.0 for result in results.values())


def test_invariance_predicts_originals_once_and_each_kind_once():
    model = CountingModel(keyword_model)
    invariance(model, TEXTS, **SAMPLE)
    assert len(model.calls) == 1 + len(PERTURBATIONS)
    assert model.calls[0] == TEXTS


def test_invariance_samples_at_most_max_examples_with_the_seed():
    texts = many_texts(200)
    model = CountingModel(keyword_model)
    results = invariance(model, texts, kinds=("filler",), max_examples=20, seed=1)
    assert len(model.calls[0]) == 20 and len(set(model.calls[0])) == 20
    assert results["filler"].n == 20
    assert results == invariance(keyword_model, texts, kinds=("filler",), max_examples=20, seed=1)
    other = CountingModel(keyword_model)
    invariance(other, texts, kinds=("filler",), max_examples=20, seed=2)
    assert other.calls[0] != model.calls[0]


def test_invariance_rate_is_none_when_nothing_can_be_perturbed():
    model = CountingModel(keyword_model)
    results = invariance(model, ["hi", "ok [EMAIL]"], kinds=("typos",), **SAMPLE)
    assert results["typos"].model_dump() == {
        "kind": "typos",
        "rate": None,
        "n": 0,
        "not_applicable": 2,
        "failures": [],
    }
    assert len(model.calls) == 1  # no predict call for an empty batch
    assert invariance(model, [], kinds=("casing",), **SAMPLE)["casing"].rate is None


def test_invariance_rejects_unknown_kinds_and_wrong_prediction_counts():
    with pytest.raises(ValueError, match=r"unknown perturbation\(s\) \['emoji'\]"):
        invariance(keyword_model, TEXTS, kinds=("casing", "emoji"), **SAMPLE)
    with pytest.raises(ValueError, match="predict returned 1 predictions for 6 texts"):
        invariance(lambda texts: [0], TEXTS, **SAMPLE)


def test_invariance_result_is_frozen():
    result = invariance(keyword_model, TEXTS, kinds=("casing",), **SAMPLE)["casing"]
    with pytest.raises(ValidationError):
        result.rate = 0.0


# --- must-pass ---------------------------------------------------------------------------


def write(tmp_path, content: str):
    path = tmp_path / "must_pass.csv"
    path.write_text(content, encoding="utf-8")
    return path


def test_load_must_pass_reads_cases(tmp_path):
    path = write(tmp_path, 'text,label\n"I want my money back, now",refund\nwhere is it,delivery\n')
    assert load_must_pass(path, LABELS) == [
        MustPassCase(text="I want my money back, now", label="refund"),
        MustPassCase(text="where is it", label="delivery"),
    ]


def test_load_must_pass_names_the_line_of_an_unknown_label(tmp_path):
    path = write(tmp_path, "text,label\nrefund me,refund\nlost parcel,shipping\n")
    with pytest.raises(DataError) as error:
        load_must_pass(path, LABELS)
    message = str(error.value)
    assert str(path) in message
    assert "line 3: unknown label 'shipping'" in message
    assert "known labels: refund, delivery, account" in message


def test_load_must_pass_names_every_line_with_an_empty_text(tmp_path):
    path = write(tmp_path, "text,label\nrefund me,refund\n,refund\n   ,account\n")
    with pytest.raises(DataError, match="2 invalid must-pass case") as error:
        load_must_pass(path, LABELS)
    message = str(error.value)
    assert "line 3: empty text" in message and "line 4: empty text" in message
    assert "known labels" not in message


def test_load_must_pass_rejects_a_file_without_the_columns(tmp_path):
    path = write(tmp_path, "text,intent\nhi,refund\n")
    with pytest.raises(DataError, match="missing column") as error:
        load_must_pass(path, LABELS)
    assert str(path) in str(error.value)


def test_load_must_pass_skips_comments_and_accepts_a_file_with_no_cases_yet(tmp_path):
    assert load_must_pass(write(tmp_path, "# fill me\ntext,label\n"), LABELS) == []
    path = write(tmp_path, "# the cases\ntext,label\n# one\nrefund me,refund\nlost,shipping\n")
    with pytest.raises(DataError, match="line 5: unknown label 'shipping'"):
        load_must_pass(path, LABELS)


def test_load_must_pass_missing_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_must_pass(tmp_path / "nope.csv", LABELS)


def label_model(texts: list[str]) -> list[str]:
    return [LABELS[keyword_label(text)] for text in texts]


def test_must_pass_reports_rate_and_failures():
    cases = [
        MustPassCase("please refund me", "refund"),
        MustPassCase("where is my parcel", "delivery"),
        MustPassCase("I want my cash returned", "refund"),  # no keyword: predicted account
    ]
    result = must_pass(label_model, cases)
    assert result.rate == pytest.approx(2 / 3)
    assert result.n == 3
    assert result.failures == [
        {"text": "I want my cash returned", "expected": "refund", "predicted": "account"}
    ]


def test_must_pass_keeps_at_most_twenty_failures_and_none_without_cases():
    cases = [MustPassCase(f"no keyword {i}", "refund") for i in range(25)]
    result = must_pass(label_model, cases)
    assert (result.rate, result.n, len(result.failures)) == (0.0, 25, 20)
    empty = must_pass(label_model, [])
    assert (empty.rate, empty.n, empty.failures) == (None, 0, [])


# --- text in other scripts ---------------------------------------------------------------

CHINESE = ["我不想要这个商品了，怎么申请退款", "我的包裹还没到吗？", "别扣我的钱", "我的iPhone坏了"]
NEGATED = [
    *CHINESE,
    "我没有收到验证码",
    "请不要再给我打电话了",
    "I never got the parcel, nothing arrived",
    "The refund doesn't show and I cannot log in",
    "Don't close my account without asking",
]


@pytest.mark.parametrize("text", CHINESE)
def test_casing_does_not_apply_to_text_without_case(text):
    assert perturb(text, "casing", random.Random(0)) is None


def test_casing_on_chinese_data_is_not_applicable_in_the_invariance_results():
    results = invariance(keyword_model, CHINESE, kinds=("casing", "typos"), **SAMPLE)
    assert results["casing"].rate is None
    assert results["casing"].not_applicable == len(CHINESE)
    assert results["typos"].n == len(CHINESE)


@pytest.mark.parametrize(
    ("text", "language"),
    [
        ("我的包裹还没到吗？", "zh"),
        ("我的iPhone坏了", "zh"),  # a Latin brand name does not make it English
        ("注文がまだ届きません", "ja"),
        ("Где мой заказ", "ru"),
        ("where is my parcel", "en"),
    ],
)
def test_fillers_are_in_the_language_of_the_text(text, language):
    rng = random.Random(0)
    for _ in range(30):
        out = perturb(text, "filler", rng)
        prefix, _, suffix = out.partition(text)
        assert prefix in ("", *GREETINGS[language])
        assert suffix in ("", *SIGN_OFFS[language]) or suffix in {
            s[1:] for s in SIGN_OFFS[language]
        }
        assert prefix or suffix


def test_no_filler_for_a_script_without_fillers():
    assert perturb("مرحبا، أين طلبي", "filler", random.Random(0)) is None


def test_a_chinese_sign_off_after_a_question_mark_drops_its_comma():
    rng = random.Random(0)
    outs = {perturb("到了吗？", "filler", rng) for _ in range(60)}
    assert "到了吗？谢谢" in outs
    assert not any("？，" in out for out in outs)


def _negations(text: str) -> list[str]:
    words = re.findall(r"[^\W\d_]+(?:'t)?", text.lower())
    return [w for w in words if w in NEGATION_WORDS or w.endswith("'t")] + [
        char for char in text if char in NEGATION_CHARS
    ]


@pytest.mark.parametrize("text", NEGATED)
def test_typos_never_touch_a_negation(text):
    rng = random.Random(0)
    for _ in range(200):
        out = perturb(text, "typos", rng)
        assert out is not None and out != text
        assert _negations(out) == _negations(text)


def test_chinese_typos_swap_double_or_mistype_a_character_but_never_drop_one():
    text = "我的包裹还没到"
    rng = random.Random(0)
    outs = {perturb(text, "typos", rng) for _ in range(300)}
    assert "我地包裹还没到" in outs  # homophone of pinyin input
    assert "我的裹包还没到" in outs  # neighbours swapped
    assert "我的包裹裹还没到" in outs  # doubled
    assert all(len(out) >= len(text) for out in outs)
    assert all(out.count("没") == 1 for out in outs)
