"""Statistical checks of the production flavour's noise (docs/method.md §5): random outputs cannot be
compared element by element across backends, so the engine's own draws are tested.

False alarms: each statistical check fails only at p < ALPHA = 1e-7, and a build runs five of them
(STATISTICAL_CHECKS; the others are exact: bit-for-bit identity, draws that differ), so a correct
engine fails a build's statistics with probability at most FALSE_FAILURE_RATE = 5e-7 (a union bound:
it holds however the checks depend on each other). A check made of several tests (Kolmogorov-Smirnov,
mean, variance; or one correlation per neighbour) takes the smallest p-value times their number
(Bonferroni). The mean and variance tests use the normal approximation of a sample mean; at n >= 20,000
its skewness moves a 5.5-standard-error tail by less than a factor 2, inside the 1e-6 per build budget.

Power, on n >= MIN_SAMPLES values per test (the `make false-alarms` target measures it, see
aim/benchmarks/false_alarms.py): a 5% scale error of the utility noise moves the sample variance by
>= 10 standard errors (missed with probability < 1e-5 at n = 20,000, far less above); merged noise
(n2 = n1) and a focus noise of the wrong sign fail by a Kolmogorov-Smirnov distance of > 0.4 and by
the sign; stale draws repeat exactly; a focus noise drawn from a neighbouring class's or row's utility
noise (a shifted stream) correlates the two at r > 0.9 in the checkerboard run below.
"""

from __future__ import annotations

import numpy as np

from aim.lazy import lazy_import
from aim.verdicts import Check
from aim.verify.compare import identical
from aim.verify.results import Knobs, Plan

stats = lazy_import("scipy.stats")
special = lazy_import("scipy.special")

ALPHA = 1e-7  # a statistical check fails only below this p-value
KS_ALPHA = ALPHA  # the name other modules know
STATISTICAL_CHECKS = (
    "utility noise ~ N(0,1)",
    "focus boost noise half-normal",
    "focus suppress noise half-normal",
    "utility and focus noises independent",
    "noises uncorrelated across classes and rows",
)
FALSE_FAILURE_RATE = ALPHA * len(STATISTICAL_CHECKS)  # per build, for a correct engine
# Each test gathers at least this many noise values: the runs it asks for (runs_for) repeat until
# they give that many, one value a run at the worst (a fixed batch of one row of one logit).
MIN_SAMPLES = 20_000
MAX_RUNS = MIN_SAMPLES
MIN_PAIRS = 1_000  # neighbour pairs per offset; a shifted stream (r ~ 0.92) fails at a few hundred
MAX_PAIRS = 2_000_000  # beyond this, every k-th pair (large segmentation outputs)
SUBSAMPLE = 200_000  # larger draws are subsampled (seeded) before the tests
# Strength of the knobs in the statistical runs, in logit units.
SIGMA = 2.0
# The checkerboard run's focus strength over its utility: |n2| then dominates a focused element, so a
# dependence between n2 and a neighbour's n1 shows at 92% of its strength (51% at a ratio of 1).
FOCUS_RATIO = 4.0
MISS = 1e-6  # the power the checks state: a defect of the stated size is missed with this probability
# Neighbours of a focused element in the checkerboard, as (row, class) offsets: all are unfocused.
NEIGHBOURS = ((0, 1), (0, -1), (1, 0), (-1, 0))


class SumOfNoises:
    """The law of n1 + c |n2| for independent standard normals: sqrt(1 + c^2) * SkewNormal(c). Its CDF
    by Owen's T (scipy's skewnorm.cdf integrates numerically in the left tail: seconds for 10,000 values)."""

    def __init__(self, c: float):
        self.c, self.scale = float(c), float(np.sqrt(1 + c * c))

    def cdf(self, x):
        t = np.asarray(x, np.float64) / self.scale
        return np.clip(special.ndtr(t) - 2 * special.owens_t(t, self.c), 0.0, 1.0)

    def stats(self, moments: str):
        return stats.skewnorm(self.c, scale=self.scale).stats(moments=moments)


def _p_two_sided(z: float) -> float:
    return float(2 * stats.norm.sf(abs(z)))


def _distribution(name: str, samples: np.ndarray, distribution, expect: str) -> Check:
    """Kolmogorov-Smirnov (the shape) and z-tests of the mean and the variance (powerful against a
    shift or a scale error), against the known `distribution`; Bonferroni over the three. Fewer than
    MIN_SAMPLES values (the runs could not give them): a failure named by that reason, not by the test."""
    n = samples.size
    if n < MIN_SAMPLES:
        return too_few(name, f"{n} values (needs {MIN_SAMPLES})")
    mean, var, kurtosis = (float(v) for v in distribution.stats(moments="mvk"))
    ks = stats.kstest(samples, distribution.cdf)
    centred = samples - mean
    mean_z = float(centred.mean() / np.sqrt(var / n))
    # Var((x - mu)^2) = mu4 - var^2 = (kurtosis + 2) var^2, kurtosis being the excess.
    var_z = float((np.mean(centred**2) - var) / np.sqrt((kurtosis + 2) * var**2 / n))
    p = min(1.0, 3 * min(float(ks.pvalue), _p_two_sided(mean_z), _p_two_sided(var_z)))
    metrics = {
        "n": int(n),
        "ks_statistic": float(ks.statistic),
        "ks_p_value": float(ks.pvalue),
        "mean": float(samples.mean()),
        "std": float(samples.std()),
        "mean_z": mean_z,
        "variance_z": var_z,
        "p_value": p,
        "alpha": ALPHA,
    }
    detail = (
        f"{expect}: p={p:.3g} (KS {ks.pvalue:.3g}, mean z {mean_z:+.2f}, variance z {var_z:+.2f}; n={n}, "
        f"mean {samples.mean():+.3f}, std {samples.std():.3f}); fails below {ALPHA:g}"
    )
    return Check(name, bool(p > ALPHA), detail, metrics)


def too_few(name: str, found: str) -> Check:
    """The failure of a statistical check that was not given enough values to judge: named by that."""
    return Check(
        f"too few noise values for {name!r}",
        False,
        f"{found}: the engine's outputs are too small for the statistics (a larger batch range gives more "
        "values per run)",
        {"check": name},
    )


def runs_for(values_per_run: int) -> int:
    """How many runs give MIN_SAMPLES values at `values_per_run` values each (at most MAX_RUNS; none
    when a run gives none): what a statistical check asks of the engine runs."""
    if values_per_run <= 0:
        return 0
    return int(min(MAX_RUNS, -(-MIN_SAMPLES // values_per_run)))


def _subsample(values: np.ndarray, rng: np.random.Generator, limit: int = SUBSAMPLE) -> np.ndarray:
    values = values.ravel()
    if values.size > limit:
        values = values[rng.choice(values.size, size=limit, replace=False)]
    return values.astype(np.float64)


def checkerboard(batch: int, classes: int) -> np.ndarray:
    """[B, C] True where (row + class) is odd: every neighbour of a True element is False."""
    return (np.arange(batch)[:, None] + np.arange(classes)[None, :]) % 2 == 1


def neighbour_pairs(noise: np.ndarray, mask: np.ndarray, offset: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(focused, neighbour) values of `noise` [runs, B, C, positions] for every focused element (mask
    [B, C]) whose neighbour at (row, class) `offset` exists: same run, same position."""
    rows, classes = mask.shape
    dr, dc = offset
    r0, r1, c0, c1 = max(0, -dr), rows - max(0, dr), max(0, -dc), classes - max(0, dc)
    if r0 >= r1 or c0 >= c1:
        return np.empty(0), np.empty(0)
    chosen = mask[r0:r1, c0:c1]
    here = noise[:, r0:r1, c0:c1][:, chosen]
    there = noise[:, r0 + dr : r1 + dr, c0 + dc : c1 + dc][:, chosen]
    return here.ravel(), there.ravel()


def dilution(ratio: float = FOCUS_RATIO) -> float:
    """corr(n1 + ratio |n2|, |m|) / corr(|n2|, |m|) for any m independent of n1: how much of a
    dependence between |n2| and a neighbour's |n1| the focused element still shows."""
    half_normal_var = 1 - 2 / np.pi
    return float(ratio * np.sqrt(half_normal_var) / np.sqrt(1 + ratio**2 * half_normal_var))


def _uncorrelated(name: str, noise: np.ndarray, mask: np.ndarray) -> Check:
    """Pearson r between each focused element (n1 + FOCUS_RATIO |n2|) and the |n1| of its neighbour in
    the next / previous class and row. Independent noises: r sqrt(n) ~ N(0, 1) (pairs are disjoint, so
    independent, whatever the distributions). A shifted stream (n2 of class k drawn as n1 of class k+1,
    or of row r+1) gives r ~ 0.92."""
    found, p_values = [], []
    for offset in NEIGHBOURS:
        here, there = neighbour_pairs(noise, mask, offset)
        if here.size < 2:
            continue
        step = -(-here.size // MAX_PAIRS)  # every step-th pair: still independent pairs, bounded memory
        here, there = here[::step].astype(np.float64), there[::step].astype(np.float64)
        x, y = here - here.mean(), np.abs(there) - np.abs(there).mean()
        r = float(np.sum(x * y) / np.sqrt(np.sum(x * x) * np.sum(y * y)))
        z = r * np.sqrt(here.size)
        found.append({"offset": list(offset), "pairs": int(here.size), "r": r, "z": float(z)})
        p_values.append(_p_two_sided(z))
    p = min(1.0, len(p_values) * min(p_values)) if p_values else 0.0
    fewest = min((f["pairs"] for f in found), default=0)
    # The |n2|-|n1| correlation this check detects with probability 1 - MISS at its fewest pairs.
    threshold = stats.norm.isf(ALPHA / (2 * max(1, len(found))))
    detectable = float((threshold + stats.norm.isf(MISS)) / np.sqrt(max(fewest, 1)) / dilution())
    if fewest < MIN_PAIRS:
        return too_few(name, f"{fewest} neighbour pairs at the fewest offset (needs {MIN_PAIRS})")
    worst = max(found, key=lambda f: abs(f["z"]), default={"offset": [0, 0], "r": float("nan")})
    metrics = {"neighbours": found, "p_value": p, "alpha": ALPHA, "detectable_r": detectable}
    detail = (
        f"focused n1+{FOCUS_RATIO:g}|n2| vs neighbours' |n1| (class +-1, row +-1): p={p:.3g}, largest |r| "
        f"{abs(worst['r']):.4f} at offset {tuple(worst['offset'])} over >= {fewest} pairs; detects |r| >= "
        f"{detectable:.3f} between |n2| and a neighbour's |n1|; fails below {ALPHA:g}"
    )
    return Check(name, bool(p > ALPHA), detail, metrics)


def statistical_plan(shape: tuple[int, ...], class_axis: int) -> Plan:
    """The production engine's runs the statistical checks judge, on the statistics batch whose bare
    logits have `shape` (the same batch in every run):

    identity      utility 0, focus 0, once
    mixed         utility 0 on even rows, SIGMA on odd ones, once
    utility       utility SIGMA, until MIN_SAMPLES values
    fresh         utility SIGMA, twice
    boost         focus +SIGMA on every class, until MIN_SAMPLES values
    suppress      focus -SIGMA on every class, until MIN_SAMPLES values
    checkerboard  utility SIGMA everywhere, focus FOCUS_RATIO * SIGMA on every other (row, class), until
                  MIN_SAMPLES focused values
    """
    batch, classes = shape[0], shape[class_axis]
    size = int(np.prod(shape))
    mixed = np.zeros(batch, np.float32)
    mixed[1::2] = SIGMA
    mask = checkerboard(batch, classes)
    focus = np.where(mask, FOCUS_RATIO * SIGMA, 0.0).astype(np.float32)
    every = runs_for(size)
    return {
        "identity": [Knobs(0.0)],
        "mixed": [Knobs(mixed)],
        "utility": [Knobs(SIGMA)] * every,
        "fresh": [Knobs(SIGMA)] * 2,
        "boost": [Knobs(0.0, np.full(classes, SIGMA, np.float32))] * every,
        "suppress": [Knobs(0.0, np.full(classes, -SIGMA, np.float32))] * every,
        "checkerboard": [Knobs(SIGMA, focus)] * runs_for(int(mask.sum()) * (size // (batch * classes))),
    }


def statistical_checks(draws: dict[str, np.ndarray], bare: np.ndarray, class_axis: int, seed: int = 0) -> list[Check]:
    """Judges the production engine's noise (docs/method.md §5) from its runs of `statistical_plan`
    (`draws`: name -> outputs stacked [runs, ...]) against the bare model's logits `bare` of the same
    batch. `seed` seeds the subsampling; the engine's own noise was seeded (where it can be) by
    whoever made its session (pipeline/verify.py seeds ONNX Runtime before any session exists)."""
    rng = np.random.default_rng(seed)
    batch, classes = bare.shape[0], bare.shape[class_axis]

    def noise(name: str) -> np.ndarray:
        """(z' - z) / SIGMA of a plan entry's runs, [runs, ...]."""
        return (draws[name] - bare) / SIGMA

    checks = [identical("identity at utility 0, focus 0", bare, draws["identity"][0])]

    mixed = draws["mixed"][0]
    changed = float(np.mean(mixed[1::2] != bare[1::2])) if batch > 1 else 1.0
    exact = bool(np.array_equal(mixed[0::2], bare[0::2]))
    checks.append(
        Check(
            "mixed batch (utility 0 rows exact)",
            exact and changed > 0.99,
            f"utility-0 rows {'exact' if exact else 'NOT exact'}; {changed:.1%} of elements of "
            f"utility-{SIGMA:g} rows changed",
            {"zero_rows_exact": exact, "noisy_rows_changed": changed},
        )
    )

    utility = noise("utility")
    checks.append(
        _distribution(STATISTICAL_CHECKS[0], _subsample(utility, rng), stats.norm, "(z'-z)/utility vs N(0,1)")
    )
    first, second = draws["fresh"]
    fresh = float(np.mean(first != second))
    # Rows 0 and 1 of every run, within rounding: z + n - z keeps a row's own last bits, so a draw repeated
    # over the batch is never bit-equal across rows; independent rows all within 1e-4: p < 1e-8.
    rows_differ = batch == 1 or not np.allclose(utility[:, 0], utility[:, 1], rtol=0, atol=1e-4)
    checks.append(
        Check(
            "fresh draws",
            fresh > 0.99 and rows_differ,
            f"{fresh:.1%} of elements differ between two runs; rows of one batch "
            f"{'differ' if rows_differ else 'REPEAT'}",
            {"differ_between_runs": fresh, "rows_differ": bool(rows_differ)},
        )
    )

    for sign, name, label in ((1.0, STATISTICAL_CHECKS[1], "boost"), (-1.0, STATISTICAL_CHECKS[2], "suppress")):
        half = noise(label) * sign
        one_signed = bool(np.all(half >= 0))
        check = _distribution(name, _subsample(half, rng), stats.halfnorm, f"{label}: |noise| vs half-normal")
        check.passed = check.passed and one_signed
        check.detail += "; one-signed" if one_signed else "; WRONG SIGN seen"
        check.metrics["one_signed"] = one_signed
        checks.append(check)

    # The checkerboard run: utility on every element, focus on every other one, so every focused
    # element's neighbours (next class, next row) carry n1 alone. Focused: n1 + c |n2|, which for
    # independent noises is sqrt(1 + c^2) * SkewNormal(c); were the two noises one draw (n2 = n1, a
    # merged random node), half of them would be below zero far more often than the 8% it allows.
    mask = checkerboard(batch, classes)
    both = np.moveaxis(noise("checkerboard"), class_axis + 1, 2)
    both = both.reshape(*both.shape[:3], -1)  # [runs, B, C, positions]
    checks.append(
        _distribution(
            STATISTICAL_CHECKS[3],
            _subsample(both[:, mask], rng),
            SumOfNoises(FOCUS_RATIO),
            f"n1+{FOCUS_RATIO:g}|n2| vs sqrt({1 + FOCUS_RATIO**2:g})*SkewNormal({FOCUS_RATIO:g})",
        )
    )
    checks.append(_uncorrelated(STATISTICAL_CHECKS[4], both, mask))
    return checks
