"""PII redaction in any script: emails, IBANs, Chinese resident IDs, card and phone numbers.

Checksums and numbering plans come from maintained libraries rather than hand-written rules:
`stdnum` checks IBANs (mod 97), Chinese resident identity numbers (ISO 7064 check character
and birth date) and card numbers (Luhn); `phonenumbers` (Google's libphonenumber metadata)
finds phone numbers valid in the given regions, written with or without separators, and any
number in international `+CC` form. Number boundaries are digits only, never `\\b`: a Han
character is a word character, so `\\b` would hide `电话13812345678` from every pattern.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence

import phonenumbers
from stdnum import iban, luhn
from stdnum.cn import ric

EMAIL_TOKEN = "[EMAIL]"
PHONE_TOKEN = "[PHONE]"
CARD_TOKEN = "[CARD]"
ID_TOKEN = "[ID]"
IBAN_TOKEN = "[IBAN]"
# The kinds redact_pii counts, in the order it looks for them: a number already taken by an
# earlier kind is not looked at again (an IBAN's digits are no card, an ID number is no phone).
PII_KINDS = ("email", "iban", "id_number", "card", "phone")

# ASCII only: `\w` would take the Han text around an address (`联系我a@b.com谢谢`) with it.
_EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
# Country code, check digits, then 11-30 letters or digits, optionally in groups of four.
_IBAN = re.compile(
    r"(?<![A-Za-z0-9])[A-Za-z]{2}\d{2}(?: ?[A-Za-z0-9]{4}){2,7}(?: ?[A-Za-z0-9]{1,4})?"
    r"(?![A-Za-z0-9])"
)
# 18 characters: region (6), birth date (8), sequence (3), check character (digit or X),
# contiguous or grouped 6-8-4 with one kind of separator.
_RESIDENT_ID = re.compile(r"(?<!\d)\d{6}(?P<sep>[ -]?)\d{8}(?P=sep)\d{3}[\dXx](?![\dXx])")
# Digit groups joined by single spaces or dashes: card candidates (13-19 digits in all), unless
# a `+` leads them (an international phone number such as +86 138 1234 5678).
_DIGIT_GROUPS = re.compile(r"(?<![+\d])\d+(?:[ -]\d+)*")
# Cheap pre-filter for phone numbers: 7+ digits with at most three separators between two
# digits. Only such runs are handed to phonenumbers, which is slow on long texts.
_PHONE_RUN = re.compile(r"[+(]?\d(?:[ ().\-/]{0,3}\d){6,}\)?")
# A phone match may leave a country code or a dash-joined digit group next to it: redacting
# them with it means no part of a number stays in the text.
_LEFT_OF_PHONE = re.compile(r"(?:\+\d{1,3}[ .\-]?|\(\d{1,4}\)[ .\-]?|\d+[.\-])$")
_RIGHT_OF_PHONE = re.compile(r"^[.\-]\d+")
_PHONE_CONTEXT = 8  # characters each side of a candidate run that phonenumbers also sees
_PHONE_LENIENCY = phonenumbers.Leniency.VALID  # the regions' numbering plans, not just lengths
_INTERNATIONAL_LENIENCY = phonenumbers.Leniency.POSSIBLE  # see _phone_passes
_MIN_CARD_DIGITS, _MAX_CARD_DIGITS = 13, 19


def redact_pii(text: str, phone_regions: Sequence[str]) -> tuple[str, Counter[str]]:
    """Replace emails, IBANs, resident ID, card and phone numbers by placeholders.

    Args:
        text: the (normalised) text.
        phone_regions: ISO 3166 region codes whose national formats count as phone numbers
            (e.g. ["CN", "US", "GB"]); numbers written as `+CC ...` are found in any case.

    Returns:
        The redacted text and a count of replacements per kind (see PII_KINDS).
    """
    counts: Counter[str] = Counter()
    if "@" in text:
        text = _replace(_EMAIL, text, lambda address: True, EMAIL_TOKEN, "email", counts)
    if not any(char.isdigit() for char in text):
        return text, counts
    text = _replace(_IBAN, text, iban.is_valid, IBAN_TOKEN, "iban", counts)
    text = _replace(_RESIDENT_ID, text, _resident_id_valid, ID_TOKEN, "id_number", counts)
    text = _redact_cards(text, counts)
    text = _redact_phones(text, phone_regions, counts)
    return text, counts


def _replace(
    pattern: re.Pattern[str],
    text: str,
    valid: Callable[[str], bool],
    token: str,
    kind: str,
    counts: Counter[str],
) -> str:
    def substitute(match: re.Match[str]) -> str:
        if not valid(match.group()):
            return match.group()
        counts[kind] += 1
        return token

    return pattern.sub(substitute, text)


def _resident_id_valid(candidate: str) -> bool:
    return ric.is_valid(candidate.replace(" ", "").replace("-", ""))


def _redact_cards(text: str, counts: Counter[str]) -> str:
    """Luhn-valid runs of 13-19 digits, whole digit groups only, leftmost-longest first.

    Grouping decides where a card ends: in `4111 1111 1111 1111 20` the card is the first
    four groups, which a greedy 13-19 digit pattern would miss (it takes 18 digits).
    """
    spans: list[tuple[int, int]] = []
    for run in _DIGIT_GROUPS.finditer(text):
        groups = list(re.finditer(r"\d+", run.group()))
        start = 0
        while start < len(groups):
            end = _longest_card(groups, start)
            if end is None:
                start += 1
                continue
            spans.append((run.start() + groups[start].start(), run.start() + groups[end].end()))
            start = end + 1
    if spans:
        counts["card"] += len(spans)
    return _splice(text, spans, CARD_TOKEN)


def _longest_card(groups: list[re.Match[str]], start: int) -> int | None:
    """The last group of the longest Luhn-valid card that starts at group `start`, if any."""
    digits = ""
    ends = []
    for end in range(start, len(groups)):
        digits += groups[end].group()
        if len(digits) > _MAX_CARD_DIGITS:
            break
        # ISO/IEC 7812 issues no card number that starts with 0 (0086 ... is a phone number).
        if len(digits) >= _MIN_CARD_DIGITS and digits[0] != "0" and luhn.is_valid(digits):
            ends.append(end)
    return ends[-1] if ends else None


def _redact_phones(text: str, regions: Sequence[str], counts: Counter[str]) -> str:
    spans: list[tuple[int, int]] = []
    for run in _PHONE_RUN.finditer(text):
        spans += [_widen(text, span, run.span()) for span in _phones_in_run(text, run, regions)]
    spans = _merge(spans)
    if spans:
        counts["phone"] += len(spans)
    return _splice(text, spans, PHONE_TOKEN)


def _phones_in_run(text: str, run: re.Match[str], regions: Sequence[str]) -> list[tuple[int, int]]:
    """The phone numbers phonenumbers finds in one candidate run, region by region.

    The regions are tried in order until the numbers found cover every digit of the run:
    each pass costs tens of microseconds, and most runs are settled by the first region.
    """
    # Some context each side, as phonenumbers sees in the full text: it rejects a number glued
    # to a Latin letter (an order id such as A13812345678) or followed by `:45` (a date and
    # time such as 2024-03-12 13:45).
    lo = max(run.start() - _PHONE_CONTEXT, 0)
    hi = min(run.end() + _PHONE_CONTEXT, len(text))
    window = text[lo:hi]
    digits = {run.start() + i for i, char in enumerate(run.group()) if char.isdigit()}
    found: list[tuple[int, int]] = []
    for region, leniency in _phone_passes(regions, international="+" in run.group()):
        found += [
            (lo + match.start, lo + match.end)
            for match in phonenumbers.PhoneNumberMatcher(window, region, leniency)
        ]
        if digits <= {i for start, end in found for i in range(start, end)}:
            break
    return _merge(found)


def _phone_passes(
    regions: Sequence[str], international: bool
) -> list[tuple[str, phonenumbers.Leniency]]:
    """Numbers valid in each region's numbering plan, then any +CC number of a possible length.

    A number written with its country code is hardly anything else, so it needs only a possible
    length: that also redacts numbers from ranges the metadata does not list (new ranges, or
    the ranges reserved for fiction, such as +44 7700 900xxx) instead of leaking them. That
    pass (region ZZ: none) only runs where the candidate has a `+`.
    """
    passes = [(region, _PHONE_LENIENCY) for region in regions]
    return [*passes, ("ZZ", _INTERNATIONAL_LENIENCY)] if international else passes


def _widen(text: str, span: tuple[int, int], within: tuple[int, int]) -> tuple[int, int]:
    """Extend a phone match over a country code or dash-joined digits left next to it."""
    start, end = span
    left = _LEFT_OF_PHONE.search(text[within[0] : start])
    if left:
        start -= len(left.group())
    right = _RIGHT_OF_PHONE.match(text[end : within[1]])
    if right:
        end += len(right.group())
    return start, end


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, with overlapping spans joined."""
    merged: list[tuple[int, int]] = []
    for start, end in sorted(spans):
        if merged and start < merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return merged


def _splice(text: str, spans: list[tuple[int, int]], token: str) -> str:
    """`text` with each of the sorted, disjoint `spans` replaced by `token`."""
    out, last = [], 0
    for start, end in spans:
        out += [text[last:start], token]
        last = end
    return "".join(out) + text[last:]
