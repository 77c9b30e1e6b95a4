"""What a checkpoint folder stores, read from its files without loading it."""

from __future__ import annotations

import json
import os
import struct
from collections import Counter
from pathlib import Path

# safetensors' dtype names -> torch's
_SAFETENSORS_DTYPES = {
    "BF16": "bfloat16",
    "F16": "float16",
    "F32": "float32",
    "F64": "float64",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}


def checkpoint_dtype(folder: str | os.PathLike, config: dict | None = None) -> str | None:
    """The dtype most of the checkpoint's floating-point weights are stored in (by bytes), read from the
    safetensors headers; else what config.json says (`dtype`, or `torch_dtype` before transformers
    4.56); None if neither tells."""
    folder = Path(folder)
    stored: Counter[str] = Counter()
    for shard in sorted(folder.glob("*.safetensors")):
        try:
            with open(shard, "rb") as handle:
                (size,) = struct.unpack("<Q", handle.read(8))
                header = json.loads(handle.read(size))
        except (OSError, ValueError, struct.error):
            continue  # loading the checkpoint reports a broken shard
        for name, entry in header.items():
            if name != "__metadata__" and entry.get("dtype") in _SAFETENSORS_DTYPES:
                start, end = entry.get("data_offsets", (0, 0))
                stored[_SAFETENSORS_DTYPES[entry["dtype"]]] += end - start
    if stored:
        return stored.most_common(1)[0][0]
    config = config or {}
    found = config.get("dtype") or config.get("torch_dtype")
    return found if isinstance(found, str) else None
