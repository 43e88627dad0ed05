"""Behavioural model tests: invariance to harmless perturbations, and must-pass examples."""

from __future__ import annotations

import random
import re
import string
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from textgate.config import BehaviourConfig
from textgate.errors import DataError
from textgate.io import read_cases
from textgate.language import (
    GREETINGS,
    HOMOPHONES,
    NEGATION_CHARS,
    NEGATION_WORDS,
    SIGN_OFFS,
    has_case,
    language_of,
)

# The behavioural tests are gate.behaviour's keys (their pass-rate floors): the must-pass
# examples, and one invariance test per perturbation (implemented in _PERTURBERS below).
MUST_PASS = "must_pass"
PERTURBATIONS = tuple(name for name in BehaviourConfig.model_fields if name != MUST_PASS)

MAX_INVARIANCE_FAILURES = 5
MAX_MUST_PASS_FAILURES = 20
_MAX_REPORTED_PROBLEMS = 10

# Placeholders such as [EMAIL], [PHONE] and [CARD] come from PII redaction (textgate.text):
# the model saw them verbatim in training, so no perturbation may touch them.
_PLACEHOLDER = re.compile(r"\[[A-Z][A-Z0-9_]*\]")
# Han, kana and Hangul: scripts written without spaces between words (or, in Korean, with
# words that a dropped letter would not leave readable): typos there act on characters.
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af"
_WORD = re.compile(rf"(?:(?![{_CJK}])[^\W\d_]){{4,}}")  # a run of 4+ letters, not CJK
_CJK_RUN = re.compile(rf"[{_CJK}]{{2,}}")
_CONTRACTED_NOT = ("'t", "\u2019t")  # doesn't, didn't: the word before n't negates
_WORD_START = re.compile(r"(?<!\S)([^\W\d_])([^\W\d_]*)")  # first letter of a word, the rest
_ASCII_PUNCTUATION = frozenset(string.punctuation)

END_MARKS = ("?", "!", "...")


def perturb(text: str, kind: str, rng: random.Random) -> str | None:
    """A copy of `text` with one harmless change of the given kind, or None if none applies.

    Kinds (see PERTURBATIONS):
        casing: lower case, upper case, the first letter's case swapped, or title case; only
            for text written mostly in letters with case (none for Chinese: not applicable).
        punctuation: all ASCII and Unicode punctuation removed, or "?", "!" or "..." appended.
        typos: one typo in one word of 4+ letters: two adjacent inner letters swapped, an inner
            letter dropped, or a letter doubled; in Chinese, Japanese or Korean, a character
            swapped with its neighbour, doubled, or replaced by a homophone (pinyin input's
            slip). Never in a negation (not, never, n't, 不, 没, 别, ...: NEGATION_WORDS and
            NEGATION_CHARS), which may rightly change the label.
        filler: a greeting prefix, a polite suffix, or both, in the text's language (by its
            script: textgate.language.GREETINGS); none for a script without fillers.

    Placeholder tokens in square brackets ([EMAIL], [PHONE], [CARD]) are never changed, and
    the result always differs from `text`.

    Raises:
        ValueError: `kind` is not one of PERTURBATIONS.
    """
    if kind not in PERTURBATIONS:
        raise ValueError(f"unknown perturbation {kind!r}; choose from {list(PERTURBATIONS)}")
    if not text.strip():
        return None
    return _PERTURBERS[kind](text, rng)


class InvarianceResult(BaseModel):
    """How often predictions survive one kind of perturbation.

    `rate` is the share of perturbed texts whose predicted class equals the model's prediction
    for the original, or None when no text could be perturbed (not applicable: e.g. casing on
    Chinese text). `not_applicable` counts the sampled texts this kind could not perturb.
    """

    model_config = ConfigDict(frozen=True)

    kind: str
    rate: float | None
    n: int
    not_applicable: int = 0
    failures: list[tuple[str, str]]  # up to MAX_INVARIANCE_FAILURES (original, perturbed)


def invariance(
    predict: Callable[[list[str]], Sequence[int]],
    texts: Sequence[str],
    *,
    kinds: Sequence[str] = PERTURBATIONS,
    max_examples: int,
    seed: int,
) -> dict[str, InvarianceResult]:
    """Measure, per perturbation kind, how often the predicted class stays the same.

    Up to `max_examples` texts are used (a seeded sample when there are more). `predict` is
    called once on the originals and once per kind on that kind's perturbed texts; texts a
    kind cannot change are not counted for that kind.

    Args:
        predict: texts -> predicted class indices, one per text.
        texts: the texts to perturb, e.g. the test split.
        kinds: which perturbations to run, from PERTURBATIONS.
        max_examples: the most texts to perturb.
        seed: seeds the sample and the perturbations.

    Returns:
        One InvarianceResult per kind, in the order of `kinds`.
    """
    unknown = [kind for kind in kinds if kind not in PERTURBATIONS]
    if unknown:
        raise ValueError(f"unknown perturbation(s) {unknown}; choose from {list(PERTURBATIONS)}")
    if max_examples < 1:
        raise ValueError(f"max_examples must be >= 1, got {max_examples}")
    sample = list(texts)
    if len(sample) > max_examples:
        chosen = sorted(random.Random(seed).sample(range(len(sample)), max_examples))
        sample = [sample[i] for i in chosen]
    original = _predict(predict, sample) if sample else []

    results: dict[str, InvarianceResult] = {}
    for kind in kinds:
        # One generator per kind, so a kind's perturbations do not depend on the other kinds.
        rng = random.Random(f"{seed}:{kind}")
        pairs = [(i, p) for i, text in enumerate(sample) if (p := perturb(text, kind, rng))]
        skipped = len(sample) - len(pairs)
        if not pairs:
            results[kind] = InvarianceResult(
                kind=kind, rate=None, n=0, not_applicable=skipped, failures=[]
            )
            continue
        predicted = _predict(predict, [p for _, p in pairs])
        changed = [
            (sample[i], p)
            for (i, p), label in zip(pairs, predicted, strict=True)
            if int(label) != int(original[i])
        ]
        results[kind] = InvarianceResult(
            kind=kind,
            rate=1.0 - len(changed) / len(pairs),
            n=len(pairs),
            not_applicable=skipped,
            failures=changed[:MAX_INVARIANCE_FAILURES],
        )
    return results


@dataclass(frozen=True)
class MustPassCase:
    """A text the model must always classify as `label`."""

    text: str
    label: str


def load_must_pass(path: str | Path, labels: Sequence[str]) -> list[MustPassCase]:
    """Read must-pass cases from a CSV with columns `text,label` (`#` lines are comments; a
    file with no cases gives none, and the gate's must-pass check then does not apply).

    Raises:
        DataError: the file is missing, or a row has an empty text or a label not in
            `labels`; the message names the file and each bad line (the header is line 1).
    """
    frame = read_cases(path)
    known = set(labels)
    cases: list[MustPassCase] = []
    problems: list[str] = []
    for line, text, label in zip(frame.index, frame["text"], frame["label"], strict=True):
        if text is None or not text.strip():
            problems.append(f"line {line}: empty text")
        elif label not in known:
            problems.append(f"line {line}: unknown label {label!r}")
        else:
            cases.append(MustPassCase(text=text, label=label))
    if problems:
        shown = problems[:_MAX_REPORTED_PROBLEMS]
        if len(problems) > len(shown):
            shown.append(f"... and {len(problems) - len(shown)} more")
        known_note = (
            f"\nknown labels: {', '.join(labels)}" if any("label" in p for p in problems) else ""
        )
        raise DataError(
            f"{path}: {len(problems)} invalid must-pass case(s):\n  "
            + "\n  ".join(shown)
            + known_note
        )
    return cases


class MustPassResult(BaseModel):
    """The share of must-pass cases predicted correctly (None when there are no cases)."""

    model_config = ConfigDict(frozen=True)

    rate: float | None
    n: int
    failures: list[dict[str, str]]  # up to MAX_MUST_PASS_FAILURES {text, expected, predicted}


def must_pass(
    predict_labels: Callable[[list[str]], Sequence[str]], cases: Sequence[MustPassCase]
) -> MustPassResult:
    """Predict every must-pass case in one call and report the ones the model gets wrong."""
    if not cases:
        return MustPassResult(rate=None, n=0, failures=[])
    predicted = _predict(predict_labels, [case.text for case in cases])
    failures = [
        {"text": case.text, "expected": case.label, "predicted": str(label)}
        for case, label in zip(cases, predicted, strict=True)
        if str(label) != case.label
    ]
    return MustPassResult(
        rate=1.0 - len(failures) / len(cases),
        n=len(cases),
        failures=failures[:MAX_MUST_PASS_FAILURES],
    )


def _predict(predict: Callable[[list[str]], Sequence], texts: list[str]) -> list:
    predicted = list(predict(texts))
    if len(predicted) != len(texts):
        raise ValueError(f"predict returned {len(predicted)} predictions for {len(texts)} texts")
    return predicted


def _outside_placeholders(text: str, change: Callable[[str], str]) -> str:
    """Apply `change` to every stretch of `text` between placeholder tokens."""
    parts = _PLACEHOLDER.split(text)
    tokens = _PLACEHOLDER.findall(text)
    out = [change(parts[0])]
    for token, part in zip(tokens, parts[1:], strict=True):
        out += [token, change(part)]
    return "".join(out)


def _placeholder_spans(text: str) -> list[tuple[int, int]]:
    return [match.span() for match in _PLACEHOLDER.finditer(text)]


def _casings(text: str) -> list[str]:
    if not has_case(_PLACEHOLDER.sub(" ", text)):
        return []  # no case to change: the test does not apply to this text

    def title(part: str) -> str:
        # Not str.title(), which would write "Don'T".
        return _WORD_START.sub(lambda m: m.group(1).upper() + m.group(2).lower(), part)

    out = [
        _outside_placeholders(text, str.lower),
        _outside_placeholders(text, str.upper),
        _outside_placeholders(text, title),
    ]
    spans = _placeholder_spans(text)
    for i, char in enumerate(text):
        if char.isalpha() and not any(start <= i < end for start, end in spans):
            out.append(text[:i] + char.swapcase() + text[i + 1 :])
            break
    return out


def _is_punctuation(char: str) -> bool:
    return char in _ASCII_PUNCTUATION or unicodedata.category(char).startswith("P")


def _punctuations(text: str) -> list[str]:
    out = [text.rstrip() + mark for mark in END_MARKS]
    stripped = _outside_placeholders(
        text, lambda part: "".join(c for c in part if not _is_punctuation(c))
    )
    if stripped.strip():
        out.append(stripped)
    return out


def _filler(text: str, rng: random.Random) -> str | None:
    language = language_of(_PLACEHOLDER.sub(" ", text))
    if language is None:
        return None  # no fillers in the text's language: English ones would test nothing
    text = text.strip()
    where = rng.choice(("prefix", "suffix", "both"))
    greeting = rng.choice(GREETINGS[language]) if where != "suffix" else ""
    sign_off = rng.choice(SIGN_OFFS[language]) if where != "prefix" else ""
    if sign_off and _is_punctuation(text[-1]) and _is_punctuation(sign_off[0]):
        sign_off = sign_off[1:]  # 到了吗？ + ，谢谢 reads 到了吗？谢谢
    return greeting + text + sign_off


def _typo(text: str, rng: random.Random) -> str | None:
    spans = _placeholder_spans(text)

    def free(match: re.Match[str]) -> bool:
        return not any(start < match.end() and match.start() < end for start, end in spans)

    words = [m for m in _WORD.finditer(text) if free(m) and not _negates(text, m)]
    runs = [m for m in _CJK_RUN.finditer(text) if free(m) and _cjk_typos(m.group())]
    if not words and not runs:
        return None
    match = rng.choice(words + runs)
    if match.re is _CJK_RUN:
        typo = rng.choice(_cjk_typos(match.group()))
    else:
        typo = _word_typo(match.group(), rng)
    return text[: match.start()] + typo + text[match.end() :]


def _negates(text: str, word: re.Match[str]) -> bool:
    following = text[word.end() : word.end() + 2]
    return word.group().lower() in NEGATION_WORDS or following in _CONTRACTED_NOT


def _word_typo(word: str, rng: random.Random) -> str:
    """One edit of a word of 4+ letters: inner letters swapped, an inner one dropped, or doubled."""
    # Swaps only of two different inner letters, so the word really changes.
    swaps = [i for i in range(1, len(word) - 2) if word[i] != word[i + 1]]
    operation = rng.choice(["drop", "double"] + (["swap"] if swaps else []))
    if operation == "swap":
        i = rng.choice(swaps)
        return word[:i] + word[i + 1] + word[i] + word[i + 2 :]
    if operation == "drop":
        i = rng.randrange(1, len(word) - 1)
        return word[:i] + word[i + 1 :]
    i = rng.randrange(len(word))
    return word[: i + 1] + word[i:]


def _cjk_typos(run: str) -> list[str]:
    """Every one-character slip of a run of CJK characters that leaves negations alone.

    A neighbour swap, a doubled character or a homophone; never a dropped character, which in
    a script without spaces can take a whole word's meaning with it.
    """
    editable = [i for i, char in enumerate(run) if char not in NEGATION_CHARS]
    out = [run[:i] + run[i + 1] + run[i] + run[i + 2 :] for i in editable if i + 1 in editable]
    out = [typo for typo in out if typo != run]
    out += [run[: i + 1] + run[i:] for i in editable]
    out += [
        run[:i] + other + run[i + 1 :] for i in editable for other in HOMOPHONES.get(run[i], "")
    ]
    return out


def _one_of(candidates: list[str], text: str, rng: random.Random) -> str | None:
    candidates = [c for c in dict.fromkeys(candidates) if c != text]
    return rng.choice(candidates) if candidates else None


# Each perturbation's implementation: text, rng -> a perturbed copy, or None.
_PERTURBERS: dict[str, Callable[[str, random.Random], str | None]] = {
    "casing": lambda text, rng: _one_of(_casings(text), text, rng),
    "punctuation": lambda text, rng: _one_of(_punctuations(text), text, rng),
    "typos": _typo,
    "filler": _filler,
}
if set(_PERTURBERS) != set(PERTURBATIONS):  # a new floor in gate.behaviour needs its test
    raise ImportError(
        f"gate.behaviour's perturbations {list(PERTURBATIONS)} and the implemented ones "
        f"{list(_PERTURBERS)} differ"
    )
