"""What each family is benchmarked at: its realistic size (Family.benchmark), or its tiny test model."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from aim.families import get_family, list_families


@dataclass(frozen=True)
class BenchModel:
    family: str
    build: Callable[[], object]  # a transformers model with random weights
    sizes: dict[str, int]  # every dynamic dim of the family
    shape: str  # what it is, for the bench table (docs/results.md)
    repeats: int = 10  # timed runs per variant (after warm-up)
    memory_rounds: int = 7  # rounds of peak-memory processes (memory.py: the fewest that give an interval)


def realistic(name: str) -> BenchModel:
    family = get_family(name)
    bench = family.benchmark
    return BenchModel(
        name, lambda: family.build(bench.config()), family.sizes(**bench.sizes), bench.shape, bench.repeats
    )


def tiny(name: str) -> BenchModel:
    """The family's tiny test model at its verification sizes: for the benchmark's own test."""
    family = get_family(name)
    return BenchModel(
        name, family.build, family.sizes(**family.verify_sizes), f"tiny {name}", repeats=3, memory_rounds=1
    )


def benchmarked() -> list[str]:
    return [name for name in list_families() if get_family(name).benchmark is not None]
