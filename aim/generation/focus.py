"""Focus on tokens: words or token ids through the model's tokenizer, as a dense focus vector."""

from __future__ import annotations

import numpy as np

from aim.contract import focus_vector
from aim.errors import InvalidInputError


def parse_focus(text: str | None) -> tuple[dict, dict]:
    """`"+word=5,-other=10,+#123=4"` -> ({"word": 5, 123: 4}, {"other": 10}). `+` boosts, `-`
    suppresses, `#N` is token id N (N >= 0), anything else a word."""
    boost, suppress = {}, {}
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        sign, body = item[0], item[1:]
        target, _, strength = body.rpartition("=")
        if sign not in "+-" or not target or not strength:
            raise InvalidInputError(
                f"focus items are +WORD=STRENGTH or -WORD=STRENGTH (#ID for a token id); got {item!r}"
            )
        try:
            value = float(strength)
        except ValueError:
            raise InvalidInputError(f"focus strength in {item!r} is not a number") from None
        if target.startswith("#") and len(target) > 1:
            if not target[1:].isdigit():
                raise InvalidInputError(
                    f"focus {item!r}: {target} is not a token id; #N takes a token id N >= 0 (e.g. +#123=4)"
                )
            target = int(target[1:])
        (boost if sign == "+" else suppress)[target] = value
    return boost, suppress


def word_tokens(tokenizer, word: str) -> list[int]:
    """The tokens that are `word`, alone and after a space (BPE tokenizers tell them apart). A form
    the tokenizer splits is left out: acting on its first piece would act on every word starting so
    ("zqx" would boost "z"); a word neither form of which is one token is refused."""
    ids, pieces = set(), []
    for variant in (word, " " + word):
        encoded = tokenizer.encode(variant, add_special_tokens=False)
        if len(encoded) == 1:
            ids.add(encoded[0])
        else:
            pieces.append(f"{variant!r} is {[tokenizer.decode([token]) for token in encoded]}")
    if not ids:
        raise InvalidInputError(
            f"focus word {word!r} is not one token of this tokenizer ({'; '.join(pieces)}): focus acts on whole "
            f"tokens. Pick a word that is one token, or give token ids (#N)."
        )
    return sorted(ids)


def focus_targets(tokenizer, boost: dict, suppress: dict) -> list[str]:
    """What each focus item acts on, one line each: `+fox=2 acts on 'fox' (#1234)`."""
    lines = []
    for sign, chosen in (("+", boost), ("-", suppress)):
        for key, strength in chosen.items():
            tokens = [key] if isinstance(key, int) else word_tokens(tokenizer, key)
            shown = ", ".join(f"{tokenizer.decode([token])!r} (#{token})" for token in tokens)
            lines.append(f"focus {sign}{'#' if isinstance(key, int) else ''}{key}={strength:g} acts on {shown}")
    return lines


def token_focus(tokenizer, num_classes: int, boost: dict | None = None, suppress: dict | None = None) -> np.ndarray:
    """Dense focus [V] from {word or token id: strength}: a word boosts or suppresses the tokens that
    start it (contract.focus_vector makes the vector and checks the ranges)."""

    def ids(chosen):
        out = {}
        for key, strength in (chosen or {}).items():
            for token in [key] if isinstance(key, int) else word_tokens(tokenizer, key):
                out[token] = strength
        return out

    return focus_vector(num_classes, ids(boost), ids(suppress))
