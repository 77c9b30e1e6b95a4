"""How long a prompt and its continuation may be: the engine's range (its profile) and the positions the
model was made for, checked before any work."""

from __future__ import annotations

from aim.errors import InvalidInputError


def length_limits(engine, max_positions: int | None = None) -> tuple[int | None, int | None, str]:
    """(longest prompt, longest prompt + new tokens, where the limits come from): the engine's range
    (its profile: `input_ids` [batch, sequence], `attention_mask` [batch, past + new]) and the
    positions the model was made for. None where nothing limits."""
    profile = getattr(engine, "profile", None) or {}
    prompt = profile.get("input_ids", {}).get("max", [None, None])[1]
    total = profile.get("attention_mask", {}).get("max", [None, None])[1]
    why = [f"the engine's range: prompts of up to {prompt} tokens, {total} positions in all"] if total else []
    if max_positions is not None and (total is None or max_positions < total):
        total = max_positions
        why.append(f"the model's {max_positions} positions")
    if prompt is not None and total is not None:
        prompt = min(prompt, total)
    return prompt, total, " and ".join(why)


def check_length(engine, prompt_tokens: int, max_new_tokens: int, max_positions: int | None = None) -> None:
    """Refuses, before any work, a prompt or a number of new tokens past the engine's range or the
    model's positions (the last step attends to prompt + new tokens - 1 positions)."""
    longest_prompt, total, why = length_limits(engine, max_positions)
    if longest_prompt is not None and prompt_tokens > longest_prompt:
        raise InvalidInputError(
            f"the prompt has {prompt_tokens} tokens, more than the {longest_prompt} this build takes ({why}). "
            f"Shorten it, or pass --truncate to keep its last tokens."
        )
    if total is not None and prompt_tokens + max_new_tokens - 1 > total:
        room = total - prompt_tokens + 1
        raise InvalidInputError(
            f"{prompt_tokens} prompt tokens and {max_new_tokens} new tokens need {prompt_tokens + max_new_tokens - 1} "
            f"positions, more than the {total} this build takes ({why}). Ask for at most {room} new tokens "
            f"(--max-new-tokens {room}), shorten the prompt, or pass --truncate to keep its last tokens."
        )
