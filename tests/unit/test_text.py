import pytest

from textgate.text import UNRECORDED_PHONE_REGIONS, TextCleaning, clean_text, normalise_text

CN_ONLY = TextCleaning(redact_pii=True, phone_regions=("CN",), chinese_script=None)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("  hello\t\tworld \n", "hello world"),
        ("Ｆｕｌｌｗｉｄｔｈ", "Fullwidth"),
        ("zero\u200bwidth", "zerowidth"),
        ("caf\u0065\u0301", "café"),
        ("", ""),
    ],
)
def test_normalise_text(raw, expected):
    assert normalise_text(raw) == expected


def test_full_width_digits_are_normalised_before_redaction():
    assert CN_ONLY.apply("电话：１３８１２３４５６７８") == "电话:[PHONE]"


def test_clean_text_is_idempotent():
    once = clean_text("  Mail  me: a.b@example.org ")
    assert once == "Mail me: [EMAIL]"
    assert clean_text(once) == once


def test_without_redaction_pii_stays():
    cleaning = TextCleaning(redact_pii=False, phone_regions=("CN",), chinese_script=None)
    assert cleaning.clean("电话13812345678") == ("电话13812345678", {})


@pytest.mark.parametrize(
    ("script", "raw", "expected"),
    [
        ("simplified", "我的銀行帳戶被凍結了，請幫忙", "我的银行帐户被冻结了,请帮忙"),
        ("traditional", "我的银行账户被冻结了", "我的銀行賬戶被凍結了"),
        (None, "我的銀行帳戶", "我的銀行帳戶"),
    ],
)
def test_chinese_is_written_in_one_script_when_asked(script, raw, expected):
    cleaning = TextCleaning(redact_pii=True, phone_regions=("CN",), chinese_script=script)
    assert cleaning.apply(raw) == expected


def test_traditional_and_simplified_spellings_clean_to_the_same_text():
    cleaning = TextCleaning(redact_pii=True, phone_regions=("CN",), chinese_script="simplified")
    assert cleaning.apply("請幫我退款") == cleaning.apply("请帮我退款")
    assert cleaning.apply("Refund [EMAIL] please") == "Refund [EMAIL] please"


def test_the_cleaning_travels_with_the_model_metadata():
    cleaning = TextCleaning(
        redact_pii=True, phone_regions=("CN", "DE"), chinese_script="simplified"
    )
    assert TextCleaning.from_metadata(cleaning.to_metadata()) == cleaning


def test_a_model_without_recorded_cleaning_gets_the_first_recorded_defaults():
    cleaning = TextCleaning.from_metadata({"redact_pii": False})
    assert cleaning == TextCleaning(
        redact_pii=False, phone_regions=UNRECORDED_PHONE_REGIONS, chinese_script=None
    )
