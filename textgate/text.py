"""Text normalisation and PII redaction, shared by training and serving so they cannot drift."""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections import Counter

EMAIL_TOKEN = "[EMAIL]"
PHONE_TOKEN = "[PHONE]"
CARD_TOKEN = "[CARD]"

_INVISIBLE = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff\u00ad"), None)
_WHITESPACE = re.compile(r"\s+")
_EMAIL = re.compile(r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)+\b")
# 13-19 digits, optionally grouped by spaces or dashes: card numbers (checked with Luhn).
_CARD = re.compile(r"(?<![\w-])(?:\d[ -]?){12,18}\d(?![\w-])")
# International or national phone numbers: 7-15 digits with the usual separators.
_PHONE = re.compile(
    r"(?<![\w#])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?)?\d{2,5}(?:[ .-]\d{2,6}){1,3}(?![\w-])"
)
_ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


def normalise_text(text: str) -> str:
    """NFKC-normalise, drop invisible characters and collapse whitespace to single spaces."""
    text = unicodedata.normalize("NFKC", text).translate(_INVISIBLE)
    return _WHITESPACE.sub(" ", text).strip()


def _luhn_valid(digits: str) -> bool:
    total = 0
    for index, char in enumerate(reversed(digits)):
        value = int(char)
        if index % 2 == 1:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


def redact_pii(text: str) -> tuple[str, Counter[str]]:
    """Replace emails, card numbers and phone numbers by placeholders.

    Returns:
        The redacted text and a count of replacements per kind (`email`, `card`, `phone`).
    """
    counts: Counter[str] = Counter()

    def _email(match: re.Match[str]) -> str:
        counts["email"] += 1
        return EMAIL_TOKEN

    def _card(match: re.Match[str]) -> str:
        digits = re.sub(r"\D", "", match.group())
        if 13 <= len(digits) <= 19 and _luhn_valid(digits):
            counts["card"] += 1
            return CARD_TOKEN
        return match.group()

    def _phone(match: re.Match[str]) -> str:
        digits = re.sub(r"\D", "", match.group())
        if 7 <= len(digits) <= 15 and not _ISO_DATE.fullmatch(match.group()):
            counts["phone"] += 1
            return PHONE_TOKEN
        return match.group()

    text = _EMAIL.sub(_email, text)
    text = _CARD.sub(_card, text)
    text = _PHONE.sub(_phone, text)
    return text, counts


def clean_text(text: str, redact: bool = True) -> str:
    """The preprocessing applied to every text before the model sees it, offline and online."""
    text = normalise_text(text)
    return redact_pii(text)[0] if redact else text


def text_fingerprint(text: str) -> str:
    """A short, stable hash of an (already cleaned) text, to recognise it without storing it."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=8).hexdigest()
