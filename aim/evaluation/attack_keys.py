"""One query's agreement with the clean answer over several keys: the figure the theory speaks of,
with an uncertainty that holds when inputs share their keyed draw.

Keyed noise is a function of the key and of the request. Inputs whose logits lie within a cell width
of each other share much of their draw (the smooth noise correlates nearby requests by design:
docs/keyed-noise.md), so under one key they agree or disagree with the clean answer together. One
key's agreement over a test set is then no binomial count of independent trials: it strays from the
theory by more than the binomial error says (the digits: a key-to-key sd of about 0.11, against a
binomial 0.026 over 360 images).

The theory G(sigma) is the expected agreement for a key drawn at random: given the key and the request
every logit's noise is N(0, 1), so over keys each input agrees with probability P_top1(sigma). The
keys are drawn independently, so their agreements are independent whatever the inputs share under
one key, and the standard error of their mean is the keys' sample sd / sqrt(keys). That sd holds the
binomial part too; the binomial error of one key is kept beside it, labelled, and their ratio squared
(the design effect) says how many independent inputs one key's test set is worth.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

KEYS = 16  # default keys of `aim attack`: a key-to-key sd of 0.11 gives a standard error of 0.028
WITHIN = 3.0  # issue 25: one query's agreement within this many standard errors of the theory


def measurement_keys(count: int, first=None, seed: int = 0) -> list:
    """`count` keys: `first` (the attack's engine key) if given, the rest drawn from `seed`, so that a
    measurement can be repeated (these keys guard nothing)."""
    from aim.graph_passes.noise_key import KEY_BYTES, NoiseKey

    rng = np.random.default_rng((seed, 25))  # a stream of its own: not the attacker's key (attack.attacker_key)
    drawn = [NoiseKey(rng.bytes(KEY_BYTES)) for _ in range(count)]
    return ([first] + drawn[: count - 1]) if first is not None else drawn


@dataclass
class OverKeys:
    """One query's agreement under each of several independent keys, against the theory."""

    per_key: list[float]
    theory: float  # G(sigma): the expected agreement for a key drawn at random
    rows: int  # inputs (rows) behind each key's figure

    @property
    def keys(self) -> int:
        return len(self.per_key)

    @property
    def mean(self) -> float:
        return float(np.mean(self.per_key))

    @property
    def key_sd(self) -> float:
        """The key-to-key sd: how far the figure of one key (an owner's tier) strays. nan for one key."""
        return float(np.std(self.per_key, ddof=1)) if self.keys > 1 else float("nan")

    @property
    def standard_error(self) -> float:
        """Of the mean over keys, from the keys' spread (independent keys). nan for one key."""
        return self.key_sd / np.sqrt(self.keys)

    @property
    def binomial(self) -> float:
        """One key's binomial standard error at the mean: right only if the inputs drew independently."""
        p = self.mean
        return float(np.sqrt(p * (1 - p) / self.rows))

    @property
    def deviation(self) -> float:
        """(mean - theory) in standard errors of the mean over keys."""
        return (self.mean - self.theory) / self.standard_error if self.standard_error > 0 else float("nan")

    @property
    def p_value(self) -> float:
        """Two-sided, Student's t with keys - 1 degrees of freedom (the sd is estimated from few keys)."""
        from scipy import stats

        return float(2 * stats.t.sf(abs(self.deviation), self.keys - 1)) if self.keys > 1 else float("nan")

    @property
    def design_effect(self) -> float:
        """(key sd / binomial error)**2: how many inputs count as one independent trial under a key."""
        return (self.key_sd / self.binomial) ** 2 if self.binomial > 0 else float("nan")

    def within(self, limit: float = WITHIN) -> bool:
        return bool(abs(self.deviation) <= limit)

    def as_dict(self) -> dict:
        return {
            "keys": self.keys,
            "rows": self.rows,
            "theory": self.theory,
            "mean": self.mean,
            "standard_error": self.standard_error,
            "deviation_in_standard_errors": self.deviation,
            "p_value": self.p_value,
            f"within_{WITHIN:g}_standard_errors": self.within(),
            "key_to_key_sd": self.key_sd,
            "binomial_standard_error_of_one_key": self.binomial,
            "design_effect": self.design_effect,
            "per_key": [float(p) for p in self.per_key],
        }

    @classmethod
    def from_dict(cls, found: dict) -> OverKeys:
        return cls(list(found["per_key"]), float(found["theory"]), int(found["rows"]))

    def describe(self) -> str:
        if self.keys < 2:
            return (
                f"one query, one key: {self.mean:.3f} against theory {self.theory:.3f} (binomial s.e. "
                f"{self.binomial:.3f}, which understates one key's error when inputs share draws); use --keys >= 2"
            )
        return (
            f"one query over {self.keys} keys: {self.mean:.3f} +- {self.standard_error:.3f} (s.e. from the "
            f"key-to-key spread), theory {self.theory:.3f}: {self.deviation:+.1f} s.e. (p {self.p_value:.2g}, "
            f"t with {self.keys - 1} df); key-to-key sd {self.key_sd:.3f} (one key's tier strays this much; "
            f"its binomial s.e. {self.binomial:.3f}, design effect {self.design_effect:.1f})"
        )


def over_keys(agreement_of: Callable[[object], float], keys: list, theory: float, rows: int, log=None) -> OverKeys:
    """`agreement_of(key)`: one query's agreement under that key, for every key in turn."""
    found = []
    for index, key in enumerate(keys):
        found.append(float(agreement_of(key)))
        if log is not None:
            log(f"  key {index} ({key.fingerprint}): one query agrees {found[-1]:.3f}")
    return OverKeys(found, float(theory), int(rows))
