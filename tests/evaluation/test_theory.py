"""The theory's numbers against Monte-Carlo simulation (no engine involved)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import ndtri

from aim.evaluation import theory

# Monte-Carlo draws per case: the agreement rate's standard error sqrt(p (1 - p) / n) is then
# <= 0.5 / sqrt(n) = 0.0011 at n = 200,000, so the 0.005 tolerance is >= 4.5 standard errors.
DRAWS = 200_000
TOLERANCE = 0.005


def _mc_dense(z: np.ndarray, sigma: float, draws: int, rng) -> float:
    """Brute force: add sigma * N(0, 1) to every logit, count how often the clean top-1 still wins."""
    top = z.argmax(1)
    hits, per_row = 0, draws // z.shape[0]
    for row, target in zip(z, top):
        for start in range(0, per_row, 20_000):
            n = min(20_000, per_row - start)
            noisy = row[None] + sigma * rng.standard_normal((n, row.size))
            hits += int(np.sum(noisy.argmax(1) == target))
    return hits / (per_row * z.shape[0])


def _tiered_logits(rows: int, near: int, tiers: int, classes: int, rng) -> tuple[np.ndarray, list]:
    """Random logits for a large C that Monte-Carlo can still simulate exactly: `near` classes with
    continuous values, the other classes in `tiers` groups of equal value (random tier values)."""
    out, structure = [], []
    for _ in range(rows):
        head = 2.0 * rng.standard_normal(near)
        sizes = np.diff(np.linspace(0, classes - near, tiers + 1).round().astype(int))
        # the top class is a continuous one; a tier may come close to it, never above
        levels = np.minimum(2.0 * rng.standard_normal(tiers), head.max() - rng.uniform(0.05, 1.0, tiers))
        out.append(np.concatenate([head, np.repeat(levels, sizes)]))
        structure.append((head, levels, sizes))
    return np.stack(out), structure


def _mc_tiered(z, structure, sigma: float, draws: int, rng) -> float:
    """Exact simulation of the max over a tier of k equal logits: v + sigma * Phi^-1(U^(1/k))."""
    per_row, hits = draws // len(structure), 0
    for row, (head, levels, sizes) in zip(z, structure):
        top = int(row.argmax())
        assert top < head.size, "the top class must be a continuous one"
        noisy_head = head[None] + sigma * rng.standard_normal((per_row, head.size))
        u = rng.uniform(size=(per_row, levels.size))
        tier_max = levels[None] - sigma * ndtri(-np.expm1(np.log(u) / sizes[None]))
        others = np.delete(noisy_head, top, axis=1).max(1)
        hits += int(np.sum(noisy_head[:, top] > np.maximum(others, tier_max.max(1))))
    return hits / (per_row * len(structure))


@pytest.mark.parametrize("classes", [10, 150])
def test_agreement_matches_monte_carlo(classes):
    rng = np.random.default_rng(classes)
    z = 2.0 * rng.standard_normal((8, classes))
    for sigma in (0.5, 2.0, 6.0):
        predicted = float(theory.agreement_curve(z, [sigma])[0])
        measured = _mc_dense(z, sigma, DRAWS, rng)
        assert abs(measured - predicted) < TOLERANCE, (classes, sigma, measured, predicted)


def test_agreement_matches_monte_carlo_32000_classes():
    """C = 32,000 (Llama-2's vocabulary), quadrature with the grouped far classes vs exact simulation."""
    rng = np.random.default_rng(32000)
    z, structure = _tiered_logits(rows=10, near=64, tiers=40, classes=32000, rng=rng)
    for sigma in (0.3, 1.0, 3.0):
        predicted = float(theory.agreement_curve(z, [sigma])[0])
        measured = _mc_tiered(z, structure, sigma, 120_000, rng)  # s.e. <= 0.0015: 0.005 is > 3.4 s.e.
        assert abs(measured - predicted) < TOLERANCE, (sigma, measured, predicted)


def test_grouping_of_far_classes_is_within_1e4_of_the_exact_sum(monkeypatch):
    rng = np.random.default_rng(1)
    z = 3.0 * rng.standard_normal((4, 32000))
    sigmas = [0.1, 1.0, 5.0, 50.0]
    grouped = theory.agreement_curve(z, sigmas)
    monkeypatch.setattr(theory, "EXACT", 10**6)
    exact = theory.agreement_curve(z, sigmas)
    assert np.max(np.abs(grouped - exact)) < 1e-4


@pytest.mark.parametrize("classes", [10, 150, 32000])
def test_a_tie_of_all_classes_gives_chance(classes):
    assert theory.win_probability(np.zeros((1, classes)), [0], 1.0)[0] * classes == pytest.approx(1.0, rel=0.01)


def test_curve_is_one_at_zero_monotone_and_reaches_chance():
    rng = np.random.default_rng(2)
    z = 3.0 * rng.standard_normal((50, 20))
    sigmas = np.concatenate([[0.0], np.geomspace(0.01, 1e4, 40)])
    g = theory.agreement_curve(z, sigmas)
    assert g[0] == 1.0
    assert np.all(np.diff(g) <= 1e-12)
    assert g[-1] == pytest.approx(1 / 20, abs=1e-3)


def test_expected_accuracy_matches_monte_carlo():
    rng = np.random.default_rng(3)
    z = 2.0 * rng.standard_normal((8, 10))
    labels = rng.integers(0, 10, size=8)
    for sigma in (0.0, 1.0, 4.0):
        predicted = float(theory.accuracy_curve(z, labels, [sigma])[0])
        noisy = z[None] + sigma * rng.standard_normal((25_000,) + z.shape)
        measured = float(np.mean(noisy.argmax(-1) == labels[None]))
        assert abs(measured - predicted) < TOLERANCE


def test_inverse_of_g_round_trips():
    rng = np.random.default_rng(4)
    z = 2.0 * rng.standard_normal((100, 10))
    targets = np.array([0.99, 0.8, 0.5, 0.2, 0.11])
    sigma, achieved = theory.invert_agreement(z, targets)
    assert np.all(np.diff(sigma) > 0)
    assert np.max(np.abs(achieved - targets)) < 1e-3
    with pytest.raises(ValueError, match="1/C"):
        theory.invert_agreement(z, [0.05])


def test_focus_formulas_match_monte_carlo():
    rng = np.random.default_rng(5)
    z = 2.0 * rng.standard_normal((16, 10))
    n = 20_000
    for w in (1.0, 4.0, 12.0):
        half_normal = np.abs(rng.standard_normal((n,) + z.shape))
        boosted = z.copy()[None].repeat(n, 0)
        boosted[..., 3] += w * half_normal[..., 3]
        measured = float(np.mean(boosted.argmax(-1) == 3))
        predicted = float(theory.boost_win_probability(z, 3, w).mean())
        assert abs(measured - predicted) < TOLERANCE, ("boost", w, measured, predicted)

        top = z.argmax(1)
        k = int(np.bincount(top).argmax())
        suppressed = z.copy()[None].repeat(n, 0)
        suppressed[..., k] -= w * half_normal[..., k]
        rows = top == k
        measured = float(np.mean(suppressed.argmax(-1)[:, rows] == k))
        predicted = float(theory.suppress_survival_probability(z, k, w)[0, rows].mean())
        assert abs(measured - predicted) < 2 * TOLERANCE, ("suppress", w, measured, predicted)
