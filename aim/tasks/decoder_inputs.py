"""What a text-generation graph takes, as the task exports it and the decode loop (aim/generation) feeds
it: prompts left-padded into one batch with their attention mask, positions counted over attended
tokens only (as transformers' generate() counts them), and the KV cache under Optimum's names.
"""

from __future__ import annotations

import numpy as np

from aim.errors import InvalidInputError

PAST, PRESENT = "past_key_values.", "present."  # cache inputs and outputs: `past_key_values.{i}.key`, ...


def pad_left(prompts: list[list[int]], pad_token_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Prompts of different lengths as one left-padded batch: (input_ids, attention_mask), int64."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise InvalidInputError("every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad_token_id, np.int64)
    mask = np.zeros((len(prompts), width), np.int64)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = prompt
        mask[row, width - len(prompt) :] = 1
    return ids, mask


def position_ids(attention_mask: np.ndarray, new_tokens: int) -> np.ndarray:
    """Positions counting only attended tokens (left padding), as transformers' generate() does."""
    positions = np.cumsum(attention_mask, axis=-1) - 1
    positions[attention_mask == 0] = 1
    return positions[:, -new_tokens:].astype(np.int64)


def encode(tokenizer, prompts) -> tuple[np.ndarray, np.ndarray]:
    """Prompts as one left-padded batch: (input_ids, attention_mask). `tokenizer`: a build's tokenizer
    read without transformers (aim/generation/text_tokenizer.py), or a transformers tokenizer that pads on
    the left."""
    if hasattr(tokenizer, "batch"):
        return tokenizer.batch(list(prompts))
    encoded = tokenizer(list(prompts), padding=True, return_tensors="np")
    return encoded["input_ids"].astype(np.int64), encoded["attention_mask"].astype(np.int64)


def stop_tokens_of(tokenizer) -> list[int]:
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


def pad_id_of(tokenizer) -> int:
    for token in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if token is not None:
            return token
