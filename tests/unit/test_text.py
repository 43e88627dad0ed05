import pytest

from textgate.text import clean_text, normalise_text, redact_pii


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


@pytest.mark.parametrize(
    ("raw", "expected", "kind"),
    [
        ("write to jane.doe@example.com today", "write to [EMAIL] today", "email"),
        ("card 4111 1111 1111 1111 lost", "card [CARD] lost", "card"),
        ("card 5500-0000-0000-0004", "card [CARD]", "card"),
        ("call +1 555-013-2234", "call [PHONE]", "phone"),
        ("call (555) 010-7788 pls", "call [PHONE] pls", "phone"),
    ],
)
def test_redact_pii_replaces_and_counts(raw, expected, kind):
    text, counts = redact_pii(raw)
    assert text == expected
    assert counts[kind] == 1


@pytest.mark.parametrize(
    "raw",
    [
        "order #A12345 arrived",
        "I paid $45.99 on 2024-03-12",
        "it cost 1200 dollars in 2023",
        "card 4111 1111 1111 1112",
    ],  # the last fails the Luhn check: not a card number
)
def test_redact_pii_leaves_non_pii_alone(raw):
    assert redact_pii(raw)[0] == raw


def test_clean_text_is_idempotent():
    once = clean_text("  Mail  me: a.b@example.org ")
    assert once == "Mail me: [EMAIL]"
    assert clean_text(once) == once
