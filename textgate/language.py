"""Scripts and languages of texts: what the behavioural tests and the tokenizer check need.

No language model: the Unicode name of each letter gives its script, and the script decides
the few things that depend on it (whether letters have case, which greetings sound natural,
which words negate, which base model reads it).
"""

from __future__ import annotations

import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# Greetings and sign-offs per language, as a customer would write them (the filler test).
# Latin-script text gets the English ones, whatever its language.
GREETINGS: dict[str, tuple[str, ...]] = {
    "en": ("hi, ", "hello, ", "hello there, ", "hey, ", "hey team, ", "good morning, "),
    "zh": ("你好，", "您好，", "你好，请问", "打扰一下，", "麻烦问一下，"),
    "ja": ("こんにちは、", "すみません、", "お疲れ様です。"),
    "ko": ("안녕하세요, ", "실례합니다, "),
    "ru": ("здравствуйте, ", "добрый день, ", "привет, "),
}
SIGN_OFFS: dict[str, tuple[str, ...]] = {
    "en": (" thanks", " thank you!", " thanks in advance", " cheers", " many thanks."),
    "zh": ("，谢谢", "，谢谢！", "，麻烦了", "，辛苦了", "。多谢"),
    "ja": ("。よろしくお願いします", "、ありがとうございます", "。お願いします"),
    "ko": (" 감사합니다", " 부탁드립니다"),
    "ru": (" спасибо", " спасибо!", " заранее спасибо"),
}
_LANGUAGE_OF_SCRIPT = {"latin": "en", "han": "zh", "kana": "ja", "hangul": "ko", "cyrillic": "ru"}

# Words a typo must never touch: a typo test expects the same label, and a damaged negation may
# rightly change it. Lower case; English contractions (n't) are recognised by their ending.
_NEGATIONS = (
    "not no nor never none nobody nothing nowhere neither cannot without dont doesnt didnt "
    "isnt arent wasnt werent wont cant couldnt shouldnt wouldnt havent hasnt hadnt aint "
    "nicht kein keine keinen keinem keiner nie niemals ohne "  # German
    "pas jamais rien aucun aucune sans "  # French
    "nunca nada nadie ningun ninguno ninguna sin "  # Spanish
    "нет не ни никогда ничего без"  # Russian
)
NEGATION_WORDS = frozenset(_NEGATIONS.split())
# Chinese and Korean characters that negate on their own (不, 没, 别, 未, 无, 非, ...; 안, 못).
NEGATION_CHARS = frozenset("不没沒别別未无無非莫勿否甭안못않없")
# Common slips of Chinese pinyin input: a character typed for another that sounds the same.
HOMOPHONES: dict[str, str] = {
    "的": "地得", "地": "的得", "得": "的地", "在": "再", "再": "在", "做": "作", "作": "做",
    "已": "以", "以": "已", "账": "帐", "帐": "账", "像": "象", "象": "像", "那": "哪",
    "哪": "那", "他": "她", "她": "他", "到": "道", "有": "又", "又": "有", "吗": "嘛",
    "里": "理", "号": "好", "码": "马", "款": "宽", "单": "担", "退": "推", "付": "副",
}  # fmt: skip

# Base models to suggest when the configured one cannot read the data (hub ids).
CHINESE_BASE_MODEL = "bert-base-chinese"
MULTILINGUAL_BASE_MODEL = "sentence-transformers/paraphrase-multilingual-MiniLM-L12-v2"


def script_of(char: str) -> str | None:
    """The script of a letter ("latin", "han", "kana", "hangul", ...); None for a non-letter."""
    if not char.isalpha():
        return None
    name = unicodedata.name(char, "")
    first = name.split(" ", 1)[0].lower()
    if first == "cjk":
        return "han"
    if first in ("hiragana", "katakana"):
        return "kana"
    return first or None


def scripts(texts: Iterable[str]) -> Counter[str]:
    """How many letters of each script `texts` hold."""
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(script for char in text if (script := script_of(char)))
    return counts


def language_of(text: str) -> str | None:
    """The language whose fillers suit `text`, by its letters' scripts.

    Any kana makes it Japanese, else any Hangul Korean, else any Han Chinese (a brand name in
    Latin letters does not make Chinese text English); otherwise the script most letters are
    in decides, Latin counting as English. None: no letter, or a script without fillers.
    """
    counts = scripts([text])
    for script in ("kana", "hangul", "han"):
        if counts[script]:
            return _LANGUAGE_OF_SCRIPT[script]
    if not counts:
        return None
    return _LANGUAGE_OF_SCRIPT.get(counts.most_common(1)[0][0])


def has_case(text: str) -> bool:
    """True when `text` is written in letters with an upper and a lower case.

    Chinese, Japanese, Korean, Arabic or Hindi text has none: a casing test says nothing about
    it, even where a Latin word in it (我的iPhone坏了) could change case. Otherwise most
    letters must have case.
    """
    counts = scripts([text])
    if not counts or counts["han"] or counts["kana"] or counts["hangul"]:
        return False
    letters = [char for char in text if char.isalpha()]
    cased = sum(char.islower() or char.isupper() for char in letters)
    return 2 * cased >= len(letters)


_TOKENIZE_BATCH = 256  # texts per tokenizer call: large enough for the fast tokenizer's threads


@dataclass(frozen=True)
class UnknownCharacters:
    """How much of the data a tokenizer maps to its unknown token."""

    n_chars: int  # characters other than whitespace
    n_unknown: int  # of those, characters inside unknown tokens
    top: list[tuple[str, int]]  # the most frequent unknown characters with their counts
    scripts: dict[str, int]  # unknown letters per script

    @property
    def share(self) -> float:
        return self.n_unknown / self.n_chars if self.n_chars else 0.0


def unknown_characters(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]
) -> UnknownCharacters:
    """Count the characters of `texts` that `tokenizer` maps to its unknown token.

    Needs a fast tokenizer (character offsets). A tokenizer without an unknown token (byte-level
    BPE) reads every character: nothing is unknown.
    """
    unknown: Counter[str] = Counter()
    n_chars = sum(len(text) - sum(char.isspace() for char in text) for text in texts)
    unk_id = tokenizer.unk_token_id
    if unk_id is not None:
        for start in range(0, len(texts), _TOKENIZE_BATCH):
            batch = list(texts[start : start + _TOKENIZE_BATCH])
            encoded = tokenizer(batch, add_special_tokens=False, return_offsets_mapping=True)
            for text, ids, offsets in zip(
                batch, encoded["input_ids"], encoded["offset_mapping"], strict=True
            ):
                for token, (begin, end) in zip(ids, offsets, strict=True):
                    if token == unk_id:
                        unknown.update(char for char in text[begin:end] if not char.isspace())
    letters: Counter[str] = Counter()
    for char, count in unknown.items():
        if script := script_of(char):
            letters[script] += count
    return UnknownCharacters(
        n_chars=n_chars,
        n_unknown=sum(unknown.values()),
        top=unknown.most_common(10),
        scripts=dict(letters.most_common()),
    )


def suggested_base_model(unknown_scripts: Iterable[str]) -> str:
    """A hub encoder that reads the scripts a tokenizer did not: Chinese, or multilingual."""
    scripts_seen = set(unknown_scripts)
    return CHINESE_BASE_MODEL if scripts_seen == {"han"} else MULTILINGUAL_BASE_MODEL
