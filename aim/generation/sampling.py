"""Next tokens from logits on the host: greedy, or temperature and top-k sampling."""

from __future__ import annotations

import numpy as np


def sample(logits: np.ndarray, temperature: float, top_k: int, rng: np.random.Generator) -> np.ndarray:
    """Next tokens [B] from logits [B, V]: argmax if temperature is 0, else softmax(logits / T) over the
    top_k largest (all if top_k is 0), drawn from `rng`."""
    if temperature == 0:
        return np.argmax(logits, axis=-1)
    scaled = logits.astype(np.float64) / temperature
    if 0 < top_k < scaled.shape[-1]:
        candidates = np.argpartition(-scaled, top_k - 1, axis=-1)[:, :top_k]
    else:
        candidates = np.broadcast_to(np.arange(scaled.shape[-1]), scaled.shape)
    chosen = np.take_along_axis(scaled, candidates, axis=-1)
    probabilities = np.exp(chosen - chosen.max(axis=-1, keepdims=True))
    cumulative = np.cumsum(probabilities, axis=-1)
    draws = rng.random(len(scaled))[:, None] * cumulative[:, -1:]
    index = np.minimum((cumulative < draws).sum(axis=-1), candidates.shape[-1] - 1)
    return np.take_along_axis(candidates, index[:, None], axis=-1)[:, 0]
