"""Text generation with a KV cache: next-token logits [B, V], prefill and decode in one graph.

The export follows Optimum's `text-generation-with-past` names: `input_ids`, `attention_mask`
[B, past + new], `position_ids`, `past_key_values.{i}.key/value` in, `present.{i}.key/value` out,
dynamic `batch`, `sequence`, `past_sequence` (0 at prefill) and `total_sequence`. Unlike Optimum's
export (logits [B, S, V]) the graph keeps the last position's logits only (export/wrappers.py).

Beyond the logits a build is checked on what generation does: greedy tokens at utility 0 equal
transformers' `generate()`, and decoding through the cache gives the logits of a full recompute.
"""

from __future__ import annotations

import numpy as np

from aim.contract import BATCH, LOGITS
from aim.specs import Agreement, Check, TensorSpec, Tolerance
from aim.tasks.base import Task
from aim.tasks.generation import (
    PAST,
    PRESENT,
    cached_and_recomputed,
    encode,
    generate,
    kv_vs_recompute,
    pad_id_of,
    position_ids,
    stop_tokens_of,
)

# The generation reference of a build: prompts, and the batches made of them.
PROMPTS = (
    "def main():",
    "The quick brown fox jumps over the lazy dog",
    "import",
    "Once upon a time, in a land far away,",
)
BATCHES = ((0,), (1, 2, 3), (3, 0))  # batch 1, a padded batch of 3, a padded batch of 2
NEW_TOKENS = 12
KV_STEPS = 6
TRAIN_WINDOW = 64  # tokens per training sequence


def cache_shape(model) -> tuple[int, int, int]:
    """(layers, key/value heads, head dim) of the model's KV cache."""
    config = model.config
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_hidden_layers, heads, head_dim


def cache_names(layers: int, prefix: str) -> list[str]:
    return [f"{prefix}{i}.{kind}" for i in range(layers) for kind in ("key", "value")]


class TextGeneration(Task):
    name = "text-generation"
    metric = "next-token accuracy"
    utility_grid = "language"

    def input_specs(self, model) -> tuple[TensorSpec, ...]:
        layers, heads, head_dim = cache_shape(model)
        return (
            TensorSpec("input_ids", "int64", (BATCH, "sequence")),
            TensorSpec("attention_mask", "int64", (BATCH, "total_sequence")),  # past + new tokens
            TensorSpec("position_ids", "int64", (BATCH, "sequence")),
            *(TensorSpec(name, "float32", (BATCH, heads, "past_sequence", head_dim)) for name in cache_names(layers, PAST)),
        )

    def output_specs(self, model) -> tuple[TensorSpec, ...]:
        layers, heads, head_dim = cache_shape(model)
        return (
            TensorSpec(LOGITS, "float32", (BATCH, None)),
            *(TensorSpec(name, "float32", (BATCH, heads, "total_sequence", head_dim)) for name in cache_names(layers, PRESENT)),
        )

    def num_classes(self, model) -> int:
        return model.config.vocab_size

    def wrap(self, model):
        from aim.export.wrappers import NextTokenWithPast

        return NextTokenWithPast(model)

    def export_context(self):
        from aim.export.patches import traceable_attention_masks

        return traceable_attention_masks()

    def example_inputs(self, model, sizes: dict[str, int], seed: int = 0) -> dict:
        """A prefill-or-decode step: `sequence` new tokens after a random cache of `past_sequence`."""
        import torch

        generator = torch.Generator().manual_seed(seed)
        batch, seq, past = sizes[BATCH], sizes["sequence"], sizes["past_sequence"]
        input_ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=generator)
        attention_mask = torch.ones(batch, past + seq, dtype=torch.int64)
        if batch > 1 and past + seq > 2:
            attention_mask[0, : (past + seq) // 3] = 0  # a left-padded row, as batched generation has
        layers, heads, head_dim = cache_shape(model)
        inputs = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": torch.from_numpy(position_ids(attention_mask.numpy(), seq)),
        }
        for name in cache_names(layers, PAST):
            inputs[name] = torch.randn(batch, heads, past, head_dim, generator=generator)
        return inputs

    # -- generation: the reference and the checks

    def tokenizer(self, model, checkpoint):
        """The checkpoint folder's own tokenizer; the tiny random-weight model (no checkpoint) gets a
        local byte-level BPE sized to its vocabulary."""
        from aim.export.tokenizer import checkpoint_tokenizer, demo_tokenizer, has_tokenizer

        if has_tokenizer(checkpoint):
            return checkpoint_tokenizer(checkpoint, model.config.vocab_size)
        return demo_tokenizer(model.config.vocab_size)

    def positions(self, model) -> int | None:
        return getattr(model.config, "max_position_embeddings", None)

    def reference_extra(self, model, tokenizer, seed: int = 0) -> dict:
        """PyTorch `generate()` greedy tokens for several prompts and batch sizes."""
        import torch

        stop, pad = stop_tokens_of(tokenizer), pad_id_of(tokenizer)
        arrays = {"generation.stop_tokens": np.array(stop, np.int64), "generation.pad_token_id": np.array(pad, np.int64)}
        for index, batch in enumerate(BATCHES):
            ids, mask = encode(tokenizer, [PROMPTS[i] for i in batch])
            with torch.no_grad():
                out = model.generate(
                    input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), max_new_tokens=NEW_TOKENS,
                    do_sample=False, pad_token_id=pad, eos_token_id=stop or None, top_k=None, top_p=None, temperature=None,
                )
            arrays[f"generation.{index}.input_ids"] = ids
            arrays[f"generation.{index}.attention_mask"] = mask
            arrays[f"generation.{index}.tokens"] = out[:, ids.shape[1]:].numpy().astype(np.int64)
        return arrays

    def checks(self, engine, extra: dict, tolerance: Tolerance, reduced: Agreement | None = None) -> list[Check]:
        """Greedy tokens at utility 0 equal PyTorch's, token for token; the KV-cache path gives the logits
        of a full recompute within the family's tolerance. A reduced-precision engine cannot promise
        either under near-ties, so it is held to the task's comparator instead (see _reduced_checks)."""
        if reduced is not None:
            return _reduced_checks(engine, extra, reduced)
        stop, pad = extra["generation.stop_tokens"], int(extra["generation.pad_token_id"])
        equal, total, all_same, details = 0, 0, True, []
        for index in range(len(BATCHES)):
            ids, mask = extra[f"generation.{index}.input_ids"], extra[f"generation.{index}.attention_mask"]
            expected = extra[f"generation.{index}.tokens"]
            got = generate(engine, ids, mask, max_new_tokens=NEW_TOKENS, stop_tokens=stop, pad_token_id=pad).tokens
            same = got.shape == expected.shape and np.array_equal(got, expected)
            steps = min(got.shape[1], expected.shape[1])
            equal += int(np.sum(got[:, :steps] == expected[:, :steps]))
            total += max(got.size, expected.size)
            all_same &= same
            padded = " padded" if np.any(mask == 0) else ""
            details.append(f"batch {len(ids)}{padded}: {'equal' if same else 'DIFFER'}")
        greedy = Check(
            "greedy tokens at utility 0 = PyTorch generate()",
            all_same,
            f"{equal}/{total} tokens equal ({'; '.join(details)}; {NEW_TOKENS} new tokens each)",
            {"tokens_equal": equal, "tokens": total},
        )
        last = len(BATCHES) - 1
        worst = kv_vs_recompute(engine, extra[f"generation.{last}.input_ids"], extra[f"generation.{last}.attention_mask"], KV_STEPS)
        kv = Check(
            "KV cache vs full recompute",
            worst <= tolerance.atol,
            f"max |diff| {worst:.3g} over {KV_STEPS} decode steps (atol {tolerance.atol:g})",
            {"max_abs_diff": worst, "atol": tolerance.atol},
        )
        return [greedy, kv]

    # -- data: the standard library's documentation, tokenised by a BPE trained here

    def training_data(self, trained, seed: int = 0, checkpoint=None, train_inputs: int | None = None) -> dict:
        from aim.tasks import datasets

        vocab = trained.config().vocab_size
        tokenizer = load_tokenizer(checkpoint) if checkpoint else datasets.corpus_tokenizer(vocab)
        return {"tokenizer": tokenizer, **datasets.corpus(tokenizer, seed)}

    def model_config(self, trained, data: dict):
        return trained.config()

    def training_batches(self, data: dict, batch: int, rng):
        import torch

        ids = data["train"]
        while True:
            starts = rng.integers(0, len(ids) - TRAIN_WINDOW - 1, size=batch)
            window = torch.tensor(ids[starts[:, None] + np.arange(TRAIN_WINDOW + 1)])
            yield {"input_ids": window[:, :-1]}, window[:, 1:]

    def training_logits(self, model, inputs: dict):
        """Logits of every position [B, S, V] (the loss sees every next token)."""
        return model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"), use_cache=False).logits

    def loss(self, logits, labels):
        import torch.nn.functional as F

        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))

    def predictions(self, logits):
        return logits[:, -1].argmax(-1).numpy()

    def eval_split(self, engine, checkpoint, split: str, seed: int = 0, count: int | None = None):
        """Windows of the corpus, each a prefill step of the KV-cache export (positions and an empty
        cache added), labelled with the token that follows."""
        from aim.tasks import datasets
        from aim.tasks.generation import prefill_inputs

        data = datasets.corpus(load_tokenizer(checkpoint), seed)[split]
        if count is not None:
            data = data.take(slice(0, count))
        return datasets.Split(prefill_inputs(engine, data.inputs["input_ids"], data.inputs["attention_mask"]), data.labels)


def load_tokenizer(checkpoint):
    """A trained checkpoint's tokenizer (tokenizer.json beside the weights)."""
    from pathlib import Path

    from aim.errors import AimError

    path = Path(checkpoint)
    if not (path / "tokenizer.json").is_file():
        raise AimError(f"{path} has no tokenizer.json: the evaluation of a text model needs the checkpoint's tokenizer")
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(path))


def _reduced_checks(engine, extra: dict, reduced: Agreement) -> list[Check]:
    """FP16: along PyTorch's tokens (teacher forcing), PyTorch's greedy token is among the engine's
    top-k; and the cached and recomputed logits agree by the same comparator."""
    from aim.verify.compare import agreement

    stop, pad = extra["generation.stop_tokens"], int(extra["generation.pad_token_id"])
    k, hits, total = max(1, reduced.k), 0, 0
    for index in range(len(BATCHES)):
        ids, mask = extra[f"generation.{index}.input_ids"], extra[f"generation.{index}.attention_mask"]
        expected = extra[f"generation.{index}.tokens"]
        run = generate(engine, ids, mask, max_new_tokens=NEW_TOKENS, stop_tokens=stop, pad_token_id=pad, keep_logits=True, forced=expected)
        for step, logits in enumerate(run.logits):
            live = np.flatnonzero(~np.isin(expected[:, :step], stop).any(axis=1)) if step else np.arange(len(ids))
            top = np.argpartition(-logits[live], k - 1, axis=1)[:, :k]
            hits += int(np.sum(np.any(top == expected[live, step][:, None], axis=1)))
            total += len(live)
    fraction = hits / max(total, 1)
    greedy = Check(
        f"PyTorch's greedy tokens in the engine's top-{k} (teacher forcing, reduced precision)",
        fraction >= reduced.min_fraction,
        f"{hits}/{total} steps ({fraction:.4f}, needs >= {reduced.min_fraction:g})",
        {"fraction": fraction, "k": k, "steps": total},
    )
    last = len(BATCHES) - 1
    cached, recomputed = cached_and_recomputed(engine, extra[f"generation.{last}.input_ids"], extra[f"generation.{last}.attention_mask"], KV_STEPS)
    kv = agreement("KV cache vs full recompute (reduced precision)", recomputed.reshape(-1, cached.shape[-1]), cached.reshape(-1, cached.shape[-1]), reduced, 1)
    return [greedy, kv]
