"""What a checkpoint folder stores, read from its files without loading it, and the contradictions
found there before any work: a safetensors file whose header is not one (random bytes, a link to a
text file), and a config.json whose special token ids lie outside its own vocabulary."""

from __future__ import annotations

import json
import math
import os
import struct
from collections import Counter
from pathlib import Path

from aim.errors import CheckpointError

# safetensors' dtype names -> torch's
_SAFETENSORS_DTYPES = {
    "BF16": "bfloat16",
    "F16": "float16",
    "F32": "float32",
    "F64": "float64",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}
# Bytes per element of every safetensors dtype (its format's own list); a tensor's data_offsets span
# exactly its elements.
_ITEM_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
# The safetensors library refuses headers past 100 MB; so does this reader, before reading one.
MAX_HEADER = 100_000_000
# config.json's special token ids: each must name a token of the vocabulary (an id past it ends
# generation in an IndexError deep inside a loop).
TOKEN_IDS = ("eos_token_id", "pad_token_id", "bos_token_id", "decoder_start_token_id", "sep_token_id")
RESAVE = "save the checkpoint again with `model.save_pretrained(DIR)`"


def safetensors_header(path: str | os.PathLike) -> dict:
    """The header of a safetensors file, checked as the format defines it: an 8-byte length that fits
    in the file, a JSON object, and every tensor's data_offsets inside the file's data and spanning
    its shape times its dtype's size. Else CheckpointError, before anything the length claims is read."""
    path = Path(path)
    bad = f"{path} is not a safetensors file"
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{bad} (only {len(head)} bytes): {RESAVE}")
            (length,) = struct.unpack("<Q", head)
            if length > min(MAX_HEADER, size - 8):
                raise CheckpointError(
                    f"{bad}: its header claims {length:,} bytes, the file holds {size - 8:,} after the length: {RESAVE}"
                )
            header = json.loads(handle.read(length))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{bad}: its header is not JSON ({error}): {RESAVE}") from None
    data = size - 8 - length
    if not isinstance(header, dict):
        raise CheckpointError(f"{bad}: its header is not a JSON object: {RESAVE}")
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            count = math.prod(int(d) for d in shape)
            fits = 0 <= int(start) <= int(end) <= data and int(end) - int(start) == count * _ITEM_BYTES[dtype]
        except (KeyError, TypeError, ValueError):
            fits = False
        if not fits:
            raise CheckpointError(
                f"{bad}: tensor {name!r} ({str(entry)[:200]}) does not lie inside the file's {data:,} bytes of "
                f"data as its shape and dtype say: the file is damaged or cut short; {RESAVE}"
            )
    return header


def check_config(folder: str | os.PathLike, config: dict) -> None:
    """config.json (and generation_config.json) against the model's own vocabulary, where they are what
    generation uses: in a folder without a tokenizer, its stop and pad tokens are the config's special
    token ids, each of which must lie in [0, vocab_size). (A GPT-2 config keeps eos_token_id 50256 by
    default, whatever vocab_size a smaller model was made with; with a tokenizer, its ids are used.)"""
    from aim.export.tokenizer import has_tokenizer

    folder = Path(folder)
    vocab = config.get("vocab_size")
    if has_tokenizer(folder) or not isinstance(vocab, int) or isinstance(vocab, bool) or vocab < 1:
        return  # the tokenizer's ids are used (checked against the logits when it loads), or no vocabulary
    sources = {"config.json": config}
    generation = folder / "generation_config.json"
    if generation.is_file():
        try:
            sources["generation_config.json"] = json.loads(generation.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise CheckpointError(f"{generation} is not readable JSON ({error}): {RESAVE}") from None
    for where, values in sources.items():
        for key in TOKEN_IDS:
            ids = values.get(key) if isinstance(values, dict) else None
            for token in ids if isinstance(ids, list) else [ids]:
                if token is not None and (
                    not isinstance(token, int) or isinstance(token, bool) or not 0 <= token < vocab
                ):
                    raise CheckpointError(
                        f"{folder / where}: {key} {token!r} lies outside the model's vocabulary (vocab_size "
                        f"{vocab}: ids 0..{vocab - 1}), and with no tokenizer in the folder generation takes its "
                        f"special tokens from the config: the config contradicts the weights. Set {key} to a token "
                        f"of the vocabulary (or None), or save the model's tokenizer beside it, and {RESAVE}"
                    )


def stored_weights(folder: str | os.PathLike) -> Counter[str]:
    """How many floating-point values the checkpoint's safetensors files hold, by the dtype they are
    stored in (torch's names), read from their headers alone (nothing is loaded)."""
    counts: Counter[str] = Counter()
    for shard in sorted(Path(folder).glob("*.safetensors")):
        for name, entry in safetensors_header(shard).items():
            if name != "__metadata__" and entry.get("dtype") in _SAFETENSORS_DTYPES:
                counts[_SAFETENSORS_DTYPES[entry["dtype"]]] += math.prod(int(d) for d in entry["shape"])
    return counts


def checkpoint_dtype(folder: str | os.PathLike, config: dict | None = None) -> str | None:
    """The dtype most of the checkpoint's floating-point weights are stored in (by bytes), read from the
    safetensors headers; else what config.json says (`dtype`, or `torch_dtype` before transformers
    4.56); None if neither tells. Called before the checkpoint loads, it refuses first what loading
    would choke on (CheckpointError): a safetensors file that is not one, a config that contradicts
    the model's vocabulary."""
    folder = Path(folder)
    config = config or {}
    check_config(folder, config)
    stored: Counter[str] = Counter()
    for shard in sorted(folder.glob("*.safetensors")):
        for name, entry in safetensors_header(shard).items():
            if name != "__metadata__" and entry.get("dtype") in _SAFETENSORS_DTYPES:
                start, end = entry["data_offsets"]
                stored[_SAFETENSORS_DTYPES[entry["dtype"]]] += end - start
    if stored:
        return stored.most_common(1)[0][0]
    found = config.get("dtype") or config.get("torch_dtype")
    return found if isinstance(found, str) else None
