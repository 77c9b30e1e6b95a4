"""Timing that survives a busy machine: variants run round-robin, so drift hits them all alike."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np


def measure(variants: dict[str, Callable[[], object]], repeats: int, warmup: int = 2) -> dict[str, dict]:
    """Median and spread (quartiles, min) in milliseconds of each variant, interleaved."""
    for _ in range(warmup):
        for run in variants.values():
            run()
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, run in variants.items():
            start = time.perf_counter()
            run()
            samples[name].append((time.perf_counter() - start) * 1e3)
    return {name: summary(values) for name, values in samples.items()}


def summary(values: list[float]) -> dict:
    q1, median, q3 = np.percentile(values, [25, 50, 75])
    return {
        "median_ms": float(median),
        "q1_ms": float(q1),
        "q3_ms": float(q3),
        "min_ms": float(min(values)),
        "n": len(values),
    }


def ratio(numerator: dict, denominator: dict) -> dict:
    """Ratio of medians, with a spread from the quartiles (q1/q3 and q3/q1)."""
    return {
        "ratio": numerator["median_ms"] / denominator["median_ms"],
        "low": numerator["q1_ms"] / denominator["q3_ms"],
        "high": numerator["q3_ms"] / denominator["q1_ms"],
    }
