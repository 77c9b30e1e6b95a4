"""Checks of a keyed production engine (noise "keyed", graph_passes.redistribution._KeyedNoise).

Keyed noise is a function of the key and of the request, so the engine is deterministic and two
kinds of checks replace the fresh-noise ones of verify/statistics.py:

- the same request gives the same answer: two runs bit for bit, and each row alone as inside its
  batch; and the engine agrees element-wise with the PyTorch twin of the same keyed statement
  (which random draws never could);
- distinct requests draw independent noise that passes the same tests as fresh noise: N(0, 1) by
  KS, half-normal and one-signed focus noise, n1 and n2 independent, no correlation between rows or
  between neighbouring elements. Repeating a request would only repeat its draw, so every row of
  every run here is a distinct request: a distinct tier (sigma), which the digest absorbs.
"""

from __future__ import annotations

import numpy as np

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


def keyed_plan(shape: tuple[int, ...], class_axis: int, reference) -> Plan:
    """The keyed production engine's runs its checks judge: on the statistics batch (bare logits of
    `shape`) unless said, the `reference`'s inputs and knobs (the twin's request), each of its rows at a
    tier of its own together and alone, and the statistics at a distinct tier per row and run."""
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
    return checks
