"""Text generation with a KV cache: next-token logits [B, V], prefill and decode in one graph.

The export follows Optimum's `text-generation-with-past` config of the model's architecture
(export/optimum_io.py): `input_ids`, `attention_mask` [B, past + new], `position_ids` (where the model
takes them), `past_key_values.{i}.key/value` in, `present.{i}.key/value` out, with its dynamic axes
under our names `batch`, `sequence`, `past_sequence` (0 at prefill) and `total_sequence`; the cache's
heads and head size are what Optimum's generator gives the architecture. Unlike Optimum's export
(logits [B, S, V]) the graph keeps the last position's logits only (export/wrappers.py).

Beyond the logits a build is checked on what generation does: greedy tokens at utility 0 equal
transformers' `generate()`, and decoding through the cache gives the logits of a full recompute. The
engine runs the decode loop (aim/generation/reference_runs.py); `checks` here judges its arrays.
"""

from __future__ import annotations

import weakref

import numpy as np

from aim.contract import BATCH, LOGITS
from aim.specs import DimRange, TensorSpec
from aim.tasks.base import Task
from aim.tasks.decoder_inputs import PAST, PRESENT, encode, pad_id_of, pad_left, position_ids, stop_tokens_of
from aim.verdicts import Agreement, Check, Quantization, Tolerance

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


_IO = weakref.WeakKeyDictionary()  # model -> its DecoderIO (asked for several times per build)


def decoder_io(model):
    """The model's graph IO by Optimum's text-generation-with-past config; an architecture Optimum cannot
    export with a KV cache is a CheckpointError."""
    if model not in _IO:
        from aim.errors import CheckpointError
        from aim.export.optimum_io import decoder_io as optimum_decoder_io

        try:
            _IO[model] = optimum_decoder_io(model)
        except (KeyError, ValueError, NotImplementedError) as error:
            raise CheckpointError(f"{type(model).__name__} cannot be exported with a KV cache: {error}") from error
    return _IO[model]


class TextGeneration(Task):
    name = "text-generation"
    uses_tokenizer = True
    # total_sequence = past_sequence + sequence: prefill is (sequence S, past 0), a decode step
    # (sequence 1, past T); opt values are one consistent point, as a TensorRT profile needs.
    dims = {
        BATCH: DimRange(1, 2, 8),
        "sequence": DimRange(1, 64, 1024),
        "past_sequence": DimRange(0, 64, 1023),
        "total_sequence": DimRange(1, 128, 1024),
    }
    verify_sizes = {BATCH: 2, "sequence": 12, "past_sequence": 3}
    tolerance = Tolerance(
        atol=1e-4,
        rtol=1e-4,
        why="fp32 both sides; matmul and softmax reductions ordered differently by ONNX Runtime and PyTorch, "
        "~1e-6 relative per layer",
    )
    fp16 = Agreement(
        metric="top_k",
        k=5,
        min_fraction=0.9,
        why="the next token comes from the top candidates (greedy: the first; sampling: the top-k); FP16 may "
        "swap near-tied candidates at the edge of the top-5, one swap in the two-prompt batch (0.9) is tolerated",
    )

    def input_specs(self, model) -> tuple[TensorSpec, ...]:
        io = decoder_io(model)
        return (
            *(TensorSpec(name, "int64", io.dims[name]) for name in io.tokens),
            *(TensorSpec(name, "float32", io.dims[name]) for name in io.cache(PAST)),
        )

    def output_specs(self, model) -> tuple[TensorSpec, ...]:
        io = decoder_io(model)
        return (
            TensorSpec(LOGITS, "float32", (BATCH, self.num_classes(model))),  # next token only (export/wrappers.py)
            *(TensorSpec(name, "float32", io.dims[name]) for name in io.cache(PRESENT)),
        )

    def num_classes(self, model) -> int:
        return model.config.vocab_size

    def wrap(self, model):
        from aim.export.wrappers import NextTokenWithPast

        io = decoder_io(model)
        return NextTokenWithPast(model, io.tokens, io.logits_to_keep)

    def export_context(self, model):
        from aim.export.optimum_io import WITH_PAST, patched_for_export

        return patched_for_export(model, WITH_PAST)

    def keep_fp32(self, model) -> tuple[str, ...]:
        """Rotary embeddings (angles are position x frequency: in FP16 a position near 1000 keeps only
        ~0.5 rad of precision), by their node names under the wrapper's `model`."""
        return tuple(
            f"/model/{name.replace('.', '/')}/"
            for name, module in model.named_modules()
            if "Rotary" in type(module).__name__
        )

    def example_inputs(self, model, sizes: dict[str, int], seed: int = 0) -> dict:
        """A prefill-or-decode step: `sequence` new tokens after a random cache of `past_sequence`."""
        import torch

        generator = torch.Generator().manual_seed(seed)
        batch, seq, past = sizes[BATCH], sizes["sequence"], sizes["past_sequence"]
        io = decoder_io(model)
        input_ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=generator)
        attention_mask = torch.ones(batch, past + seq, dtype=torch.int64)
        if batch > 1 and past + seq > 2:
            attention_mask[0, : (past + seq) // 3] = 0  # a left-padded row, as batched generation has
        inputs = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": torch.from_numpy(position_ids(attention_mask.numpy(), seq)),
        }
        inputs = {name: inputs[name] for name in io.tokens}
        for name in io.cache(PAST):  # the cache's static dims (heads, head size) as the spec has them
            shape = [{BATCH: batch, "past_sequence": past}.get(dim, dim) for dim in io.dims[name]]
            inputs[name] = torch.randn(*shape, generator=generator)
        return inputs

    # -- generation: the reference and the checks

    def tokenizer(self, model, checkpoint):
        """The checkpoint folder's own tokenizer, used as it is; a checkpoint without one gets none
        (generation is refused for its build; no tokenizer is trained silently for a user's model).
        Only the tiny random-weight model (no checkpoint) gets a local byte-level BPE sized to its
        vocabulary."""
        from aim.export.tokenizer import checkpoint_tokenizer, demo_tokenizer, has_tokenizer

        if checkpoint is None:
            return demo_tokenizer(model.config.vocab_size)
        if has_tokenizer(checkpoint):
            return checkpoint_tokenizer(checkpoint, model.config.vocab_size)
        return None

    def positions(self, model) -> int | None:
        return getattr(model.config, "max_position_embeddings", None)

    def reference_extra(self, model, tokenizer, seed: int = 0) -> dict:
        """PyTorch `generate()` greedy tokens for several prompts and batch sizes: the PROMPTS through
        the tokenizer, or without one, random token ids of the same lengths in words (seeded)."""
        import torch

        stop, pad = _special_tokens(model.config, tokenizer)
        arrays = {
            "generation.stop_tokens": np.array(stop, np.int64),
            "generation.pad_token_id": np.array(pad, np.int64),
        }
        prompts = _token_prompts(model.config.vocab_size, stop, seed) if tokenizer is None else None
        for index, batch in enumerate(BATCHES):
            if tokenizer is None:
                ids, mask = pad_left([prompts[i] for i in batch], pad)
            else:
                ids, mask = encode(tokenizer, [PROMPTS[i] for i in batch])
            with torch.no_grad():
                out = model.generate(
                    input_ids=torch.from_numpy(ids),
                    attention_mask=torch.from_numpy(mask),
                    max_new_tokens=NEW_TOKENS,
                    do_sample=False,
                    pad_token_id=pad,
                    eos_token_id=stop or None,
                    top_k=None,
                    top_p=None,
                    temperature=None,
                )
            arrays[f"generation.{index}.input_ids"] = ids
            arrays[f"generation.{index}.attention_mask"] = mask
            arrays[f"generation.{index}.tokens"] = out[:, ids.shape[1] :].numpy().astype(np.int64)
        return arrays

    def checks(
        self, runs: dict, extra: dict, tolerance: Tolerance, reduced: Agreement | Quantization | None = None
    ) -> list[Check]:
        """Greedy tokens at utility 0 equal PyTorch's, token for token; the KV-cache path gives the logits
        of a full recompute within the family's tolerance. `runs`: the production engine's decode loop
        on the reference's prompts (aim/generation/reference_runs.py). A reduced-precision engine cannot
        promise either under near-ties, so it is held to the task's comparator instead (see _reduced_checks),
        and an int4 / int8 one to the quantization check against its dequantized reference."""
        if isinstance(reduced, Quantization):
            from aim.verify.quantized import quantized_generation_checks

            return quantized_generation_checks(runs, extra, reduced)
        if reduced is not None:
            return _reduced_checks(runs, extra, reduced)
        equal, total, all_same, details = 0, 0, True, []
        for index in range(len(BATCHES)):
            mask, expected = extra[f"generation.{index}.attention_mask"], extra[f"generation.{index}.tokens"]
            got = runs[f"generation.{index}.tokens"]
            same = got.shape == expected.shape and np.array_equal(got, expected)
            steps = min(got.shape[1], expected.shape[1])
            equal += int(np.sum(got[:, :steps] == expected[:, :steps]))
            total += max(got.size, expected.size)
            all_same &= same
            padded = " padded" if np.any(mask == 0) else ""
            details.append(f"batch {len(mask)}{padded}: {'equal' if same else 'DIFFER'}")
        greedy = Check(
            "greedy tokens at utility 0 = PyTorch generate()",
            all_same,
            f"{equal}/{total} tokens equal ({'; '.join(details)}; {NEW_TOKENS} new tokens each)",
            {"tokens_equal": equal, "tokens": total},
        )
        worst = float(np.max(np.abs(runs["generation.cached"].astype(np.float64) - runs["generation.recomputed"])))
        kv = Check(
            "KV cache vs full recompute",
            worst <= tolerance.atol,
            f"max |diff| {worst:.3g} over {KV_STEPS} decode steps (atol {tolerance.atol:g})",
            {"max_abs_diff": worst, "atol": tolerance.atol},
        )
        return [greedy, kv]


def _special_tokens(config, tokenizer) -> tuple[list[int], int]:
    """(stop tokens, pad id): the tokenizer's, or without one the model config's (eos_token_id may be a list)."""
    if tokenizer is not None:
        return stop_tokens_of(tokenizer), pad_id_of(tokenizer)
    eos = config.eos_token_id
    stop = [] if eos is None else [int(t) for t in np.atleast_1d(eos)]
    pad = config.pad_token_id if config.pad_token_id is not None else (stop[0] if stop else 0)
    return stop, int(pad)


def _token_prompts(vocab_size: int, stop: list[int], seed: int) -> list[list[int]]:
    """Token-id prompts for a model without a tokenizer: as many ids as PROMPTS has words, drawn
    among the ids that are not stop tokens."""
    rng = np.random.default_rng(seed)
    allowed = np.setdiff1d(np.arange(vocab_size), stop)
    return [rng.choice(allowed, size=len(prompt.split())).tolist() for prompt in PROMPTS]


def _reduced_checks(runs: dict, extra: dict, reduced: Agreement) -> list[Check]:
    """FP16: along PyTorch's tokens (teacher forcing), PyTorch's greedy token is among the engine's
    top-k; and the cached and recomputed logits agree by the same comparator."""
    from aim.verify.compare import agreement, rows_still_generating

    stop = extra["generation.stop_tokens"]
    k, hits, total = max(1, reduced.k), 0, 0
    for index in range(len(BATCHES)):
        expected = extra[f"generation.{index}.tokens"]
        for step, logits in enumerate(runs[f"generation.{index}.logits"]):
            live = rows_still_generating(expected, step, stop)
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
    cached, recomputed = runs["generation.cached"], runs["generation.recomputed"]
    kv = agreement(
        "KV cache vs full recompute (reduced precision)",
        recomputed.reshape(-1, cached.shape[-1]),
        cached.reshape(-1, cached.shape[-1]),
        reduced,
        1,
    )
    return [greedy, kv]
