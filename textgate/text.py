"""Text cleaning (normalisation, Chinese script, PII redaction), shared by training and serving."""

from __future__ import annotations

import functools
import hashlib
import re
import unicodedata
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import opencc

from textgate.pii import redact_pii

if TYPE_CHECKING:
    from textgate.config import PrepareConfig

_INVISIBLE = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff\u00ad"), None)
_WHITESPACE = re.compile(r"\s+")
_HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")

ChineseScript = Literal["simplified", "traditional"]
# OpenCC's conversion to each script: from any Chinese text (mixed scripts included).
_OPENCC_CONFIG: dict[str, str] = {"simplified": "t2s", "traditional": "s2t"}
# Models trained before training.json recorded the phone regions get these (the first
# recorded default): their own redaction was a regex for US- and UK-style numbers.
UNRECORDED_PHONE_REGIONS = ("CN", "US", "GB")


def normalise_text(text: str) -> str:
    """NFKC-normalise, drop invisible characters and collapse whitespace to single spaces."""
    text = unicodedata.normalize("NFKC", text).translate(_INVISIBLE)
    return _WHITESPACE.sub(" ", text).strip()


@functools.cache
def _opencc(script: str) -> opencc.OpenCC:
    return opencc.OpenCC(_OPENCC_CONFIG[script])


def unify_chinese(text: str, script: ChineseScript) -> str:
    """`text` with its Chinese characters written in one script, simplified or traditional."""
    if not _HAN.search(text):
        return text
    return _opencc(script).convert(text)


@dataclass(frozen=True)
class TextCleaning:
    """How every text is cleaned before the model sees it, in training and in serving.

    Recorded in the model's training.json (`to_metadata`), so serving cleans as training did.
    """

    redact_pii: bool
    phone_regions: tuple[str, ...]  # ISO regions whose national phone formats are redacted
    chinese_script: ChineseScript | None  # None: Chinese characters are left as written

    def clean(self, text: str) -> tuple[str, Counter[str]]:
        """Normalise, unify the Chinese script and redact; also count replacements per kind."""
        text = normalise_text(text)
        if self.chinese_script is not None:
            text = unify_chinese(text, self.chinese_script)
        if not self.redact_pii:
            return text, Counter()
        return redact_pii(text, self.phone_regions)

    def apply(self, text: str) -> str:
        """The cleaned text (see `clean`)."""
        return self.clean(text)[0]

    def to_metadata(self) -> dict[str, Any]:
        return {
            "redact_pii": self.redact_pii,
            "pii_phone_regions": list(self.phone_regions),
            "chinese_script": self.chinese_script,
        }

    @classmethod
    def from_params(cls, config: PrepareConfig) -> TextCleaning:
        """The cleaning the prepare params ask for (the trained model records it)."""
        return cls(
            redact_pii=config.redact_pii,
            phone_regions=tuple(config.pii_phone_regions),
            chinese_script=config.chinese_script,
        )

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any]) -> TextCleaning:
        """The cleaning a model's training.json records (older models: see UNRECORDED_*)."""
        return cls(
            redact_pii=bool(metadata.get("redact_pii", True)),
            phone_regions=tuple(metadata.get("pii_phone_regions", UNRECORDED_PHONE_REGIONS)),
            chinese_script=metadata.get("chinese_script"),
        )


def clean_text(text: str, redact: bool = True) -> str:
    """The cleaning of a model whose training.json records only whether it redacts PII."""
    return TextCleaning.from_metadata({"redact_pii": redact}).apply(text)


def text_fingerprint(text: str) -> str:
    """A short, stable hash of an (already cleaned) text, to recognise it without storing it."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=8).hexdigest()
