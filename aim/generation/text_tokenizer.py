"""A build's tokenizer read without transformers: `tokenizer.json` through the `tokenizers` library,
the special tokens from `tokenizer_config.json` / `special_tokens_map.json`. Generation needs no
more, so `aim generate` runs where torch and transformers are not installed.

A fast tokenizer's tokenizer.json holds the whole pipeline (normaliser, pre-tokeniser, model, the
post-processor that adds BOS), so encoding here gives transformers' ids (a test holds them equal).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from aim.errors import AimError

FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _content(token) -> str | None:
    """A special token as the config stores it: a string, or an AddedToken dict."""
    if isinstance(token, dict):
        return token.get("content")
    return token if isinstance(token, str) else None


class TextTokenizer:
    def __init__(self, folder: str | os.PathLike):
        from tokenizers import Tokenizer

        folder = Path(folder)
        if not (folder / "tokenizer.json").is_file():
            raise AimError(
                f"{folder} has no tokenizer.json: rebuild the engine, which saves the tokenizer generation needs"
            )
        try:
            self.backend = Tokenizer.from_file(str(folder / "tokenizer.json"))
            config = {}
            for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins, as in transformers
                if (folder / name).is_file():
                    config.update(json.loads((folder / name).read_text()))
        except Exception as error:  # tokenizers raises plain Exceptions for a corrupt file
            raise AimError(f"the tokenizer in {folder} is not readable ({error}): rebuild the engine") from None
        self.eos_token = _content(config.get("eos_token"))
        self.pad_token = _content(config.get("pad_token"))
        self.eos_token_id = self._id(self.eos_token)
        self.pad_token_id = self._id(self.pad_token)

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    def get_vocab(self) -> dict[str, int]:
        return self.backend.get_vocab(with_added_tokens=True)

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def batch(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Prompts as one left-padded batch: (input_ids, attention_mask), int64."""
        encoded = [self.encode(prompt) for prompt in prompts]
        width = max((len(ids) for ids in encoded), default=0)
        pad = next(t for t in (self.pad_token_id, self.eos_token_id, 0) if t is not None)
        ids = np.full((len(encoded), width), pad, np.int64)
        mask = np.zeros((len(encoded), width), np.int64)
        for row, tokens in enumerate(encoded):
            if tokens:
                ids[row, width - len(tokens) :] = tokens
                mask[row, width - len(tokens) :] = 1
        return ids, mask
