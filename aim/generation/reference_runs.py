"""The decode loop on a build's reference prompts: the arrays the text-generation task's checks judge.

The reference (TextGeneration.reference_extra) holds prompt batches and PyTorch generate()'s greedy
tokens for each. Here the production engine runs the same prompts through the decode loop, and the
task's `checks` compare (arrays in, verdicts out; aim/tasks/text_generation.py).
"""

from __future__ import annotations

import numpy as np

from aim.generation.loop import cached_and_recomputed, generate
from aim.tasks.text_generation import KV_STEPS, NEW_TOKENS


def generation_runs(engine, extra: dict, reduced: bool = False) -> dict[str, np.ndarray]:
    """For each reference batch: the engine's greedy tokens at utility 0, or for a reduced-precision
    engine its logits [steps, B, V] along PyTorch's tokens (teacher forcing: near-ties may make its own
    tokens differ); and for the last batch the logits of KV_STEPS steps through the cache
    (`generation.cached`; greedy, or along PyTorch's tokens for a reduced-precision engine) and
    recomputed from scratch (`generation.recomputed`). Nothing for a reference without prompts (a
    user's ONNX, an image task). Teacher-forced calls are known beforehand, so a segmented engine runs
    each batch in one sweep of its segments (generation/loop.infer_calls)."""
    batches = sorted(
        int(key.split(".")[1]) for key in extra if key.startswith("generation.") and key.endswith(".tokens")
    )
    if not batches:
        return {}
    stop, pad = extra["generation.stop_tokens"], int(extra["generation.pad_token_id"])
    runs = {}
    for index in batches:
        ids, mask = extra[f"generation.{index}.input_ids"], extra[f"generation.{index}.attention_mask"]
        options = dict(max_new_tokens=NEW_TOKENS, stop_tokens=stop, pad_token_id=pad)
        if reduced:
            run = generate(engine, ids, mask, **options, keep_logits=True, forced=extra[f"generation.{index}.tokens"])
            runs[f"generation.{index}.logits"] = np.stack(run.logits)
        else:
            runs[f"generation.{index}.tokens"] = generate(engine, ids, mask, **options).tokens
    last = batches[-1]
    runs["generation.cached"], runs["generation.recomputed"] = cached_and_recomputed(
        engine,
        extra[f"generation.{last}.input_ids"],
        extra[f"generation.{last}.attention_mask"],
        KV_STEPS,
        tokens=extra[f"generation.{last}.tokens"] if reduced else None,  # known beforehand: one sweep at 7B
    )
    return runs
