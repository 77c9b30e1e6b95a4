"""`make scale-check`: a real-size checkpoint through `make engine`, with the wall time and peak memory
of every step (issue 12, section 4).

For each family that states a real-size config (Family.scale; the Llama family: TinyLlama-1.1B's
shape), a random-weight checkpoint is saved by `save_pretrained` in bf16 as three safetensors shards
(cached under OUT/<family>.checkpoint, as a user's checkpoint arrives), then built by
`aim engine <family> --checkpoint DIR` in a child process. The build records each step's wall time
and peak resident memory in its manifest (pipeline/memory.py); after it, the Triton writer and the
FP16 pass run in fresh processes on the build, each reporting its own peak.

    python -m aim.benchmarks.scale [--out build/scale] [--families NAME,...]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

from aim.families import get_family, list_families
from aim.files import StagedFolder

SHARDS = 3
DTYPE = "bfloat16"


def make_checkpoint(name: str, folder: Path, dtype: str = DTYPE, shards: int = SHARDS, seed: int = 0) -> Path:
    """The family's real-size model with random weights, saved in `dtype` as `shards` safetensors
    shards (kept: a later run reuses it)."""
    if (folder / "config.json").is_file():
        return folder
    import torch

    family = get_family(name)
    torch.manual_seed(seed)
    model = family.model_class_object()._from_config(family.scale(), dtype=getattr(torch, dtype))
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    with StagedFolder(folder) as staged:
        # A shard closes before the tensor that would take it past the limit: a little above size /
        # shards gives `shards` files.
        model.save_pretrained(staged.path, max_shard_size=f"{math.ceil(size / shards / 1e6 * 1.02)}MB")
        staged.publish()
    return folder


def scaled() -> list[str]:
    return [name for name in list_families() if get_family(name).scale is not None]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m aim.benchmarks.scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="build/scale", type=Path)
    parser.add_argument("--families", default=",".join(scaled()), help="comma-separated families")
    args = parser.parse_args(argv)
    for name in [n for n in args.families.split(",") if n]:
        started = time.perf_counter()
        checkpoint = make_checkpoint(name, args.out / f"{name}.checkpoint")
        print(f"{name}: checkpoint {checkpoint} ({time.perf_counter() - started:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
