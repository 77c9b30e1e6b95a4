"""The largest batch of a build's engine profile (`--max-batch N`, `MAX_BATCH=N`), and its default.

The default serves: IMAGE_MAX_BATCH rows for a model without a KV cache; for a language model, as
many sequences of the longest length as fit their KV cache in CACHE_SHARE of this machine's memory
(from the cache inputs of the exported graph: layers x heads x head size x positions x bytes),
between 1 and TEXT_MAX_BATCH. Triton's max_batch_size follows the profile (serving/triton.py).
"""

from __future__ import annotations

import os

from aim.contract import BATCH
from aim.errors import AimError
from aim.specs import DimRange

IMAGE_MAX_BATCH = 32
CACHE_SHARE = 0.25
TEXT_MAX_BATCH = 64  # decode batches past this gain little throughput on one engine instance
CACHE_DIM = "past_sequence"  # the dim a KV cache input grows along (export/optimum_io.py names it)


def with_max_batch(dims: dict[str, DimRange], max_batch: int) -> dict[str, DimRange]:
    """`dims` with the batch's range ending at `max_batch` (its min and opt lowered to it if above)."""
    batch = dims.get(BATCH)
    if batch is None:
        raise AimError(f"the model has no dynamic batch dim, so its largest batch ({max_batch}) cannot be set")
    if batch.min == batch.max and batch.max != max_batch:
        raise AimError(
            f"the model's batch is fixed at {batch.max} (its shapes give no range); a largest batch of {max_batch} "
            "needs a dynamic batch (--min-shapes/--max-shapes with other batch sizes)"
        )
    low = min(batch.min, max_batch)
    return {**dims, BATCH: DimRange(low, min(max(batch.opt, low), max_batch), max_batch)}


def memory_bytes() -> int | None:
    """This machine's physical memory, where the OS says."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def cache_bytes_per_sequence(inputs, dims: dict[str, DimRange], precision: str) -> int:
    """Bytes of the KV cache of one sequence of the longest length: every input with a CACHE_DIM axis
    (one layer's keys or values, [batch, heads, past_sequence, head size]) at its largest size."""
    itemsize = 2 if precision == "fp16" else 4
    total = 0
    for tensor in inputs:
        if CACHE_DIM not in tensor.dims:
            continue
        size = itemsize
        for dim in tensor.dims:
            if dim == CACHE_DIM:
                size *= dims[CACHE_DIM].max + 1  # the cache of the longest sequence, its last token included
            elif isinstance(dim, int) and dim > 0:
                size *= dim
        total += size
    return total


def default_max_batch(inputs, dims: dict[str, DimRange], precision: str, memory: int | None = None) -> int:
    """IMAGE_MAX_BATCH without a KV cache; with one, the sequences whose longest cache fits in
    CACHE_SHARE of `memory` (default: this machine's), between 1 and TEXT_MAX_BATCH."""
    per_sequence = cache_bytes_per_sequence(inputs, dims, precision)
    if not per_sequence:
        return IMAGE_MAX_BATCH
    memory = memory_bytes() if memory is None else memory
    if memory is None:
        return dims[BATCH].max
    return int(max(1, min(TEXT_MAX_BATCH, CACHE_SHARE * memory // per_sequence)))
