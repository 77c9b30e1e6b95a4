"""What the theory predicts (docs/method.md §3), computed from clean logits.

Under utility noise z' = z + sigma * n, class y wins with probability

    P_y(sigma) = integral phi(t) * prod_{j != y} Phi((z_y - z_j) / sigma + t) dt

evaluated here by Gauss-Hermite quadrature in t with the product summed as log Phi (a product of
32,000 numbers near 1 underflows or loses every digit otherwise). For a large C the gaps beyond the
nearest competitors are grouped (count, mean, variance per group) and each group enters by a
second-order Taylor expansion of log Phi around its mean: exact where it matters (near competitors,
small sigma), and within 1e-4 of the exact sum elsewhere (tests/evaluation/test_theory.py).

The agreement curve G(sigma) is the mean of P_top1 over inputs: label-free, monotone, from 1 at
sigma = 0 down to 1/C. With labels instead of the top-1 class it is the expected accuracy.
Focus: boosting class k by w wins with probability 2 (1 - Phi(m / w)) (m: margin to the top);
suppressing the top class by w keeps it on top with probability 2 Phi(g / w) - 1 (g: its gap).
"""

from __future__ import annotations

import numpy as np
from scipy.special import log_ndtr, ndtr

# Quadrature nodes: the integrand phi(t) Phi(t)^(C-1) of a 32,000-way tie peaks near t = 4 with a
# width of about 0.25; 96 probabilists' Hermite nodes integrate it to 1/C within 1e-5.
NODES = 96
# Gaps kept exactly (the nearest competitors) and groups for the rest, when C - 1 is larger.
EXACT = 128
GROUPS = 128
# Rows processed at once: bounds the [rows, nodes, points] working array to ~50 MB.
_CHUNK_ELEMENTS = 6_000_000


# Nodes whose weight is below this are dropped (they hold less than 1e-13 of the mass in total), and
# classes with (gap / sigma + t) above IGNORE_ABOVE for every node are skipped: log Phi(8.3) > -1e-16.
MIN_WEIGHT = 1e-15
IGNORE_ABOVE = 8.3


def _nodes(count: int = NODES) -> tuple[np.ndarray, np.ndarray]:
    t, w = np.polynomial.hermite_e.hermegauss(count)
    w = w / np.sqrt(2 * np.pi)  # weights of the standard normal density
    keep = w > MIN_WEIGHT
    return t[keep], w[keep]


def _dlog_ndtr(x):
    """First and second derivatives of log Phi: m = phi / Phi, and -m (x + m)."""
    m = np.exp(-0.5 * x * x - log_ndtr(x)) / np.sqrt(2 * np.pi)
    return m, -m * (x + m)


def _compress(gaps: np.ndarray, exact: int | None = None, groups: int | None = None):
    """[N, K] gaps -> (count, mean, variance) [N, P]: the `exact` smallest gaps as they are, the rest
    sorted and split into `groups` groups of (nearly) equal count."""
    exact, groups = exact or EXACT, groups or GROUPS
    n, k = gaps.shape
    if k <= exact + groups:
        gaps = np.sort(gaps, axis=1)
        return np.ones_like(gaps), gaps, np.zeros_like(gaps)
    near = np.partition(gaps, exact - 1, axis=1)
    head = np.sort(near[:, :exact], axis=1)
    tail = np.sort(near[:, exact:], axis=1)
    edges = np.linspace(0, tail.shape[1], groups + 1).round().astype(int)
    counts = np.diff(edges).astype(np.float64)
    cumsum = np.concatenate([np.zeros([n, 1]), np.cumsum(tail, axis=1)], axis=1)
    cumsq = np.concatenate([np.zeros([n, 1]), np.cumsum(tail * tail, axis=1)], axis=1)
    means = (cumsum[:, edges[1:]] - cumsum[:, edges[:-1]]) / counts
    variances = np.maximum((cumsq[:, edges[1:]] - cumsq[:, edges[:-1]]) / counts - means**2, 0.0)
    count = np.concatenate([np.ones_like(head), np.broadcast_to(counts, means.shape)], axis=1)
    return count, np.concatenate([head, means], axis=1), np.concatenate([np.zeros_like(head), variances], axis=1)


def _as_rows(logits: np.ndarray, class_axis: int) -> np.ndarray:
    """Logits of any layout -> [rows, C] float64 (pixels and positions become rows)."""
    z = np.moveaxis(np.asarray(logits, dtype=np.float64), class_axis, -1)
    return z.reshape(-1, z.shape[-1])


def win_probability(logits, target, sigma, class_axis: int = -1, nodes: int = NODES) -> np.ndarray:
    """P(class `target` has the largest logit after adding sigma * N(0, 1) to every logit).

    `logits` [..., C] (classes on `class_axis`), `target` the class index per row (same leading shape),
    `sigma` a number or a 1-D array of sigmas. Returns [len(sigmas), rows] (or [rows] for a number).
    At sigma = 0: 1 where the target is the strict maximum, 1/ties for a tie, else 0.
    """
    z = _as_rows(logits, class_axis)
    target = np.asarray(target).reshape(-1)
    if target.shape[0] != z.shape[0]:
        raise ValueError(f"{target.shape[0]} targets for {z.shape[0]} rows of logits")
    scalar = np.ndim(sigma) == 0
    sigmas = np.atleast_1d(np.asarray(sigma, dtype=np.float64))
    if np.any(sigmas < 0) or not np.all(np.isfinite(sigmas)):
        raise ValueError(f"sigma must be finite and >= 0, got {sigmas}")
    rows, classes = z.shape
    own = np.take_along_axis(z, target[:, None], axis=1)
    others = np.ones_like(z, dtype=bool)
    others[np.arange(rows), target] = False
    gaps = (own - z)[others].reshape(rows, classes - 1)  # > 0: the target is ahead of that class
    count, mean, var = _compress(gaps)
    t, w = _nodes(nodes)
    out = np.empty([sigmas.size, rows])
    chunk = max(1, _CHUNK_ELEMENTS // (t.size * mean.shape[1]))
    for i, s in enumerate(sigmas):
        if s == 0:
            ahead = np.all(gaps > 0, axis=1)
            ties = np.sum(gaps == 0, axis=1)
            out[i] = np.where(ahead, 1.0, np.where(np.all(gaps >= 0, axis=1), 1.0 / (ties + 1), 0.0))
            continue
        for start in range(0, rows, chunk):
            sl = slice(start, start + chunk)
            # points are sorted by gap within each row: drop the columns far behind in every row
            cols = max(1, int(np.searchsorted(mean[sl].min(axis=0), (IGNORE_ABOVE - t[0]) * s)))
            x = mean[sl, None, :cols] / s + t[None, :, None]  # [rows, nodes, points]
            terms = count[sl, None, :cols] * log_ndtr(x)
            if np.any(var[sl, :cols]):
                _, second = _dlog_ndtr(x)
                terms += 0.5 * count[sl, None, :cols] * var[sl, None, :cols] / (s * s) * second
            out[i, sl] = np.exp(terms.sum(axis=2)) @ w
    out = np.clip(out, 0.0, 1.0)
    return out[0] if scalar else out


def agreement_curve(logits, sigmas, class_axis: int = -1, nodes: int = NODES) -> np.ndarray:
    """G(sigma): expected fraction of rows whose top-1 class survives the noise, per sigma."""
    z = _as_rows(logits, class_axis)
    return win_probability(z, np.argmax(z, axis=1), np.atleast_1d(sigmas), nodes=nodes).mean(axis=1)


def accuracy_curve(logits, labels, sigmas, class_axis: int = -1, nodes: int = NODES) -> np.ndarray:
    """Expected accuracy under utility noise on labelled rows, per sigma (not necessarily monotone)."""
    z = _as_rows(logits, class_axis)
    return win_probability(z, np.asarray(labels).reshape(-1), np.atleast_1d(sigmas), nodes=nodes).mean(axis=1)


def invert_agreement(logits, targets, class_axis: int = -1, grid: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """The sigma at which G(sigma) equals each target in (1/C, 1], and G at that sigma.

    G is computed on a log-spaced grid of sigma spanning the logits' gaps (from 1e-3 of the smallest
    top-1 gap to 1e3 of the largest logit spread) and inverted by monotone (PCHIP) interpolation of
    log sigma against G; the returned G is recomputed at the sigmas found, so the error is visible.
    Target 1 gives sigma 0 (the exact model)."""
    from scipy.interpolate import PchipInterpolator

    z = _as_rows(logits, class_axis)
    chance = 1.0 / z.shape[1]
    targets = np.atleast_1d(np.asarray(targets, dtype=np.float64))
    if np.any(targets <= chance) or np.any(targets > 1):
        raise ValueError(f"agreement targets must lie in (1/C, 1] = ({chance:.4g}, 1], got {targets}")
    top2 = -np.sort(-z, axis=1)[:, :2]
    gaps = top2[:, 0] - top2[:, 1]
    small = float(np.min(gaps[gaps > 0])) if np.any(gaps > 0) else 1e-3
    spread = float(np.max(np.ptp(z, axis=1))) or 1.0
    sigmas = np.geomspace(1e-3 * small, 1e3 * spread, grid)
    g = agreement_curve(z, sigmas)
    g = np.minimum.accumulate(g)  # exactly monotone: quadrature noise is far below 1e-6
    reached = targets[targets < 1]
    if reached.size and (reached.min() < g[-1] or reached.max() > g[0]):
        raise ValueError(
            f"targets {reached.min():.4g}..{reached.max():.4g} outside the reachable G range {g[-1]:.4g}..{g[0]:.4g}"
        )
    keep = np.concatenate([[True], np.diff(g) < 0])  # strictly decreasing points for the interpolator
    inverse = PchipInterpolator(g[keep][::-1], np.log(sigmas[keep])[::-1])
    sigma = np.where(targets >= 1, 0.0, np.exp(inverse(np.minimum(targets, g[0]))))
    return sigma, agreement_curve(z, sigma)


def boost_win_probability(logits, boosted: int, strength, class_axis: int = -1) -> np.ndarray:
    """Focus +w on class k only: P(k wins) = 2 (1 - Phi(m / w)), m = max_{j != k} z_j - z_k (1 if m < 0).
    Returns [len(strengths), rows]."""
    z = _as_rows(logits, class_axis)
    margin = np.delete(z, boosted, axis=1).max(axis=1) - z[:, boosted]
    w = np.atleast_1d(np.asarray(strength, dtype=np.float64))[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        p = np.where(w > 0, 2 * (1 - ndtr(margin[None] / w)), (margin[None] < 0).astype(float))
    return np.where(margin[None] < 0, 1.0, p)


def suppress_survival_probability(logits, suppressed: int, strength, class_axis: int = -1) -> np.ndarray:
    """Focus -w on class k only: P(k still wins) = 2 Phi(g / w) - 1 where k is the top class with gap
    g to the runner-up (0 where k is not on top). Returns [len(strengths), rows]."""
    z = _as_rows(logits, class_axis)
    gap = z[:, suppressed] - np.delete(z, suppressed, axis=1).max(axis=1)
    w = np.atleast_1d(np.abs(np.asarray(strength, dtype=np.float64)))[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        p = np.where(w > 0, 2 * ndtr(gap[None] / w) - 1, 1.0)
    return np.where(gap[None] > 0, p, 0.0)
