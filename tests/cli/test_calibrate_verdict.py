"""`aim calibrate`'s held-out check says whether the agreements lie within their sampling error of the
targets, and what to do when they do not (aim/evaluation/calibrate.py): its stated false-alarm rate
measured on simulated correct tables, its bound against scipy's exact binomial tail, and the verdict
on the numbers of a real trial (0.594 against 0.5005, 0.350 against 0.251, 16 held-out inputs)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from aim.evaluation.calibrate import (
    CHECK_LEVELS,
    FALSE_ALARM,
    held_out_verdict,
    measure_levels,
    report,
    tail_bound,
    targets,
)


def test_the_bound_holds_against_the_exact_binomial_tail():
    """For Bernoulli inputs the tail is binomial (scipy): the bound is never below it."""
    for n in (5, 16, 100):
        for t in (0.011, 0.25, 0.5005, 0.9):
            for k in range(n + 1):
                x = k / n
                exact = stats.binom.sf(k - 1, n, t) if x >= t else stats.binom.cdf(k, n, t)
                assert tail_bound(x, t, n) >= exact * (1 - 1e-9), (n, t, k)


class Engine:
    """A calibrated engine whose top-1 agrees with the clean prediction of input i with probability
    p_i (given per level): each input's own agreement rate, as a real model's inputs differ."""

    def __init__(self, p_of_level, classes=10, seed=0):
        self.p_of_level, self.classes, self.rng = p_of_level, classes, np.random.default_rng(seed)

    def run(self, part, level):
        index = part["i"]
        agree = self.rng.random(index.size) < self.p_of_level(level)[index]
        top = np.where(agree, 0, 1 + self.rng.integers(0, self.classes - 1, index.size))
        return np.eye(self.classes, dtype=np.float32)[top]


class Split(dict):
    def __init__(self, n):
        super().__init__()
        self.inputs = {"i": np.arange(n)}

    def __len__(self):
        return len(self.inputs["i"])


def levels_of(p_of_level, n, repeats=1, seed=0):
    return measure_levels(
        Engine(p_of_level, seed=seed), Split(n), n, np.zeros(n, np.int64), CHECK_LEVELS, repeats,
        lambda level: targets([level], 10)[0],
    )  # fmt: skip


@pytest.mark.parametrize("n, repeats", [(16, 1), (16, 5), (200, 3)])
def test_a_table_that_holds_is_flagged_at_most_at_the_stated_rate(n, repeats):
    """Correct tables (each level's per-input rates average to its target, spread as a Beta around it):
    the share flagged stays below FALSE_ALARM (1%), with room for the simulation's own error."""
    rng = np.random.default_rng(n * 7 + repeats)
    tables, flagged = 300, 0
    for table in range(tables):
        rates = {}
        for level in CHECK_LEVELS:
            t = targets([level], 10)[0]
            rates[level] = np.ones(n) if t >= 1 else rng.beta(4 * t, 4 * (1 - t), n)  # mean t
        checked = levels_of(lambda level, rates=rates: rates[level], n, repeats, seed=table)
        flagged += not all(item["within_sampling_error"] for item in checked)
    # 300 tables: at a true rate of 1%, 9 or more flags happen with probability 0.4%.
    assert flagged <= 8, flagged


def test_a_table_that_does_not_hold_is_flagged_with_what_to_do(capsys):
    """Level 0.5 agreeing 0.9 of the time instead of ~0.55, on 100 held-out inputs."""
    wrong = {level: np.full(100, targets([level], 10)[0]) for level in CHECK_LEVELS}
    wrong[0.5] = np.full(100, 0.9)
    checked = levels_of(lambda level: wrong[level], 100)
    assert [item["within_sampling_error"] for item in checked] == [True, True, False, True, True]
    verdict = held_out_verdict(checked)
    assert verdict.startswith("WARNING: held-out agreement OUTSIDE its sampling error at level 0.50")
    assert "--data with more inputs" in verdict
    entry = {
        "calibration_set": {"rows": 400},
        "num_classes": 10,
        "levels": [0.0, 1.0],
        "sigmas": [3.0, 0.0],
        "target_agreement": [0.1, 1.0],
        "check": {"levels": checked, "verdict": verdict},
    }
    text = report(entry)
    assert "OUTSIDE sampling error" in text and verdict in text


def test_the_trial_numbers_are_within_their_error_and_the_check_is_called_weak():
    """0.594 against 0.5005 and 0.350 against 0.251 with 16 held-out inputs: about 0.75 and 0.9
    binomial standard errors (sqrt(t (1 - t) / 16), computed here): within, and the check is too weak
    to see less than ~0.4, so more inputs are advised."""
    measured = {0.0: 0.02, 0.25: 0.350, 0.5: 0.594, 0.75: 0.76, 1.0: 1.0}
    target = {0.0: 0.0109, 0.25: 0.251, 0.5: 0.5005, 0.75: 0.75, 1.0: 1.0}
    levels = [
        {
            "level": level,
            "target": target[level],
            "measured": measured[level],
            "inputs": 16,
            "standard_error": float(np.sqrt(target[level] * (1 - target[level]) / 16)),
            "tail_bound": tail_bound(measured[level], target[level], 16),
        }
        for level in CHECK_LEVELS
    ]
    for item in levels:
        item["within_sampling_error"] = item["tail_bound"] > FALSE_ALARM / (2 * len(levels))
        assert abs(item["measured"] - item["target"]) <= item["standard_error"]
    verdict = held_out_verdict(levels)
    assert verdict.startswith("held-out agreement within its sampling error at every level"), verdict
    assert "with 16 inputs it flags only deviations above 0.4" in verdict and "--data with more inputs" in verdict
    levels[-1].update(measured=0.999, tail_bound=tail_bound(0.999, 1.0, 16), within_sampling_error=False)
    assert "OUTSIDE" in held_out_verdict(levels)  # level 1 is the exact model: any miss is flagged
