"""The decode loop for language models, over any engine with an `infer(feed) -> {name: array}`.

One graph does prefill and decode (aim/tasks/text_generation.py): the prompt goes in with a KV cache of
length 0, each later step feeds one token per sequence and the `present.*` outputs of the previous step
as `past_key_values.*`. The engine returns the modulated next-token logits [B, V]; greedy decoding,
temperature and top-k sampling then happen on the host (sampling.py), on the redistributed logits
(docs/method.md §2: the redistribution comes before argmax, temperature, top-k and sampling).

The knobs are per sequence and may change per step: `utility` is a number, a [B] array, or a callable
`(step, tokens so far [B, t]) -> number | [B]`; `focus` is None, [V], [B, V], or such a callable;
`per_step([...])` turns a list of per-step values into one.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from aim.contract import FOCUS, UTILITY, check_modulation
from aim.errors import AimError, InvalidInputError
from aim.generation.limits import check_length
from aim.generation.sampling import sample
from aim.tasks.decoder_inputs import PAST, PRESENT, pad_left, position_ids


@dataclass
class Generation:
    tokens: np.ndarray  # [B, steps] new tokens; pad after a sequence stopped
    finished: np.ndarray  # [B] stopped on a stop token
    seconds: float  # wall time of the loop (engine + host sampling)
    logits: list[np.ndarray] = field(default_factory=list)  # per step [B, V], when asked to keep them

    @property
    def tokens_per_second(self) -> float:
        return self.tokens.size / self.seconds if self.seconds > 0 else float("inf")


def per_step(values) -> Callable[[int, np.ndarray], object]:
    """A knob that changes per step from a list of per-step values (numbers, [B] or [V] / [B, V]
    arrays); the last value holds for the steps after the list ends."""
    values = list(values)
    if not values:
        raise InvalidInputError("per_step needs at least one value")
    return lambda step, tokens: values[min(step, len(values) - 1)]


def _knob_at(knob, step: int, tokens: np.ndarray):
    return knob(step, tokens) if callable(knob) else knob


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
    teacher forcing, step s takes forced[:, s] instead of its own choice (to score a given continuation);
    the calls then run together (infer_calls) and their logits are kept.
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

    def feed_of(step: int, step_ids: np.ndarray, mask: np.ndarray, past: dict, generated: np.ndarray) -> dict:
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
        return feed

    def chosen(step: int, logits: np.ndarray | None) -> np.ndarray:
        if forced is not None:
            return np.asarray(forced[:, step], np.int64)
        return sample(logits, temperature, top_k, rng).astype(np.int64)

    generated = np.zeros((batch, 0), np.int64)
    finished = np.zeros(batch, bool)
    kept, feeds, ended = [], [], []
    step_ids = ids
    start = time.perf_counter()
    for step in range(max_new_tokens):
        feed = feed_of(step, step_ids, mask, past, generated)
        if forced is not None:  # every input is known beforehand but the cache: run the calls together below
            feeds.append(feed)
            logits = None
        else:
            out = engine.infer(feed)
            logits = out["logits"]
            if keep_logits:
                kept.append(logits)
        token = np.where(finished, pad_token_id, chosen(step, logits))
        finished = finished | np.isin(token, stops)
        generated = np.concatenate([generated, token[:, None]], axis=1)
        ended.append(finished)
        if on_token is not None and forced is None:
            on_token(step, token, finished)
        if finished.all():
            break
        past = {} if forced is not None else {name: out[PRESENT + name[len(PAST) :]] for name in cache}
        step_ids = token[:, None]
        mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)
    if forced is not None:
        kept = [out["logits"] for out in infer_calls(engine, feeds)]
        for step, token in enumerate(generated.T):
            if on_token is not None:
                on_token(step, token, ended[step])
    return Generation(generated, finished, time.perf_counter() - start, kept)


def infer_calls(engine, feeds: list[dict]) -> list[dict[str, np.ndarray]]:
    """Calls in order, each without cache inputs taking the previous call's `present.*` as its past: for
    calls whose every input but the cache is known beforehand (a prefill and teacher-forced steps, or
    prefills). An engine that runs such calls together does (runtime/segments.py: segment-major, each
    segment's session opened once for all of them); any other, one call at a time."""
    together = getattr(engine, "infer_calls", None)
    if together is not None:
        return together(feeds)
    outs = []
    for feed in feeds:
        made = outs[-1] if outs else {}
        past = {PAST + name[len(PRESENT) :]: value for name, value in made.items() if name.startswith(PRESENT)}
        outs.append(engine.infer({**past, **feed}))
    return outs


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


def prefill_feed(engine, input_ids: np.ndarray, attention_mask: np.ndarray) -> dict[str, np.ndarray]:
    """A whole-sequence call from scratch (empty cache) at utility 0, no focus."""
    _cache_inputs(engine)  # a clear error for an engine without a cache
    feed = prefill_inputs(engine, input_ids, attention_mask)
    if UTILITY in engine.inputs:
        feed[UTILITY], feed[FOCUS] = check_modulation(0.0, None, input_ids.shape[0], engine.inputs[FOCUS][1][1])
    return feed


def last_logits(engine, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """Next-token logits [B, V] of whole sequences, recomputed from scratch (empty cache, utility 0)."""
    return engine.infer(prefill_feed(engine, input_ids, attention_mask))["logits"]


def cached_and_recomputed(
    engine, input_ids: np.ndarray, attention_mask: np.ndarray, steps: int, tokens: np.ndarray | None = None
):
    """Logits [steps, B, V] of `steps` decode steps through the cache, greedy or along `tokens` [B, T]
    (teacher forcing: every call known beforehand), and the same recomputed from scratch."""
    run = generate(engine, input_ids, attention_mask, max_new_tokens=steps, keep_logits=True, forced=tokens)
    prefills = []
    for step in range(len(run.logits)):
        ids = np.concatenate([input_ids, run.tokens[:, :step]], axis=1)
        mask = np.concatenate([attention_mask, np.ones((len(ids), step), np.int64)], axis=1)
        prefills.append(prefill_feed(engine, ids, mask))
    recomputed = [out["logits"] for out in infer_calls(engine, prefills)]
    return np.stack(run.logits), np.stack(recomputed)


def kv_vs_recompute(engine, input_ids: np.ndarray, attention_mask: np.ndarray, steps: int) -> float:
    """Max |logits through the cache - logits of a full recompute| over `steps` greedy steps."""
    cached, recomputed = cached_and_recomputed(engine, input_ids, attention_mask, steps)
    return float(np.max(np.abs(cached.astype(np.float64) - recomputed)))
