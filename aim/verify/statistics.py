"""Statistical checks of the production flavour's noise (SPEC section 5): random outputs cannot be
compared element by element across backends, so the engine's own draws are tested.
"""

from __future__ import annotations

import numpy as np

from aim.lazy import lazy_import
from aim.specs import Check
from aim.verify.compare import identical

stats = lazy_import("scipy.stats")

# Two-sided KS tests must not reject at this level: a correct engine fails one check about once in
# a thousand runs, a wrong distribution (a shifted mean, a 5% scale error, correlated noises) fails
# every time at the sample sizes below.
KS_ALPHA = 1e-3
# Statistical checks gather at least this many noise values (repeating runs when outputs are small).
MIN_SAMPLES = 20_000
MAX_RUNS = 200
# Strength of the knobs in the statistical runs, in logit units.
SIGMA = 2.0


def _ks(name: str, samples: np.ndarray, distribution, expect: str) -> Check:
    result = stats.kstest(samples, distribution.cdf)
    metrics = {
        "n": int(samples.size),
        "ks_statistic": float(result.statistic),
        "p_value": float(result.pvalue),
        "mean": float(samples.mean()),
        "std": float(samples.std()),
    }
    passed = result.pvalue > KS_ALPHA
    detail = f"{expect}: KS p={result.pvalue:.3g} (n={samples.size}, mean {samples.mean():+.3f}, std {samples.std():.3f})"
    return Check(name, bool(passed), detail, metrics)


def _subsample(values: np.ndarray, rng: np.random.Generator, limit: int = 200_000) -> np.ndarray:
    values = values.ravel().astype(np.float64)
    return values if values.size <= limit else rng.choice(values, size=limit, replace=False)


def statistical_checks(engine, inputs: dict, bare: np.ndarray, class_axis: int, seed: int = 0) -> list[Check]:
    """Checks the production engine's noise (SPEC section 5) against the bare model's logits `bare`."""
    rng = np.random.default_rng(seed)
    batch, classes = bare.shape[0], bare.shape[class_axis]
    runs = int(min(MAX_RUNS, max(1, np.ceil(MIN_SAMPLES / bare.size))))

    def draws(utility, focus):
        """(z' - z) over `runs` runs, stacked."""
        return np.stack([engine.run(inputs, utility, focus) - bare for _ in range(runs)])

    checks = [identical("identity at utility 0, focus 0", bare, engine.run(inputs, 0.0, None))]

    utility = np.zeros(batch, np.float32)
    utility[1::2] = SIGMA
    mixed = engine.run(inputs, utility, None)
    changed = float(np.mean(mixed[1::2] != bare[1::2])) if batch > 1 else 1.0
    exact = bool(np.array_equal(mixed[0::2], bare[0::2]))
    checks.append(
        Check(
            "mixed batch (utility 0 rows exact)",
            exact and changed > 0.99,
            f"utility-0 rows {'exact' if exact else 'NOT exact'}; {changed:.1%} of elements of utility-{SIGMA:g} rows changed",
            {"zero_rows_exact": exact, "noisy_rows_changed": changed},
        )
    )

    noise = draws(SIGMA, None) / SIGMA
    checks.append(_ks("utility noise ~ N(0,1)", _subsample(noise, rng), stats.norm, "(z'-z)/utility vs N(0,1)"))
    first, second = engine.run(inputs, SIGMA, None), engine.run(inputs, SIGMA, None)
    fresh = float(np.mean(first != second))
    rows_differ = batch == 1 or not np.array_equal(noise[0, 0], noise[0, 1])
    checks.append(
        Check(
            "fresh draws",
            fresh > 0.99 and rows_differ,
            f"{fresh:.1%} of elements differ between two runs; rows of one batch {'differ' if rows_differ else 'REPEAT'}",
            {"differ_between_runs": fresh, "rows_differ": bool(rows_differ)},
        )
    )

    for sign, label in ((1.0, "boost"), (-1.0, "suppress")):
        focus = np.full(classes, sign * SIGMA, np.float32)
        half = draws(0.0, focus) / SIGMA * sign
        one_signed = bool(np.all(half >= 0))
        check = _ks(f"focus {label} noise half-normal", _subsample(half, rng), stats.halfnorm, f"{label}: |noise| vs half-normal")
        check.passed = check.passed and one_signed
        check.detail += "; one-signed" if one_signed else "; WRONG SIGN seen"
        check.metrics["one_signed"] = one_signed
        checks.append(check)

    # n1 + |n2| for independent standard normals is sqrt(2) * SkewNormal(1); if the two noises were
    # one (n2 = n1, a merged or shared draw) half the values would be exactly 0 and the test would fail.
    both = draws(SIGMA, np.full(classes, SIGMA, np.float32)) / SIGMA
    checks.append(
        _ks(
            "utility and focus noises independent",
            _subsample(both, rng),
            stats.skewnorm(1.0, scale=np.sqrt(2.0)),
            "n1+|n2| vs sqrt(2)*SkewNormal(1)",
        )
    )
    return checks
