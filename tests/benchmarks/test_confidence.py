"""The bench's verdicts on synthetic timings whose true ratio is known: inside, outside and across the
target, resolved only with more pairs, and within a budget; the interval's coverage against the
binomial theory of a median's order statistics (nothing here is timed)."""

import numpy as np
import pytest
from scipy.stats import binom, quantile_test

from aim.benchmarks.confidence import (
    MET,
    MISSED,
    UNRESOLVED,
    Budget,
    Figure,
    Target,
    median_interval,
    ratio,
    resolve,
    verdict,
)

AT_MOST = Target("<=", 1.02)  # latency ratio: modulated / bare
FIGURE = Figure("latency / bare", ratio("modulated", "bare"), AT_MOST)
UNLIMITED = Budget(seconds=1e9)  # every look, however long it takes


class SyntheticRounds:
    """Rounds of (bare, modulated) timings whose modulated / bare has median `true_ratio`: each round
    shares a load factor (`load`: the spread of a busy machine, in log units), each run has its own
    jitter (`jitter`). `seconds_per_round` advances `clock` (for the time budget)."""

    def __init__(self, true_ratio, jitter=0.02, load=0.0, seed=0, seconds_per_round=0.0):
        self.rng = np.random.default_rng(seed)
        self.true_ratio, self.jitter, self.load = true_ratio, jitter, load
        self.samples = {"bare": [], "modulated": []}
        self.count, self.now, self.seconds_per_round = 0, 0.0, seconds_per_round

    def run(self, rounds):
        busy = np.exp(self.rng.normal(0, self.load, rounds))
        bare, modulated = 10.0 * busy * np.exp(self.rng.normal(0, self.jitter, (2, rounds)))
        self.samples["bare"] += list(bare)
        self.samples["modulated"] += list(modulated * self.true_ratio)
        self.count += rounds
        self.now += rounds * self.seconds_per_round

    def times(self):
        return {name: np.asarray(values) for name, values in self.samples.items()}

    def clock(self):
        return self.now


def judged(rounds, pairs=20, budget=UNLIMITED, target=AT_MOST):
    figure = Figure(FIGURE.name, FIGURE.per_round, target)
    result = resolve(rounds, [figure], pairs, budget, clock=rounds.clock)
    return result, result["figures"][figure.name]


@pytest.mark.parametrize(
    "true_ratio, expected",
    [(0.96, MET), (1.08, MISSED)],
    ids=["inside the target", "outside the target"],
)
def test_a_ratio_clear_of_its_bound_is_decided_at_the_first_look(true_ratio, expected):
    rounds = SyntheticRounds(true_ratio)
    result, figure = judged(rounds)
    assert figure["verdict"] == expected and result["looks"] == [{"pairs": 20, FIGURE.name: expected}]
    assert figure["low"] < true_ratio < figure["high"]


def test_a_ratio_on_its_bound_stays_unresolved_after_the_whole_budget():
    """The true median is the bound itself: whichever side the point estimate falls on, only an
    interval across the bound is honest, however many pairs were run."""
    rounds = SyntheticRounds(1.02, jitter=0.03, seed=3)
    result, figure = judged(rounds)
    assert figure["verdict"] == UNRESOLVED
    assert [look["pairs"] for look in result["looks"]] == [20, 40, 80]  # every look of the budget was taken
    assert figure["low"] < 1.02 < figure["high"] and figure["value"] != 1.02


def test_a_ratio_near_its_bound_is_resolved_only_with_more_pairs():
    """0.995 against <= 1.02, with paired values spread by half the distance: ten pairs cannot tell
    (the interval of ten is their min..max), 160 can."""
    rounds = SyntheticRounds(0.995, jitter=0.035, seed=1)  # log-ratio spread 0.05, distance 0.025
    result, figure = judged(rounds, pairs=10, budget=Budget(seconds=1e9, looks=(1, 4, 16)))
    first, last = result["looks"][0], result["looks"][-1]
    assert first == {"pairs": 10, FIGURE.name: UNRESOLVED}
    assert figure["verdict"] == last[FIGURE.name] == MET and result["pairs"] == last["pairs"] > 10


def test_more_pairs_stop_at_the_time_budget():
    """Each synthetic round takes 1 s: a budget of 15 s more after 10 rounds allows 15 more, not the
    30 of the next look, and the target is said to be unresolved."""
    rounds = SyntheticRounds(1.02, jitter=0.03, seed=3, seconds_per_round=1.0)
    result, figure = judged(rounds, pairs=10, budget=Budget(seconds=15.0))
    assert result["pairs"] == 25 and figure["verdict"] == UNRESOLVED


def test_a_busy_machine_cancels_within_a_round():
    """Load that slows whole rounds by up to 2x either way (each variant's own quartiles span about
    0.7..1.4 of its median) leaves the paired ratio tight: 0.97 is met against <= 1.02."""
    rounds = SyntheticRounds(0.97, jitter=0.01, load=0.5, seed=2)
    result, figure = judged(rounds)
    q1, q3 = np.percentile(rounds.times()["bare"], [25, 75]) / np.median(rounds.times()["bare"])
    assert q3 / q1 > 1.4  # the marginal spread of a busy machine
    assert figure["verdict"] == MET and len(result["looks"]) == 1


def test_an_at_least_target_reads_the_other_way():
    """tokens/s of the engine over a peer's, >= 1.0: ratio(peer's time, engine's time)."""
    at_least = Target(">=", 1.0)
    faster = SyntheticRounds(1 / 1.1)  # "modulated" is the engine here: 10% less time than "bare", the peer
    figure = Figure("tokens/s / peer", ratio("bare", "modulated"), at_least)
    assert resolve(faster, [figure], 20)["figures"][figure.name]["verdict"] == MET
    slower = SyntheticRounds(1.1)
    assert resolve(slower, [figure], 20)["figures"][figure.name]["verdict"] == MISSED


def test_verdict_needs_the_whole_interval_on_one_side():
    assert verdict(0.95, 1.02, AT_MOST) == MET
    assert verdict(1.021, 1.3, AT_MOST) == MISSED
    assert verdict(1.0, 1.03, AT_MOST) == UNRESOLVED
    assert verdict(1.0, 1.5, Target(">=", 1.0)) == MET
    assert verdict(0.5, 0.99, Target(">=", 1.0)) == MISSED
    assert verdict(0.99, 1.2, Target(">=", 1.0)) == UNRESOLVED


@pytest.mark.parametrize("n", [10, 20, 40, 80])
def test_the_interval_is_the_narrowest_pair_of_order_statistics_at_each_looks_level(n):
    """Binomial theory: [x(k), x(n+1-k)] covers the median with probability 1 - 2 P(B <= k-1),
    B ~ Binomial(n, 1/2); the interval is the narrowest such pair reaching each look's level
    (1 - 5%/3): neither too narrow (claims more than it has) nor too wide (resolves less)."""
    level = Budget().level
    k = max(k for k in range(1, n) if 2 * binom.cdf(k - 1, n, 0.5) <= 1 - level)
    ordered = np.arange(1.0, n + 1)
    _, low, high = median_interval(np.random.default_rng(n).permutation(ordered), level)
    assert (low, high) == (ordered[k - 1], ordered[n - k])


def test_the_interval_is_scipys_quantile_test_interval():
    rng = np.random.default_rng(11)
    for n in range(6, 120, 7):
        values = rng.lognormal(0.0, 0.3, n)
        for level in (0.95, Budget().level):
            expected = quantile_test(values, q=float(np.median(values)), p=0.5).confidence_interval(level)
            low, high = (-np.inf, np.inf) if np.isnan(expected.low) else (expected.low, expected.high)  # nan: none
            assert median_interval(values, level) == (np.median(values), low, high)


def test_the_interval_covers_the_median_of_skewed_ratios_at_its_level():
    """4,000 synthetic sets of 20 lognormal paired ratios (true median 1): the interval covers 1 at
    least as often as each look's level says (within three standard errors)."""
    level = Budget().level
    values = np.random.default_rng(7).lognormal(0.0, 0.3, size=(4000, 20))
    covered = np.mean([low <= 1.0 <= high for _, low, high in (median_interval(row, level) for row in values)])
    assert covered >= level - 3 * np.sqrt(level * (1 - level) / len(values))


def test_a_wrong_met_stays_under_2_5_percent_over_all_looks():
    """A true ratio just past its bound, run 3,000 times through every look the budget allows: "met"
    (wrong here) comes out at most 2.5% of the time, within three standard errors. Each look at
    95% would give about 4% (three chances to stray below the bound)."""
    trials, wrong = 3000, 0
    for seed in range(trials):
        rounds = SyntheticRounds(1.02 * (1 + 1e-9), jitter=0.03, seed=seed)
        wrong += resolve(rounds, [FIGURE], 20)["figures"][FIGURE.name]["verdict"] == MET
    assert wrong / trials <= 0.025 + 3 * np.sqrt(0.025 * 0.975 / trials)


def test_too_few_pairs_give_no_interval():
    _, low, high = median_interval([1.0, 1.1, 0.9], Budget().level)
    assert low == -np.inf and high == np.inf
