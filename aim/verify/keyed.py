"""Checks of a keyed production engine (noise "keyed", graph_passes.noise.keyed_noise).

Keyed noise is a function of the key and of the request, so the engine is deterministic and two
kinds of checks replace the fresh-noise ones of verify/statistics.py:

- the same request gives the same answer: two runs bit for bit, and each row alone as inside its
  batch; and the engine agrees element-wise with the PyTorch twin of the same keyed statement
  (which random draws never could);
- distinct requests draw independent noise that passes the same tests as fresh noise: N(0, 1) by
  KS, half-normal and one-signed focus noise, n1 and n2 independent, no correlation between rows or
  between neighbouring elements. Repeating a request would only repeat its draw, so every row of
  every run here is a distinct request: a distinct tier (sigma), which the draw absorbs;
- distinct inputs at ONE tier draw independent noise (no draw shared between rows, none that ignores
  the input), and one query agrees with the clean answer as often as under fresh noise.

The engine runs the plan's runs (pipeline/engine_runs.py); every judge here takes arrays and returns a Check.
"""

from __future__ import annotations

import numpy as np

from aim.graph_passes.noise import TIER_RESOLUTION, correlation_width
from aim.lazy import lazy_import
from aim.verdicts import Check, Tolerance
from aim.verify.compare import compare, identical
from aim.verify.results import REFERENCE, Knobs, Plan
from aim.verify.statistics import ALPHA, SIGMA, _distribution, _subsample, runs_for

stats = lazy_import("scipy.stats")

# Distinct tiers of the statistical runs: SIGMA + i * TIER_SPACING, far above the digest's
# resolution of sigma (2**-16), so every row of every run has a seed of its own.
TIER_SPACING = 2.0**-12
# FP16 builds: both sides compute the keyed redistribution in FP32 from the same FP16 logits and
# round once to FP16, so they may differ by one FP16 ulp.
FP16_RTOL = 2.0**-10
MAX_PAIRS = 2_000_000  # correlations of larger outputs are judged on this many pairs per axis
# Distinct inputs at one tier: the closest two rows judged lie FAR correlation widths apart at the
# highest tier of the check, so that they share no lattice vertex or digest cell (each of the 4
# keyed coordinates within two widths of the other's: probability < 1e-8 for a pair).
FAR = 200
DISTINCT_RUNS = 8  # tiers sigma_max * (1 - k / 16), k < 8: distinct draws, distances at most doubled
# The noise of a tier is resolved in the output if the tier is at least this fraction of the logits'
# RMS: FP32 rounds z + sigma n to ~1e-7 of z, FP16 to ~1e-3.
RESOLVED = {False: 1e-3, True: 0.1}
FRESH_DRAWS = 16  # fresh draws per element that estimate fresh noise's agreement


def tiers(runs: int, batch: int) -> np.ndarray:
    """[runs, batch] distinct sigmas around SIGMA."""
    return (SIGMA + TIER_SPACING * np.arange(runs * batch)).reshape(runs, batch).astype(np.float32)


def _correlation(name: str, pairs: list[tuple[np.ndarray, np.ndarray]]) -> Check:
    """Pearson correlation of neighbouring values, per pair of slices, each judged by its z-score
    r * sqrt(n) against the two-sided normal quantile of ALPHA shared among the pairs (Bonferroni):
    independent noise fails the whole check at most once in 1 / ALPHA builds, like one KS test,
    and a correlation of 5 / sqrt(n) fails it nearly always."""
    limit = float(stats.norm.isf(ALPHA / (2 * len(pairs))))
    found = []
    for a, b in pairs:
        a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
        r = float(np.corrcoef(a, b)[0, 1])
        found.append((r, r * np.sqrt(a.size), a.size))
    worst = max(found, key=lambda item: abs(item[1]))
    passed = all(abs(z) < limit for _, z, _ in found)
    detail = f"largest |r| {abs(worst[0]):.4f} (z {worst[1]:+.2f}, n={worst[2]}; fails at |z| >= {limit:.2f})"
    return Check(name, passed, detail, {"r": [r for r, _, _ in found], "z": [z for _, z, _ in found], "z_limit": limit})


def _neighbours(noise: np.ndarray, class_axis: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(value, its neighbour) along every axis of [runs, B, ...] (rows, classes, positions), and class c
    with class c + C'/2, the two halves (cosine, sine) of one Box-Muller pair; at most MAX_PAIRS
    pairs each, drawn at random places (with replacement) where there are more."""
    rng = np.random.default_rng(0)
    steps = [(axis, 1) for axis in range(1, noise.ndim) if noise.shape[axis] > 1]
    if (noise.shape[class_axis] + 1) // 2 > 1:
        steps.append((class_axis, (noise.shape[class_axis] + 1) // 2))
    pairs = []
    for axis, offset in steps:
        size = noise.shape[axis]
        if noise.size // size * (size - offset) <= MAX_PAIRS:
            pairs.append((noise.take(range(size - offset), axis=axis), noise.take(range(offset, size), axis=axis)))
            continue
        places = [rng.integers(0, n - (offset if a == axis else 0), MAX_PAIRS) for a, n in enumerate(noise.shape)]
        first = noise[tuple(places)]
        places[axis] = places[axis] + offset
        pairs.append((first, noise[tuple(places)]))
    return pairs


def row_distances(bare: np.ndarray, class_axis: int) -> np.ndarray:
    """[B, B] RMS distances between rows of their logits pooled over every axis but the batch and the
    classes, and centred over the classes: what keyed noise tells requests apart by."""
    rows = np.moveaxis(bare.astype(np.float64), class_axis, -1)
    rows = rows.reshape(rows.shape[0], -1, rows.shape[-1]).mean(axis=1)
    rows -= rows.mean(axis=1, keepdims=True)
    return np.sqrt(np.mean((rows[:, None] - rows[None]) ** 2, axis=-1))


def distinct_tiers(bare: np.ndarray, class_axis: int, fp16: bool = False) -> tuple[np.ndarray, list]:
    """Tiers at which distinct rows lie FAR correlation widths apart, and the pairs of rows judged:
    those whose distance leaves the noise resolved at such a tier (rows closer than that are, to keyed
    noise, one request). No pair: no tiers."""
    distances = row_distances(bare, class_axis)
    width = correlation_width(bare.ndim)
    floor = RESOLVED[fp16] * float(np.sqrt(np.mean(bare.astype(np.float64) ** 2)))
    pairs = [
        (i, j) for i in range(len(bare)) for j in range(i + 1, len(bare)) if distances[i, j] / (FAR * width) >= floor
    ]
    if not pairs:
        return np.zeros(0, np.float32), []
    top = min(distances[i, j] for i, j in pairs) / (FAR * width)
    tiers = top * (1 - np.arange(DISTINCT_RUNS) / 16)
    # Each a tier of its own: the draw absorbs floor(sigma * 2**16).
    distinct = np.unique(np.floor(tiers * TIER_RESOLUTION)).size == tiers.size
    return (tiers if distinct else tiers[:1]).astype(np.float32), pairs


def inputs_independent(noise: np.ndarray, pairs: list) -> Check:
    """Distinct inputs at one tier draw independent noise: `noise` [runs, B, ...] (each run one tier for
    every row, normalised by it); Pearson's r of every pair of rows over runs, classes and positions,
    judged as `_correlation` judges neighbours (false alarms < ALPHA per build; a draw shared by two rows,
    r = 1, fails at n >= 40 values)."""
    name = "distinct inputs, one tier: independent noise"
    if not pairs:
        return Check(name, True, "not judged: no two rows of the batch lie far enough apart", {"pairs": 0})
    check = _correlation(name, [(noise[:, i], noise[:, j]) for i, j in pairs])
    check.detail += f"; {len(pairs)} pairs of rows, {noise.shape[0]} tiers"
    check.metrics["pairs"] = len(pairs)
    return check


def agreement_like_fresh(bare: np.ndarray, noisy: np.ndarray, sigmas: np.ndarray, class_axis: int) -> Check:
    """One query agrees with the clean answer (the bare top-1) as often as under fresh noise: the share
    of agreeing elements of `noisy` [runs, B, ...] (a tier per row and run, `sigmas` [runs, B]) against
    FRESH_DRAWS seeded numpy draws of fresh noise at the same tiers. The keyed trials are independent
    for a key drawn at random, however close their inputs: each has a tier of its own, and the tier
    enters the seed of every lattice vertex (and the digest), so rows that share vertices at one tier,
    even the statistics batch's identical tiled rows, draw independently here. (Trials at ONE tier
    would not be: inputs within a cell width agree together, and one key's agreement over them strays
    by far more than a binomial error, evaluation/attack_keys.py.) So the difference is normal with
    variance sum p(1 - p) (1 + 1/FRESH_DRAWS) / N^2, and it fails at p < ALPHA: a false alarm at most
    once in 1 / ALPHA builds (tests/verify/test_keyed.py holds z ~ N(0, 1) over keys on identical rows).
    Power: a shift of (z(ALPHA/2) + z(1e-6)) standard errors (stated in the
    metrics) is missed with probability < 1e-6: e.g. noise shared by every class, which never moves
    the top-1."""
    name = "one query agrees as under fresh noise"
    runs = noisy.shape[0]
    top = bare.argmax(axis=class_axis)
    agree = noisy.argmax(axis=class_axis + 1) == top[None]
    scale = sigmas.reshape(sigmas.shape + (1,) * (bare.ndim - 1)).astype(np.float64)
    rng = np.random.default_rng(0)
    fresh = np.zeros(agree.shape)
    for _ in range(FRESH_DRAWS):
        drawn = bare[None].astype(np.float64) + scale * rng.standard_normal((runs,) + bare.shape)
        fresh += drawn.argmax(axis=class_axis + 1) == top[None]
    p = fresh / FRESH_DRAWS
    n = agree.size
    observed, expected = float(agree.mean()), float(p.mean())
    se = float(np.sqrt(np.sum(p * (1 - p)) * (1 + 1 / FRESH_DRAWS)) / n)
    z = (observed - expected) / se if se > 0 else (0.0 if observed == expected else np.inf)
    limit = float(stats.norm.isf(ALPHA / 2))
    detectable = (limit + float(stats.norm.isf(1e-6))) * se
    detail = (
        f"agreement {observed:.4f}, fresh noise {expected:.4f} (z {z:+.2f}, n={n}; fails at |z| >= {limit:.2f}, "
        f"a shift of {detectable:.4f} is caught)"
    )
    metrics = {"agreement": observed, "fresh": expected, "z": float(z), "n": int(n), "detectable_shift": detectable}
    return Check(name, bool(abs(z) < limit), detail, metrics)


def keyed_plan(bare: np.ndarray, class_axis: int, reference, fp16: bool = False) -> Plan:
    """The keyed production engine's runs its checks judge: on the statistics batch (whose bare logits
    are `bare`) unless said, the `reference`'s inputs and knobs (the twin's request), each of its rows at
    a tier of its own together and alone, the statistics at a distinct tier per row and run, and at the
    tiers where distinct inputs lie far apart (`distinct_tiers`: they depend on the logits' values)."""
    shape = bare.shape
    batch, classes = shape[0], shape[class_axis]
    sigmas = tiers(runs_for(int(np.prod(shape))) or 1, batch)
    count = next(iter(reference.inputs.values())).shape[0]
    own = tiers(1, count)[0]  # a tier per row: rows of one digest would hide a draw taken from a neighbour
    return {
        "twin": [Knobs(reference.utility, reference.focus, REFERENCE)],
        "identity": [Knobs(0.0)],
        "mixed": [Knobs(np.where(np.arange(batch) % 2 == 0, 0.0, sigmas[0]).astype(np.float32))],
        "same": [Knobs(sigmas[0])] * 2,
        "together": [Knobs(own, None, REFERENCE)],
        "alone": [Knobs(own[i], None, i) for i in range(count)],
        "tier": [Knobs(sigmas[0] + 0.5)],
        "plain": [Knobs(s) for s in sigmas],
        "boost": [Knobs(s, np.full(classes, SIGMA, np.float32)) for s in sigmas],
        "suppress": [Knobs(s, np.full(classes, -SIGMA, np.float32)) for s in sigmas],
        "both": [Knobs(s, np.broadcast_to(s[:, None], (batch, classes))) for s in sigmas],
        "one tier": [Knobs(float(t)) for t in distinct_tiers(bare, class_axis, fp16)[0]],
    }


def keyed_checks(
    draws: dict[str, np.ndarray],
    bare: np.ndarray,
    class_axis: int,
    reference,
    tolerance: Tolerance,
    fp16: bool = False,
) -> list[Check]:
    """Every check of a keyed production engine from its runs of `keyed_plan` (`draws`: name -> outputs
    stacked [runs, ...]); `bare`: the bare logits of the statistics batch; `reference`: the build's
    Reference, whose `keyed_modulated` is the PyTorch twin's answer to its inputs and knobs."""
    if fp16:
        tolerance = Tolerance(tolerance.atol, max(tolerance.rtol, FP16_RTOL), "one FP16 ulp: " + tolerance.why)
    checks = [
        compare(
            "keyed production vs PyTorch twin (element-wise)", reference.keyed_modulated, draws["twin"][0], tolerance
        ),
        identical("identity at utility 0, focus 0", bare, draws["identity"][0]),
    ]
    runs = len(draws["plain"])
    sigmas = tiers(runs, bare.shape[0])  # the tiers keyed_plan ran them at
    per_row = [-1] + [1] * (bare.ndim - 1)
    checks.append(identical("mixed batch: utility 0 rows exact", bare[0::2], draws["mixed"][0][0::2]))
    bare = bare.astype(np.float32)

    # Same request, same answer.
    first, second = draws["same"]
    same = identical("same request, same answer (two runs)", first, second)
    together = draws["together"][0]
    count = together.shape[0]
    alone = np.concatenate(list(draws["alone"]))
    invariant = compare("same request alone and in a batch (same draw)", together, alone, tolerance)
    exact = int(np.sum(np.all((together == alone).reshape(count, -1), axis=1)))
    invariant.detail += f"; {exact} of {count} rows bit for bit"
    invariant.metrics["rows_bit_for_bit"] = exact
    # Another tier: the normalised noise moves everywhere. Two independent N(0, 1) values fall within
    # 1e-3 of each other with probability 5.6e-4, the same draw always: more than half must move.
    tier = draws["tier"][0]
    moved = float(
        np.mean(
            np.abs((tier - bare) / (sigmas[0] + 0.5).reshape(per_row) - (first - bare) / sigmas[0].reshape(per_row))
            > 1e-3
        )
    )
    checks += [
        same,
        invariant,
        Check(
            "another tier, another draw",
            moved > 0.5,
            f"{moved:.1%} of the noise differs by > 1e-3 at sigma + 0.5",
            {"differ": moved},
        ),
    ]

    # Distinct requests: a distinct tier per row and run.
    def outputs(name: str) -> np.ndarray:  # FP32: differences of FP16 outputs are exact in it
        return draws[name].astype(np.float32)

    scale = sigmas.reshape([runs] + per_row)
    plain = outputs("plain")
    utility = (plain - bare) / scale
    rng = np.random.default_rng(0)
    checks.append(
        _distribution(
            "utility noise ~ N(0,1), distinct requests",
            _subsample(utility, rng),
            stats.norm,
            "(z'-z)/utility vs N(0,1)",
        )
    )
    for sign, label in ((1.0, "boost"), (-1.0, "suppress")):
        # The focus does not enter the digest, so the same request with and without it differ by
        # exactly its focus noise (the sum is rounded once in FP32, which keeps the sign).
        half = (outputs(label) - plain) * sign
        one_signed = bool(np.all(half >= 0))
        check = _distribution(
            f"focus {label} noise half-normal",
            _subsample(half / SIGMA, rng),
            stats.halfnorm,
            f"{label}: |noise| vs half-normal",
        )
        check.passed = check.passed and one_signed
        check.detail += "; one-signed" if one_signed else "; WRONG SIGN seen"
        check.metrics["one_signed"] = one_signed
        checks.append(check)
    both = (outputs("both") - bare) / scale
    checks.append(
        _distribution(
            "utility and focus noises independent",
            _subsample(both, rng),
            stats.skewnorm(1.0, scale=np.sqrt(2.0)),
            "n1+|n2| vs sqrt(2)*SkewNormal(1)",
        )
    )
    checks.append(
        _correlation("no correlation between rows or neighbouring elements", _neighbours(utility, class_axis + 1))
    )
    checks.append(agreement_like_fresh(bare, plain, sigmas, class_axis))

    # Distinct inputs at one tier: each row's draw is its input's, shared with no other row.
    one_tier_sigmas, pairs = distinct_tiers(bare, class_axis, fp16)
    one_tier = [(out.astype(np.float32) - bare) / t for out, t in zip(draws["one tier"], one_tier_sigmas)]
    checks.append(inputs_independent(np.stack(one_tier) if one_tier else np.zeros((0,) + bare.shape), pairs))
    return checks
