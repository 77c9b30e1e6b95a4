"""The statistical verdicts themselves, arrays in and Check out: where they draw the line (ALPHA), the
Bonferroni factor of each check, the correlation limits, and the "rows differ" part of "fresh draws".
Every expected number is computed here from its definition with scipy, never read from the code.

A p-value is planted exactly: a sample whose mean lies z standard errors from the null's (the other
tests of the check see nothing), or two series whose sample correlation is r exactly."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from aim.verify import keyed, statistics
from aim.verify.defects import DEFECTS, DefectiveEngine

N = 20_000  # MIN_SAMPLES: the fewest values a build's check judges


def exact_normal(n: int = N) -> np.ndarray:
    """n values whose sample mean is exactly 0 and second moment exactly 1, shaped as N(0, 1)
    (Kolmogorov-Smirnov p ~ 1): a sample no test of a standard normal rejects."""
    x = stats.norm.ppf((np.arange(n) + 0.5) / n)
    x = x - x.mean()
    return x / np.sqrt(np.mean(x**2))


def with_p(p: float, n: int = N) -> np.ndarray:
    """A sample that the distribution check of N(0, 1) judges at p exactly: its mean moved by z
    standard errors, 3 * 2 * sf(z) = p (three tests, Bonferroni; two-sided)."""
    z = stats.norm.isf(p / 3 / 2)
    x = exact_normal(n) * np.sqrt(1 - z * z / n)  # the second moment stays 1 once shifted: only the mean moves
    return x + z / np.sqrt(n)


def expected_distribution_p(x: np.ndarray) -> float:
    """The definition: Bonferroni over KS, the mean's z and the second moment's z against N(0, 1)."""
    n = x.size
    ks = stats.kstest(x, "norm").pvalue
    mean = 2 * stats.norm.sf(abs(x.mean()) * np.sqrt(n))
    var = 2 * stats.norm.sf(abs(np.mean(x**2) - 1) / np.sqrt(2 / n))  # Var(x^2) = 2 for N(0, 1)
    return min(1.0, 3 * min(ks, mean, var))


def test_alpha_is_one_in_ten_million():
    assert statistics.ALPHA == keyed.ALPHA == 1e-7
    assert statistics.FALSE_FAILURE_RATE == pytest.approx(5 * 1e-7) and len(statistics.STATISTICAL_CHECKS) == 5


@pytest.mark.parametrize("p, passes", [(1e-9, False), (0.8e-7, False), (1.25e-7, True), (1e-6, True)])
def test_the_distribution_check_draws_its_line_at_alpha(p, passes):
    """p ~ 1e-9 fails and p ~ 1e-6 passes; and the line lies between 0.8e-7 and 1.25e-7."""
    x = with_p(p)
    assert expected_distribution_p(x) == pytest.approx(p, rel=1e-6)  # the planted p, by scipy alone
    check = statistics._distribution("utility noise ~ N(0,1)", x, stats.norm, "test")
    assert check.passed is passes, check.detail
    assert check.metrics["p_value"] == pytest.approx(p, rel=1e-6)  # the Bonferroni factor 3, as defined


def test_the_bonferroni_factor_of_the_distribution_check_is_three():
    """A sample whose smallest p-value is the variance's: the check's p is three times it."""
    n, z = N, 4.0
    x = exact_normal(n) * np.sqrt(1 + z * np.sqrt(2 / n))  # second moment moved by z standard errors
    p = expected_distribution_p(x)
    assert p == pytest.approx(3 * 2 * stats.norm.sf(z), rel=1e-3)
    assert statistics._distribution("n", x, stats.norm, "test").metrics["p_value"] == pytest.approx(p, rel=1e-9)


def exactly_correlated(n: int, r: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two series of n values whose sample (Pearson) correlation is r exactly."""
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=n), rng.normal(size=n)
    a = (a - a.mean()) / np.linalg.norm(a - a.mean())
    b = b - b.mean() - a * np.dot(a, b - b.mean())
    b = b / np.linalg.norm(b)
    return a, r * a + np.sqrt(1 - r * r) * b


@pytest.mark.parametrize("pairs", [1, 4])
def test_the_keyed_correlation_limit_is_alpha_shared_among_the_pairs(pairs):
    """keyed._correlation fails a pair at |r sqrt(n)| >= isf(ALPHA / (2 pairs)): just inside passes,
    just outside fails."""
    n = 50_000
    limit = stats.norm.isf(1e-7 / (2 * pairs))
    independent = [exactly_correlated(n, 0.0, seed) for seed in range(pairs - 1)]
    for z, passes in ((limit * 0.98, True), (limit * 1.02, False)):
        check = keyed._correlation("c", [*independent, exactly_correlated(n, z / np.sqrt(n), 9)])
        assert check.passed is passes, check.detail
        assert check.metrics["z_limit"] == pytest.approx(limit, rel=1e-12)


def test_the_uncorrelated_check_its_factor_and_the_limit_it_states():
    """statistics._uncorrelated: p is the smallest neighbour's two-sided p times the number of
    neighbours (4); the |r| it says it detects is (isf(ALPHA / 8) + isf(MISS)) / sqrt(pairs) diluted
    by the focused element's own n1, sqrt(var|n|) c / sqrt(1 + c^2 var|n|), all from scipy here."""
    rng = np.random.default_rng(5)
    runs, batch, classes = 40, 32, 10
    noise = rng.normal(size=(runs, batch, classes, 1))
    mask = statistics.checkerboard(batch, classes)
    noise[:, mask] += statistics.FOCUS_RATIO * np.abs(rng.normal(size=noise[:, mask].shape))  # focused: n1 + c|n2|
    check = statistics._uncorrelated("u", noise, mask)
    p_values, fewest = [], None
    for dr, dc in ((0, 1), (0, -1), (1, 0), (-1, 0)):
        here, there = [], []
        for row in range(batch):
            for cls in range(classes):
                if mask[row, cls] and 0 <= row + dr < batch and 0 <= cls + dc < classes:
                    here.append(noise[:, row, cls, 0])
                    there.append(noise[:, row + dr, cls + dc, 0])
        here, there = np.concatenate(here), np.abs(np.concatenate(there))
        r = stats.pearsonr(here, there).statistic
        p_values.append(2 * stats.norm.sf(abs(r) * np.sqrt(here.size)))
        fewest = here.size if fewest is None else min(fewest, here.size)
    assert check.metrics["p_value"] == pytest.approx(min(1.0, 4 * min(p_values)), rel=1e-6)
    c, half = statistics.FOCUS_RATIO, stats.halfnorm.var()
    dilution = c * np.sqrt(half) / np.sqrt(1 + c * c * half)
    limit = (stats.norm.isf(1e-7 / 8) + stats.norm.isf(1e-6)) / np.sqrt(fewest) / dilution
    assert check.metrics["detectable_r"] == pytest.approx(limit, rel=1e-9)
    assert check.passed


def judge(engine, inputs: dict, bare: np.ndarray) -> list:
    """statistical_checks on a stand-in engine, from its runs of the checks' plan (statistical_plan)."""
    from aim.pipeline.engine_runs import run_statistical_checks

    return run_statistical_checks(engine, inputs, bare, 1)


@pytest.fixture(scope="module")
def bare():
    return np.random.default_rng(3).normal(size=(16, 10)).astype(np.float32)


def test_one_draw_broadcast_to_the_batch_fails_fresh_draws_alone(bare):
    """The rows-repeat defect: every row of a batch gets row 0's noise. Each value alone is N(0, 1)
    and fresh on every run; the rows of one batch repeat, which "fresh draws" compares (rows 0 and 1
    of each run, within rounding: z + n - z keeps each row's own last bits; comparing one row of two
    runs would pass it). The distribution checks may also fail it, on the repeated values' ties."""
    assert DEFECTS["rows-repeat"][1] == "fresh draws"
    checks = judge(DefectiveEngine(bare, 1, "rows-repeat"), {}, bare)
    (fresh,) = [c for c in checks if c.name == "fresh draws"]
    assert not fresh.passed and "rows of one batch REPEAT" in fresh.detail, fresh.detail
    assert fresh.metrics["differ_between_runs"] > 0.99  # fresh on every run: only the rows repeat
    assert all(c.passed for c in judge(DefectiveEngine(bare, 1, "none", seed=2), {}, bare))
