"""PII redaction: each format's positive and negative cases (the README's PII table)."""

import re

import phonenumbers
import pytest

from bench.redact import PII_CASES, REGIONS
from textgate import pii
from textgate.pii import PII_KINDS, redact_pii

CAUGHT = [(name, raw, out) for name, (caught, _) in PII_CASES.items() for raw, out in caught]
PASSED = [(name, text) for name, (_, passed) in PII_CASES.items() for text in passed]
KIND_OF_TOKEN = {
    "[EMAIL]": "email",
    "[PHONE]": "phone",
    "[CARD]": "card",
    "[ID]": "id_number",
    "[IBAN]": "iban",
}


@pytest.mark.parametrize(("name", "raw", "expected"), CAUGHT)
def test_each_format_is_redacted_whole_and_counted(name, raw, expected):
    text, counts = redact_pii(raw, REGIONS)
    assert text == expected
    tokens = re.findall(r"\[[A-Z]+\]", text)
    assert counts == {KIND_OF_TOKEN[t]: tokens.count(t) for t in tokens}


@pytest.mark.parametrize(("name", "text"), PASSED)
def test_look_alikes_are_left_as_written(name, text):
    assert redact_pii(text, REGIONS) == (text, {})


@pytest.mark.parametrize(
    "number",
    [
        "138-1234-5678",
        "+1 555-013-2234",
        "0086 138 1234 5678",
        "(010)1234-5678",
        "+86 10 1234 5678",
    ],
)
def test_no_digit_of_a_phone_number_is_left_behind(number):
    text, counts = redact_pii(f"请拨打{number}，谢谢", REGIONS)
    assert text == "请拨打[PHONE]，谢谢"
    assert counts == {"phone": 1}


def test_two_numbers_side_by_side_are_two_phones():
    assert redact_pii("13812345678 13912345678", REGIONS) == ("[PHONE] [PHONE]", {"phone": 2})


def test_national_formats_are_redacted_only_for_the_configured_regions():
    text = "Tel 030 1234567"  # Berlin, written as Germans do
    assert redact_pii(text, REGIONS)[0] == text
    assert redact_pii(text, [*REGIONS, "DE"])[0] == "Tel [PHONE]"
    # A number with its country code is redacted whatever the regions.
    assert redact_pii("Tel +49 30 1234567", [])[0] == "Tel [PHONE]"


def test_a_card_takes_whole_digit_groups_and_leaves_the_rest():
    assert redact_pii("4111 1111 1111 1111 2024", REGIONS)[0] == "[CARD] 2024"


def test_kinds_are_counted_separately_in_one_text():
    raw = "a@b.com 13812345678 4111111111111111 11010519491231002X DE89370400440532013000"
    text, counts = redact_pii(raw, REGIONS)
    assert text == "[EMAIL] [PHONE] [CARD] [ID] [IBAN]"
    assert counts == dict.fromkeys(PII_KINDS, 1)


def test_phonenumbers_runs_only_where_seven_digits_make_a_run(monkeypatch):
    calls = []
    real = phonenumbers.PhoneNumberMatcher

    def counting(text, region, leniency):
        calls.append(text)
        return real(text, region, leniency)

    monkeypatch.setattr(pii.phonenumbers, "PhoneNumberMatcher", counting)
    redact_pii("order 123456 of 2024-03, 4 items, 12 34 56", REGIONS)  # no run of 7 digits
    assert calls == []
    redact_pii("请拨打13812345678", REGIONS)
    assert len(calls) == 1  # the first region (CN) covers the run: no other region is asked


def test_redaction_is_idempotent():
    once = redact_pii("电话138-1234-5678 卡号4111111111111111", REGIONS)[0]
    assert redact_pii(once, REGIONS) == (once, {})
