"""A model directory's tokenizer without transformers: its `tokenizer.json`, run by `tokenizers`.

transformers' fast tokenizers are this same Rust tokenizer with a Python layer on top; for
what inference asks of them (truncate to `max_length`, add the special tokens, no padding)
the ids are the same (tests/unit/test_tokenizer.py compares them). CPU serving uses it so that
it imports neither transformers nor torch (textgate.runtime).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenizers import Encoding
from tokenizers import Tokenizer as RustTokenizer

from textgate.errors import DataError

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"


def _special_token(model_dir: Path, name: str) -> str | None:
    """The text of special token `name` (e.g. "mask_token") as transformers saved it, or None."""
    for file in (TOKENIZER_CONFIG_FILE, SPECIAL_TOKENS_FILE):
        path = model_dir / file
        if not path.is_file():
            continue
        value = json.loads(path.read_text(encoding="utf-8")).get(name)
        if isinstance(value, dict):  # an AddedToken: {"content": "[MASK]", ...}
            value = value.get("content")
        if isinstance(value, str) and value:
            return value
    return None


class FastTokenizer:
    """The part of a transformers tokenizer that textgate.inference uses (`Tokenizer`)."""

    def __init__(self, model_dir: str | Path) -> None:
        model_dir = Path(model_dir)
        path = model_dir / TOKENIZER_FILE
        if not path.is_file():
            raise DataError(
                f"{model_dir} has no {TOKENIZER_FILE}: save the model with a fast tokenizer "
                "(textgate.model.save_classifier does), or serve it with the torch runtime"
            )
        self._tokenizer = RustTokenizer.from_file(str(path))
        self._tokenizer.no_padding()
        self._max_length: int | None = None
        self.pad_token_id = self._token_id(model_dir, "pad_token")
        self.mask_token_id = self._token_id(model_dir, "mask_token")

    def _token_id(self, model_dir: Path, name: str) -> int | None:
        token = _special_token(model_dir, name)
        return None if token is None else self._tokenizer.token_to_id(token)

    def _truncate(self, max_length: int | None) -> None:
        # As transformers sets it for `truncation=True, max_length=n` (right side).
        if max_length == self._max_length:
            return
        if max_length is None:
            self._tokenizer.no_truncation()
        else:
            self._tokenizer.enable_truncation(
                max_length, stride=0, strategy="longest_first", direction="right"
            )
        self._max_length = max_length

    def __call__(
        self,
        text: str | Sequence[str],
        *,
        truncation: bool = False,
        max_length: int | None = None,
        return_special_tokens_mask: bool = False,
    ) -> dict[str, Any]:
        """Token ids of one text (lists) or of each text of a list (lists of lists), unpadded.

        The keys are those transformers gives: input_ids, token_type_ids, attention_mask, and
        special_tokens_mask when asked for.
        """
        self._truncate(max_length if truncation else None)
        single = isinstance(text, str)
        encodings: list[Encoding] = self._tokenizer.encode_batch([text] if single else list(text))
        fields = {
            "input_ids": [encoding.ids for encoding in encodings],
            "token_type_ids": [encoding.type_ids for encoding in encodings],
            "attention_mask": [encoding.attention_mask for encoding in encodings],
        }
        if return_special_tokens_mask:
            fields["special_tokens_mask"] = [e.special_tokens_mask for e in encodings]
        return {key: value[0] if single else value for key, value in fields.items()}

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        """The vocabulary entry of each id (wordpieces such as "##ing" stay as they are)."""
        return [self._tokenizer.id_to_token(int(i)) or "" for i in ids]
