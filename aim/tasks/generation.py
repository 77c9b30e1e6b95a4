"""The decode loop for language models, over any engine with an `infer(feed) -> {name: array}`.

One graph does prefill and decode (tasks/text_generation.py): the prompt goes in with a KV cache of length 0,
each later step feeds one token per sequence and the `present.*` outputs of the previous step as
`past_key_values.*`. The engine returns the modulated next-token logits [B, V]; greedy decoding,
temperature and top-k sampling then happen on the host, on the redistributed logits (docs/method.md §2:
the redistribution comes before argmax, temperature, top-k and sampling).

The knobs are per sequence and may change per step: `utility` is a number, a [B] array, or a callable
`(step, tokens so far [B, t]) -> number | [B]`; `focus` is None, [V], [B, V], or such a callable;
`per_step([...])` turns a list of per-step values into one.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from aim.contract import FOCUS, UTILITY, check_modulation, focus_vector
from aim.errors import AimError, InvalidInputError

PAST, PRESENT = "past_key_values.", "present."


@dataclass
class Generation:
    tokens: np.ndarray  # [B, steps] new tokens; pad after a sequence stopped
    finished: np.ndarray  # [B] stopped on a stop token
    seconds: float  # wall time of the loop (engine + host sampling)
    logits: list[np.ndarray] = field(default_factory=list)  # per step [B, V], when asked to keep them

    @property
    def tokens_per_second(self) -> float:
        return self.tokens.size / self.seconds if self.seconds > 0 else float("inf")


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


def per_step(values) -> Callable[[int, np.ndarray], object]:
    """A knob that changes per step from a list of per-step values (numbers, [B] or [V] / [B, V]
    arrays); the last value holds for the steps after the list ends."""
    values = list(values)
    if not values:
        raise InvalidInputError("per_step needs at least one value")
    return lambda step, tokens: values[min(step, len(values) - 1)]


def _knob_at(knob, step: int, tokens: np.ndarray):
    return knob(step, tokens) if callable(knob) else knob


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


def _cache_inputs(engine) -> dict[str, tuple]:
    names = {name: dims for name, (_, dims) in engine.inputs.items() if name.startswith(PAST)}
    if not names:
        raise AimError(
            f"{getattr(engine, 'path', 'the engine')} has no {PAST}* inputs: it was exported without a KV cache. "
            "Rebuild it with `make engine MODEL=llama`."
        )
    return names


def generate(
    engine,
    input_ids,
    attention_mask: np.ndarray | None = None,
    *,
    max_new_tokens: int = 32,
    stop_tokens=(),
    pad_token_id: int = 0,
    utility=0.0,
    focus=None,
    temperature: float = 0.0,
    top_k: int = 0,
    seed: int | None = None,
    on_token: Callable[[int, np.ndarray, np.ndarray], None] | None = None,
    keep_logits: bool = False,
    forced: np.ndarray | None = None,
    max_positions: int | None = None,
) -> Generation:
    """Generates up to `max_new_tokens` per sequence. `input_ids`: a list of token lists (padded on the
    left here) or a left-padded [B, S] array with its `attention_mask`. A sequence stops at any of
    `stop_tokens` and is padded with `pad_token_id` afterwards; the loop ends when all have stopped.
    `on_token(step, tokens [B], finished [B])` is called after each step (streaming). `forced` [B, T]:
    teacher forcing, step s takes forced[:, s] instead of its own choice (to score a given continuation).
    A prompt longer than the engine's range or the model's positions (`max_positions`), or more new
    tokens than fit after it, is refused before anything runs."""
    if attention_mask is None and isinstance(input_ids, np.ndarray):
        ids, mask = input_ids.astype(np.int64), np.ones(input_ids.shape, np.int64)  # no padding
    elif attention_mask is None:
        ids, mask = pad_left([list(prompt) for prompt in input_ids], pad_token_id)
    else:
        ids, mask = np.asarray(input_ids, np.int64), np.asarray(attention_mask, np.int64)
        if ids.shape != mask.shape or ids.ndim != 2:
            raise InvalidInputError(
                f"input_ids {list(ids.shape)} and attention_mask {list(mask.shape)} must be the same [B, S]"
            )
    if forced is not None:
        max_new_tokens = min(max_new_tokens, np.shape(forced)[1])
    if max_new_tokens < 1:
        raise InvalidInputError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if len(mask) == 0:
        raise InvalidInputError("give at least one prompt")
    empty = np.flatnonzero(~mask.astype(bool).any(axis=1))  # a fully masked row would generate from nothing
    if empty.size:
        raise InvalidInputError(f"every prompt needs at least one token; prompt {empty[0] + 1} has none")
    check_length(engine, ids.shape[1], max_new_tokens, max_positions)
    if temperature < 0 or not np.isfinite(temperature):
        raise InvalidInputError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k < 0:
        raise InvalidInputError(f"top_k must be >= 0 (0 = whole vocabulary), got {top_k}")
    batch = ids.shape[0]
    cache = _cache_inputs(engine)
    modulated = UTILITY in engine.inputs and FOCUS in engine.inputs
    num_classes = engine.inputs[FOCUS][1][1] if modulated else None
    if seed is not None and hasattr(engine, "set_seed"):
        engine.set_seed(seed)  # the in-graph noise, where the backend can seed it
    rng = np.random.default_rng(seed)
    stops = np.array(sorted({int(t) for t in np.atleast_1d(stop_tokens)}) or [-1], np.int64)

    past = {}  # prefill: an empty cache, [B, heads, 0, head_dim]
    for name, dims in cache.items():
        if len(dims) != 4 or not all(isinstance(d, int) for d in (dims[1], dims[3])):
            raise AimError(
                f"cache input {name} has dims {dims}; expected [batch, heads, past_sequence, head_dim] with "
                "static heads and head_dim"
            )
        past[name] = np.zeros([batch, dims[1], 0, dims[3]], np.float32)
    generated = np.zeros((batch, 0), np.int64)
    finished = np.zeros(batch, bool)
    kept = []
    step_ids = ids
    start = time.perf_counter()
    for step in range(max_new_tokens):
        feed = {"input_ids": step_ids, "attention_mask": mask, **past}
        if "position_ids" in engine.inputs:
            feed["position_ids"] = position_ids(mask, step_ids.shape[1])
        u, f = _knob_at(utility, step, generated), _knob_at(focus, step, generated)
        if modulated:
            feed[UTILITY], feed[FOCUS] = check_modulation(u, f, batch, num_classes)
        elif np.any(np.asarray(u) != 0) or f is not None:
            raise InvalidInputError(
                f"{getattr(engine, 'path', 'the engine')} is not modulated: it has no utility or focus input"
            )
        out = engine.infer(feed)
        logits = out["logits"]
        if keep_logits:
            kept.append(logits)
        token = (
            sample(logits, temperature, top_k, rng).astype(np.int64)
            if forced is None
            else np.asarray(forced[:, step], np.int64)
        )
        token = np.where(finished, pad_token_id, token)
        finished = finished | np.isin(token, stops)
        generated = np.concatenate([generated, token[:, None]], axis=1)
        if on_token is not None:
            on_token(step, token, finished)
        if finished.all():
            break
        past = {name: out[PRESENT + name[len(PAST) :]] for name in cache}
        step_ids = token[:, None]
        mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)
    return Generation(generated, finished, time.perf_counter() - start, kept)


def prefill_inputs(engine, input_ids: np.ndarray, attention_mask: np.ndarray) -> dict[str, np.ndarray]:
    """The model inputs of a prefill step (whole sequences, nothing cached): tokens, mask, positions
    and an empty cache [B, heads, 0, head_dim] for each cache input the engine has. An engine without
    a cache gets what it takes of the tokens and the mask."""
    batch = input_ids.shape[0]
    feed = {"input_ids": np.asarray(input_ids, np.int64), "attention_mask": np.asarray(attention_mask, np.int64)}
    if "position_ids" in engine.inputs:
        feed["position_ids"] = position_ids(feed["attention_mask"], input_ids.shape[1])
    for name, (_, dims) in engine.inputs.items():
        if name.startswith(PAST):
            feed[name] = np.zeros([batch, dims[1], 0, dims[3]], np.float32)
    return {name: value for name, value in feed.items() if name in engine.inputs}


def last_logits(engine, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """Next-token logits [B, V] of whole sequences, recomputed from scratch (empty cache, utility 0)."""
    batch = input_ids.shape[0]
    _cache_inputs(engine)  # a clear error for an engine without a cache
    feed = prefill_inputs(engine, input_ids, attention_mask)
    if UTILITY in engine.inputs:
        feed[UTILITY], feed[FOCUS] = check_modulation(0.0, None, batch, engine.inputs[FOCUS][1][1])
    return engine.infer(feed)["logits"]


def cached_and_recomputed(engine, input_ids: np.ndarray, attention_mask: np.ndarray, steps: int):
    """Logits [steps, B, V] of `steps` greedy steps through the cache, and the same recomputed from scratch."""
    run = generate(engine, input_ids, attention_mask, max_new_tokens=steps, keep_logits=True)
    recomputed = []
    for step in range(len(run.logits)):
        ids = np.concatenate([input_ids, run.tokens[:, :step]], axis=1)
        mask = np.concatenate([attention_mask, np.ones((len(ids), step), np.int64)], axis=1)
        recomputed.append(last_logits(engine, ids, mask))
    return np.stack(run.logits), np.stack(recomputed)


def kv_vs_recompute(engine, input_ids: np.ndarray, attention_mask: np.ndarray, steps: int) -> float:
    """Max |logits through the cache - logits of a full recompute| over `steps` greedy steps."""
    cached, recomputed = cached_and_recomputed(engine, input_ids, attention_mask, steps)
    return float(np.max(np.abs(cached.astype(np.float64) - recomputed)))


# ---------------------------------------------------------------------------------------------
# Focus on tokens: words or token ids through the model's tokenizer.


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


def load_build(folder: str | os.PathLike, log: Callable[[str], None] | None = None):
    """(engine, tokenizer, manifest) of a text-generation build folder, its files checked against the
    manifest's hashes. The engine is the build's own where it can run; a TensorRT plan that cannot run
    on this machine is replaced by ONNX Runtime on the production graph it was built from (`log` is
    told). The tokenizer is read without transformers (tasks/tokens.py)."""
    from aim.runtime.folder import Build
    from aim.tasks.tokens import TextTokenizer

    build = Build.open(folder, check=False)  # refused for what it lacks before hashing gigabytes
    manifest = build.manifest
    if not manifest.tokenizer:
        if any(tensor.name.startswith(PAST) for tensor in manifest.graph.inputs):
            raise AimError(
                f"{folder} was built from a checkpoint without a tokenizer ({manifest.source.checkpoint}), so there is "
                f"no way to turn text into its tokens. Save the model's own tokenizer into that folder "
                f"(`AutoTokenizer.from_pretrained(...).save_pretrained(DIR)`) and rebuild. The engine itself is "
                f"verified and takes token ids (`aim run`, Triton)."
            )
        raise AimError(
            f"{folder} has no tokenizer: it is not a text-generation build. Build one with `make engine MODEL=llama`."
        )
    build.check_files()
    engine, note = build.runner("production"), build.runs_on()[1]
    if note and log is not None:
        log(note)
    return engine, TextTokenizer(manifest.folder / manifest.tokenizer), manifest


def stop_tokens_of(tokenizer) -> list[int]:
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


def pad_id_of(tokenizer) -> int:
    for token in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if token is not None:
            return token


def encode(tokenizer, prompts) -> tuple[np.ndarray, np.ndarray]:
    """Prompts as one left-padded batch: (input_ids, attention_mask). `tokenizer`: a TextTokenizer,
    or a transformers tokenizer that pads on the left."""
    if hasattr(tokenizer, "batch"):
        return tokenizer.batch(list(prompts))
    encoded = tokenizer(list(prompts), padding=True, return_tensors="np")
    return encoded["input_ids"].astype(np.int64), encoded["attention_mask"].astype(np.int64)


def generate_text(
    folder: str | os.PathLike,
    prompts: list[str],
    *,
    utility=0.0,
    focus: str | None = None,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_k: int = 0,
    seed: int | None = None,
    stream: Callable[[str], None] | None = None,
    log: Callable[[str], None] | None = None,
    truncate: bool = False,
) -> tuple[list[str], Generation]:
    """Texts generated by the engine of a build folder for `prompts`; `focus` as in parse_focus
    ("+word=5,-other=10,+#123=4"; `log` is told which tokens each item acts on). `stream(text)`
    receives the first sequence's new text piece by piece. A prompt too long for the build is refused,
    or with `truncate` cut to its last tokens (`log` is told)."""
    if not prompts:
        raise InvalidInputError("give at least one prompt")
    engine, tokenizer, manifest = load_build(folder, log)
    return texts_of(
        engine,
        tokenizer,
        prompts,
        max_positions=manifest.max_positions,
        utility=utility,
        focus=focus,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        seed=seed,
        stream=stream,
        log=log,
        truncate=truncate,
    )


def texts_of(
    engine,
    tokenizer,
    prompts: list[str],
    *,
    max_positions: int | None = None,
    utility=0.0,
    focus: str | None = None,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_k: int = 0,
    seed: int | None = None,
    stream: Callable[[str], None] | None = None,
    log: Callable[[str], None] | None = None,
    truncate: bool = False,
) -> tuple[list[str], Generation]:
    """generate_text on an engine and tokenizer already open (a server opens them once)."""
    if not prompts:
        raise InvalidInputError("give at least one prompt")
    focus_array = None
    if focus:
        boost, suppress = parse_focus(focus)
        focus_array = token_focus(tokenizer, engine.inputs[FOCUS][1][1], boost, suppress)
        for line in focus_targets(tokenizer, boost, suppress) if log is not None else ():
            log(line)
    ids, mask = encode(tokenizer, prompts)
    empty = [i + 1 for i, row in enumerate(mask) if not row.any()]
    if empty:
        raise InvalidInputError(f"prompt {empty[0]} ({prompts[empty[0] - 1]!r}) encodes to no tokens: give some text")
    longest_prompt, total, why = length_limits(engine, max_positions)
    if truncate and total is not None:
        keep = min(total - max_new_tokens + 1, longest_prompt or total)
        if keep < 1:
            check_length(engine, 1, max_new_tokens, max_positions)  # says why no prompt fits
        if ids.shape[1] > keep:
            ids, mask = ids[:, -keep:], mask[:, -keep:]
            if log is not None:
                log(f"prompts cut to their last {keep} tokens, so that {max_new_tokens} new tokens fit ({why})")
    stops = stop_tokens_of(tokenizer)
    first, state = [], {"shown": "", "done": False}

    def on_token(step, token, finished):
        if state["done"]:
            return
        if int(token[0]) in stops:
            state["done"] = True
            return
        first.append(int(token[0]))
        text = tokenizer.decode(first, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # else a multi-byte character is incomplete: wait for its next byte
            stream(text[len(state["shown"]) :])
            state["shown"] = text

    run = generate(
        engine,
        ids,
        mask,
        max_new_tokens=max_new_tokens,
        stop_tokens=stops,
        pad_token_id=pad_id_of(tokenizer),
        utility=utility,
        focus=focus_array,
        temperature=temperature,
        top_k=top_k,
        seed=seed,
        on_token=on_token if stream else None,
        max_positions=max_positions,
    )
    texts = [tokenizer.decode(until_stop(row, stops), skip_special_tokens=True) for row in run.tokens]
    return texts, run


def until_stop(tokens: np.ndarray, stops) -> list[int]:
    """The tokens of one sequence before its first stop token."""
    hits = np.flatnonzero(np.isin(tokens, list(stops)))
    return tokens[: hits[0] if hits.size else len(tokens)].tolist()
