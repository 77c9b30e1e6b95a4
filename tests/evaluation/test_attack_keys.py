"""One query's agreement over keys (evaluation/attack_keys.py): its standard error comes from the
key-to-key spread, so that its interval covers the theory when inputs share their keyed draw, where
one key's binomial error would not."""

from __future__ import annotations

import numpy as np

from aim.evaluation.attack_keys import OverKeys, measurement_keys

ROWS, CLUSTERS, KEYS, EXPERIMENTS = 360, 12, 16, 1000


def clustered_world(rng, truth: float = 0.5) -> np.ndarray:
    """[EXPERIMENTS, KEYS] one-query agreements of a test set whose 360 inputs fall in 12 clusters that
    share their draw under a key (as images of one digit nearly do): each key agrees on a whole
    cluster with probability `truth`, so the expected agreement over keys is `truth` and one key's
    figure has sd sqrt(truth (1 - truth) / 12), 5.5 times its binomial error over 360 rows."""
    return rng.binomial(CLUSTERS, truth, size=(EXPERIMENTS, KEYS)) / CLUSTERS


def test_the_interval_over_keys_covers_the_theory_when_inputs_share_draws():
    rng = np.random.default_rng(0)
    found = [OverKeys(list(per_key), 0.5, ROWS) for per_key in clustered_world(rng)]
    # The key-to-key sd estimates the world's (0.144), not the binomial error (0.026).
    truth_sd = np.sqrt(0.25 / CLUSTERS)
    assert abs(np.mean([f.key_sd for f in found]) / truth_sd - 1) < 0.05
    assert all(abs(f.binomial - np.sqrt(f.mean * (1 - f.mean) / ROWS)) < 1e-12 for f in found)
    # |t| <= 3 with 15 degrees of freedom holds 99.1% of the time when the mean is the theory's; a
    # binomial standard error (0.026 / 4) would cover it about 40% of the time.
    coverage = np.mean([f.within(3.0) for f in found])
    assert coverage >= 0.97, coverage
    # Its p-value is uniform under the theory: 5% of experiments below 0.05, as Student's t says.
    assert abs(np.mean([f.p_value < 0.05 for f in found]) - 0.05) < 0.02
    # Power: a tier biased by 0.15 (one key sd) is flagged in most experiments.
    biased = [OverKeys(list(per_key), 0.5, ROWS) for per_key in clustered_world(rng, truth=0.65)]
    assert np.mean([not f.within(3.0) for f in biased]) > 0.5


def test_one_key_states_no_spread_and_keys_are_reproducible():
    one = OverKeys([0.6], 0.5, ROWS)
    assert np.isnan(one.standard_error) and not one.within() and "use --keys" in one.describe()
    first = measurement_keys(1)[0]
    keys = measurement_keys(4, first=first, seed=3)
    assert keys[0] is first and len({k.secret for k in keys}) == 4
    assert [k.secret for k in measurement_keys(4, seed=3)] == [k.secret for k in measurement_keys(4, seed=3)]
