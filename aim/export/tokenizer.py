"""Tokenizers for text families: the checkpoint's own, or a local byte-level BPE for the tiny model.

No hub: a random-weight tiny model has no tokenizer, so one is trained here, deterministically, on
text every machine has (the Python standard library's top-level modules). Byte-level BPE encodes any
prompt; ids 0, 1, 2 are <unk>, <s>, </s> as in Llama's own vocabulary.
"""

from __future__ import annotations

import functools
import sysconfig
from pathlib import Path

from aim.errors import CheckpointError

SPECIAL = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2: Llama's unk, bos, eos
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def _corpus() -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return [path.read_text(encoding="utf-8", errors="replace") for path in sorted(stdlib.glob("*.py"))]


@functools.lru_cache(maxsize=4)
def _trained(vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token=SPECIAL[0]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(), trainer)
    # A small corpus may not fill the vocabulary: reserved tokens keep every id decodable (as Llama 3's
    # reserved special tokens do).
    missing = vocab_size - tokenizer.get_vocab_size()
    if missing > 0:
        tokenizer.add_special_tokens([f"<reserved_{i}>" for i in range(missing)])
    return tokenizer.to_str()


def local_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer with exactly `vocab_size` ids (about 1.5 s to train, cached)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 256 + len(SPECIAL):
        raise CheckpointError(
            f"the model has {vocab_size} logits, too few for the local byte-level tokenizer ({256 + len(SPECIAL)} at "
            f"least): save the checkpoint's own tokenizer beside it with `tokenizer.save_pretrained(DIR)`"
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained(vocab_size)),
        unk_token=SPECIAL[0],
        bos_token=SPECIAL[1],
        eos_token=SPECIAL[2],
        pad_token=SPECIAL[2],
        padding_side="left",
    )


def model_tokenizer(model, checkpoint=None):
    """The checkpoint folder's own tokenizer if it has one, else the local one sized to the model."""
    vocab_size = model.config.vocab_size
    if checkpoint is not None and any((Path(checkpoint) / name).is_file() for name in TOKENIZER_FILES):
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(checkpoint, local_files_only=True)
        except (OSError, ValueError) as error:
            raise CheckpointError(f"could not load the tokenizer in {checkpoint}: {error}") from error
        if len(tokenizer) > vocab_size:
            raise CheckpointError(
                f"the tokenizer in {checkpoint} has {len(tokenizer)} tokens but the model only {vocab_size} logits"
            )
        tokenizer.padding_side = "left"  # batched generation pads on the left
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        return tokenizer
    return local_tokenizer(vocab_size)
