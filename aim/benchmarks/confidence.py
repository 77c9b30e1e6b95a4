"""A figure of `make bench` with its 95% confidence interval, and a verdict only where the interval allows one.

How the runs pair up: timing.py runs the variants round-robin, one run of each per round (each
round starting one variant further), so the runs of one round are a few seconds apart at most and
share whatever load the machine had then. A figure
is computed per round from that round's runs (modulated / bare of the same round: a paired ratio),
so a load that slows a whole round cancels, and the figure is the **median of the paired values**.

Its interval is the **distribution-free interval of a median**: between the k-th smallest and the
k-th largest of n paired values, which covers the true median with probability 1 - 2 P(B < k),
B ~ Binomial(n, 1/2), whatever the values' distribution (as scipy.stats.quantile_test gives it). Chosen over a
bootstrap because:
- its level is exact (at least the stated one) at the 10-40 pairs a bench can afford; a percentile
  bootstrap of a median claiming 95% covered 94% there (simulated, lognormal ratios), since its
  resampled medians take only a few of the observed middle values;
- the ratio of medians pools each variant's runs across rounds, so a load that comes and goes between
  rounds widens it (the quartile spreads of 0.58..1.93 seen on a busy machine); the paired ratio does not.
It assumes the rounds are independent and alike: load that persists for several rounds and changes
the ratio itself (not just both runs' speed) is what it cannot see.

Verdicts: "met" when the whole interval lies on the target's side, "missed" when it lies wholly on
the other side, "unresolved" otherwise. A group whose targets are not all resolved after its first
`pairs` rounds runs more, up to 4 times as many (looks at n, 2n, 4n) and within `Budget.seconds`.
Looking 3 times would let a 95% interval miss more often, so each look's interval is at
1 - 5%/3 (Bonferroni): over all looks together the reported interval misses the true median with
probability at most 5%, so a verdict is wrong (met for a missed target, or the reverse) at most 2.5%
of the time. Power (simulated, normal paired values of spread sigma): a target whose bound lies
4.5 sigma / sqrt(n) from the true median resolves at a look of n pairs with probability about 80%
(1.0 sigma at n = 20, 0.5 sigma at n = 80), at 3 sigma / sqrt(n) about 40%.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

CONFIDENCE = 0.95  # of the reported interval, over all looks together
LOOKS = (1, 2, 4)  # rounds at each look, as multiples of the group's first count
MET, MISSED, UNRESOLVED = "met", "missed", "unresolved"


@dataclass(frozen=True)
class Target:
    comparison: str  # "<=" or ">="
    bound: float

    def __str__(self) -> str:
        return f"{self.comparison} {self.bound:g}"


@dataclass(frozen=True)
class Figure:
    """A figure computed per round from that round's timings {variant: ms}, with its target (or None)."""

    name: str
    per_round: Callable[[dict[str, np.ndarray]], np.ndarray]
    target: Target | None = None


def ratio(numerator: str, denominator: str) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
    """latency(numerator) / latency(denominator), round by round. A throughput ratio A over B is
    ratio(B, A): the same work in less time."""
    return lambda times: times[numerator] / times[denominator]


@dataclass(frozen=True)
class Budget:
    """What a group may spend on extra rounds while a target is unresolved."""

    seconds: float = 120.0  # wall time of the extra rounds, at most
    looks: tuple[int, ...] = LOOKS

    @property
    def level(self) -> float:
        """Confidence of each look's interval: the 5% shared among the looks (Bonferroni)."""
        return 1 - (1 - CONFIDENCE) / len(self.looks)

    def __str__(self) -> str:
        return f"up to {self.looks[-1]}x the first rounds and {self.seconds:g} s more"


BUDGET = Budget()  # extra rounds per group while a target is unresolved


@functools.lru_cache(maxsize=1024)
def order_rank(n: int, level: float) -> int | None:
    """The largest k whose [k-th smallest, k-th largest] of n values covers their median with
    probability 1 - 2 P(B <= k - 1) >= level, B ~ Binomial(n, 1/2); None if even [min, max] cannot."""
    from scipy.stats import binom

    tail = (1 - level) / 2
    k = int(binom.ppf(tail, n, 0.5))  # the smallest k with P(B <= k) >= tail
    k += bool(binom.cdf(k, n, 0.5) <= tail)
    return k if k >= 1 else None


def median_interval(values, level: float) -> tuple[float, float, float]:
    """(median, low, high): the median of `values` and its distribution-free interval at `level` (the
    interval of scipy.stats.quantile_test, computed here from the ranks: it runs per figure and look);
    (-inf, inf) where too few values allow none at that level."""
    ordered = np.sort(np.asarray(values, np.float64))
    k = order_rank(len(ordered), level)
    if k is None:
        return float(np.median(ordered)), -np.inf, np.inf
    return float(np.median(ordered)), float(ordered[k - 1]), float(ordered[len(ordered) - k])


def verdict(low: float, high: float, target: Target) -> str:
    """met / missed / unresolved: the whole interval [low, high] on the target's side, wholly on the
    other, or across its bound."""
    if target.comparison == "<=":
        return MET if high <= target.bound else MISSED if low > target.bound else UNRESOLVED
    if target.comparison == ">=":
        return MET if low >= target.bound else MISSED if high < target.bound else UNRESOLVED
    raise ValueError(f"unknown comparison {target.comparison!r}")


def estimate(figure: Figure, times: dict[str, np.ndarray], level: float) -> dict:
    """The figure over the rounds so far: median, interval, pairs and verdict (where it has a target)."""
    value, low, high = median_interval(figure.per_round(times), level)
    finite = {"low": low if np.isfinite(low) else None, "high": high if np.isfinite(high) else None}
    result = {"value": value, **finite, "pairs": len(next(iter(times.values())))}
    if figure.target is not None:
        result.update(target=str(figure.target), verdict=verdict(low, high, figure.target))
    return result


def resolve(
    rounds, figures: list[Figure], pairs: int, budget: Budget = BUDGET, clock=time.perf_counter, log=None
) -> dict:
    """Runs `pairs` rounds (rounds.run(n): n more rounds; rounds.times(): {variant: ms per round}), then
    more at each later look of the budget while a figure's target is unresolved and time is left
    (`log` is told). Returns {"figures": {name: estimate}, "pairs", "looks", "budget", "latency"}."""
    level = budget.level
    started = clock()
    rounds.run(pairs)
    first_seconds = clock() - started
    history = []  # the verdicts at each look: {"pairs", name: verdict}

    def look() -> dict:
        found = {figure.name: estimate(figure, rounds.times(), level) for figure in figures}
        history.append({"pairs": rounds.count, **{name: f["verdict"] for name, f in found.items() if "verdict" in f}})
        return found

    found = look()
    for multiple in budget.looks[1:]:
        unresolved = [name for name, f in found.items() if f.get("verdict") == UNRESOLVED]
        if not unresolved:
            break
        spent = clock() - started - first_seconds
        per_round = first_seconds / pairs
        affordable = int((budget.seconds - spent) / per_round) if per_round > 0 else pairs * multiple
        more = min(pairs * multiple - rounds.count, affordable)
        if more < 1:
            break
        if log is not None:
            log(f"    unresolved at {rounds.count} pairs: {', '.join(unresolved)}; {more} more rounds")
        rounds.run(more)
        found = look()
    return {
        "figures": found,
        "pairs": rounds.count,
        "looks": history,
        "confidence": CONFIDENCE,
        "level_per_look": level,
        "budget": str(budget),
        "latency": {name: summary(values) for name, values in rounds.times().items()},
    }


def summary(values) -> dict:
    """Median, quartiles and minimum of one variant's runs, in ms."""
    q1, median, q3 = np.percentile(values, [25, 50, 75])
    return {"median_ms": float(median), "q1_ms": float(q1), "q3_ms": float(q3), "min_ms": float(np.min(values))}
