"""Tokenizers: the checkpoint's own, or a byte-level BPE trained here (no hub).

One recipe, `train_bpe`, serves both models that need a tokenizer trained locally: the tiny
random-weight demo model (on the standard library's modules, to exactly its 32,000 ids) and the
small model trained on the documentation corpus (1,024 ids). A user's checkpoint never gets one
trained silently: it brings its own or generation is refused.
"""

from __future__ import annotations

import functools
import os
import sysconfig
from pathlib import Path

from aim.errors import CheckpointError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
DEMO_SPECIAL = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2: Llama's unk, bos, eos


def train_bpe(
    texts: tuple[str, ...] | list[str],
    vocab_size: int,
    special: tuple[str, ...],
    unk: str | None = None,
    fill: bool = False,
) -> str:
    """A byte-level BPE learnt from `texts` (deterministic), serialised: `special` tokens take the first
    ids; with `fill`, reserved tokens pad a vocabulary the corpus could not fill, so that every id
    of a model with `vocab_size` logits decodes (as Llama 3's reserved special tokens do)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token=unk))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(texts), trainer)
    missing = vocab_size - tokenizer.get_vocab_size()
    if fill and missing > 0:
        tokenizer.add_special_tokens([f"<reserved_{i}>" for i in range(missing)])
    return tokenizer.to_str()


def fast_tokenizer(serialised: str, **roles):
    """transformers' fast tokenizer over a serialised `tokenizers` one; `roles`: unk_token, pad_token, ..."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(serialised), **roles)


def _stdlib_modules() -> tuple[str, ...]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return tuple(path.read_text(encoding="utf-8", errors="replace") for path in sorted(stdlib.glob("*.py")))


@functools.lru_cache(maxsize=4)
def _demo(vocab_size: int) -> str:
    return train_bpe(_stdlib_modules(), vocab_size, DEMO_SPECIAL, unk=DEMO_SPECIAL[0], fill=True)


def demo_tokenizer(vocab_size: int):
    """The tiny random-weight model's tokenizer: exactly `vocab_size` ids, trained on the standard
    library's modules (about 1.5 s, cached per process)."""
    if vocab_size < 256 + len(DEMO_SPECIAL):
        raise CheckpointError(
            f"the model has {vocab_size} logits, too few for a byte-level tokenizer ({256 + len(DEMO_SPECIAL)} "
            "at least)"
        )
    unk, bos, eos = DEMO_SPECIAL
    return fast_tokenizer(
        _demo(vocab_size), unk_token=unk, bos_token=bos, eos_token=eos, pad_token=eos, padding_side="left"
    )


def has_tokenizer(folder: str | os.PathLike | None) -> bool:
    return folder is not None and any((Path(folder) / name).is_file() for name in TOKENIZER_FILES)


def checkpoint_tokenizer(folder: str | os.PathLike, vocab_size: int):
    """The tokenizer saved in a checkpoint folder, set up for batched generation (left padding)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"could not load the tokenizer in {folder}: {error}") from error
    if len(tokenizer) > vocab_size:
        raise CheckpointError(
            f"the tokenizer in {folder} has {len(tokenizer)} tokens but the model only {vocab_size} logits"
        )
    tokenizer.padding_side = "left"  # batched generation pads on the left
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer
