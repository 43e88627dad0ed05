"""PII redaction: the cost per text of the serving path's cleaning, and the table of formats.

Times, per text and over the same texts in one run, (1) the baseline: the redaction textgate
shipped before international formats (regular expressions for emails, US/UK-style phone and
Luhn-checked card numbers), (2) `redact_pii` as served now (libraries, with the cheap digit
pre-filter before phonenumbers) and (3) phonenumbers' matcher over every text that has a
digit, region by region, without the pre-filter: what the pre-filter saves. Three text sets:
the sample's messages (English, some with PII), Chinese messages with numbers, and Chinese
messages with no digit. It prints the median microseconds per text of each, the ratios to
the baseline, and last one JSON line.

    python -m bench.redact                 # the timings
    python -m bench.redact --table         # the PII table (Markdown): what each format catches

PII_CASES is also what tests/unit/test_pii.py checks, so the table and the tests agree.
"""

from __future__ import annotations

import argparse
import random
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd
import phonenumbers

from bench.common import json_line, log, machine_info
from textgate.pii import redact_pii

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "raw" / "support_messages.csv"
REGIONS = ("CN", "US", "GB")  # params.yaml's prepare.pii_phone_regions when this was written

# format -> (texts redacted, each with what it becomes; texts left as they are). Redacted with
# REGIONS as the phone regions.
PII_CASES: dict[str, tuple[list[tuple[str, str]], list[str]]] = {
    "email": (
        [
            ("write to jane.doe@example.com today", "write to [EMAIL] today"),
            ("联系我abc@example.com谢谢", "联系我[EMAIL]谢谢"),
        ],
        ["@everyone see you at 5", "user@localhost"],
    ),
    "phone: Chinese mobile": (
        [
            ("13812345678", "[PHONE]"),
            ("电话13812345678", "电话[PHONE]"),
            ("138-1234-5678", "[PHONE]"),
            ("电话：138 1234 5678，谢谢", "电话：[PHONE]，谢谢"),
            ("+86 138 1234 5678", "[PHONE]"),
            ("(+86) 138-1234-5678", "[PHONE]"),
            ("My number is 0086 138 1234 5678", "My number is [PHONE]"),
        ],
        ["单号A13812345678", "验证码 123456"],
    ),
    "phone: Chinese landline and service": (
        [
            ("010-12345678", "[PHONE]"),
            ("(010)12345678", "[PHONE]"),
            ("021-6234 5678", "[PHONE]"),
            ("+86-10-12345678", "[PHONE]"),
            ("拨打400-810-8888", "拨打[PHONE]"),
        ],
        ["订单号 12345678", "客服 95588", "order 20240312001"],
    ),
    "phone: US and UK": (
        [
            ("(212) 555-0199", "[PHONE]"),
            ("call +1 415-555-2671", "call [PHONE]"),
            ("020 7946 0958", "[PHONE]"),
            ("+44 20 7946 0958", "[PHONE]"),
        ],
        ["it cost 1200 dollars in 2023", "I paid $45.99 on 2024-03-12", "2024-03-12 13:45"],
    ),
    "phone: other countries (+CC)": (
        [
            ("+49 30 123456", "[PHONE]"),
            ("+81 3-1234-5678", "[PHONE]"),
            ("+852 2123 4567", "[PHONE]"),
        ],
        ["Tel 030 1234567 (German national format: DE is not in the regions)"],
    ),
    "Chinese resident ID (18 digits, checksum)": (
        [
            ("11010519491231002X", "[ID]"),
            ("身份证号11010519491231002X", "身份证号[ID]"),
            ("110105 19491231 002x", "[ID]"),
        ],
        ["110105194912310021 (wrong check digit)", "110105194913310028 (no 13th month)"],
    ),
    "card (Luhn)": (
        [
            ("card 4111 1111 1111 1111 lost", "card [CARD] lost"),
            ("卡号4111111111111111谢谢", "卡号[CARD]谢谢"),
            ("карта 5500-0000-0000-0004", "карта [CARD]"),
            ("4111 1111 1111 1111 20", "[CARD] 20"),
        ],
        ["card 4111 1111 1111 1112 (fails Luhn)", "1234 5678 9012 (12 digits)"],
    ),
    "IBAN (mod 97)": (
        [
            ("IBAN GB82 WEST 1234 5698 7654 32 thanks", "IBAN [IBAN] thanks"),
            ("账户DE89 3704 0044 0532 0130 00请查", "账户[IBAN]请查"),
            ("gb82west12345698765432", "[IBAN]"),
        ],
        ["GB82 WEST 1234 5698 7654 33 (wrong check digits)"],
    ),
}

# Chinese support messages around the numbers (filled in at random).
_ZH_TEMPLATES = (
    "你好，我的订单{order}还没到，电话{phone}，麻烦尽快处理，谢谢",
    "请帮我把卡{card}挂失，我的手机号是{phone}",
    "我想退款，订单号{order}，身份证号{rid}",
    "为什么我的账户被冻结了？请回电{landline}",
    "转账到{iban}失败了，怎么办",
)
_ZH_PLAIN = (
    "你好，我的包裹还没有到，能帮我查一下吗？",
    "我不想要这个商品了，怎么申请退款",
    "密码忘记了，登录不了，请帮忙重置",
    "我的银行卡丢了，需要马上冻结",
    "发票什么时候能开好？谢谢",
)


def legacy_redact(text: str) -> str:
    """The baseline: textgate's redaction before international formats (kept verbatim)."""

    def card(match: re.Match[str]) -> str:
        digits = re.sub(r"\D", "", match.group())
        return "[CARD]" if 13 <= len(digits) <= 19 and _luhn(digits) else match.group()

    def phone(match: re.Match[str]) -> str:
        digits = re.sub(r"\D", "", match.group())
        ok = 7 <= len(digits) <= 15 and not _LEGACY_DATE.fullmatch(match.group())
        return "[PHONE]" if ok else match.group()

    text = _LEGACY_EMAIL.sub("[EMAIL]", text)
    text = _LEGACY_CARD.sub(card, text)
    return _LEGACY_PHONE.sub(phone, text)


_LEGACY_EMAIL = re.compile(r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)+\b")
_LEGACY_CARD = re.compile(r"(?<![\w-])(?:\d[ -]?){12,18}\d(?![\w-])")
_LEGACY_PHONE = re.compile(
    r"(?<![\w#])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?)?\d{2,5}(?:[ .-]\d{2,6}){1,3}(?![\w-])"
)
_LEGACY_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


def _luhn(digits: str) -> bool:
    total = 0
    for index, char in enumerate(reversed(digits)):
        value = int(char)
        if index % 2 == 1:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


def current_redact(text: str) -> str:
    return redact_pii(text, REGIONS)[0]


def phonenumbers_everywhere(text: str) -> str:
    """What the phone step costs without the pre-filter: the matcher on every text with a digit."""
    if any(char.isdigit() for char in text):
        for region in (*REGIONS, "ZZ"):
            list(phonenumbers.PhoneNumberMatcher(text, region, phonenumbers.Leniency.VALID))
    return text


def chinese_texts(n: int, seed: int, with_numbers: bool) -> list[str]:
    rng = random.Random(seed)
    if not with_numbers:
        return [rng.choice(_ZH_PLAIN) for _ in range(n)]
    numbers = {
        "order": lambda: str(rng.randint(10**9, 10**10)),
        "phone": lambda: f"1{rng.choice('3578')}{rng.randint(0, 9)}{rng.randint(0, 10**8 - 1):08d}",
        "card": lambda: "4111 1111 1111 1111",
        "rid": lambda: "11010519491231002X",
        "landline": lambda: f"010-{rng.randint(2 * 10**7, 9 * 10**7)}",
        "iban": lambda: "GB82 WEST 1234 5698 7654 32",
    }
    return [
        rng.choice(_ZH_TEMPLATES).format(**{key: make() for key, make in numbers.items()})
        for _ in range(n)
    ]


def per_text_us(redact: Callable[[str], str], texts: Sequence[str], repeats: int) -> float:
    """Median over `repeats` passes of the microseconds per text of one pass over `texts`."""
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        for text in texts:
            redact(text)
        timings.append((time.perf_counter() - start) / len(texts) * 1e6)
    return statistics.median(timings)


def timings(n: int, repeats: int) -> dict[str, dict[str, float]]:
    sample = pd.read_csv(SAMPLE)["text"].astype(str).head(n).tolist()
    sets = {
        "sample (English)": sample,
        "Chinese with numbers": chinese_texts(n, 0, with_numbers=True),
        "Chinese, no digits": chinese_texts(n, 1, with_numbers=False),
    }
    methods = {
        "baseline (regex)": legacy_redact,
        "redact_pii": current_redact,
        "phonenumbers, no pre-filter": phonenumbers_everywhere,
    }
    results: dict[str, dict[str, float]] = {}
    for set_name, texts in sets.items():
        for text in texts[:20]:  # warm caches (phonenumbers loads region metadata lazily)
            current_redact(text)
            phonenumbers_everywhere(text)
        results[set_name] = {
            name: per_text_us(method, texts, repeats) for name, method in methods.items()
        }
        log(f"{set_name}: {len(texts)} texts, {results[set_name]}")
    return results


def table() -> str:
    """The PII table in Markdown: each format, what it redacts (as what) and lets pass."""
    rows = ["| format | redacted (as) | left as written |", "|---|---|---|"]
    for name, (caught, passed) in PII_CASES.items():
        shown = "<br>".join(f"`{raw}` → `{out}`" for raw, out in caught)
        kept = "<br>".join(f"`{text}`" for text in passed)
        rows.append(f"| {name} | {shown} | {kept} |")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", action="store_true", help="print the PII table and stop")
    parser.add_argument("--texts", type=int, default=400, help="texts per set (default 400)")
    parser.add_argument("--repeats", type=int, default=5, help="passes per timing (default 5)")
    args = parser.parse_args(argv)
    if args.table:
        print(table())
        return 0
    results = timings(args.texts, args.repeats)
    print(f"{'texts':<22} {'baseline':>10} {'redact_pii':>11} {'ratio':>6} {'no pre-filter':>14}")
    for set_name, row in results.items():
        base, now, naive = row.values()
        print(f"{set_name:<22} {base:>8.1f}us {now:>9.1f}us {now / base:>5.1f}x {naive:>12.1f}us")
    print(json_line({"us_per_text": results, "machine": machine_info("phonenumbers")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
