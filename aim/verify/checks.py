"""Verification: differential (engine vs PyTorch, element-wise) and statistical (SPEC section 5).

Random outputs cannot be compared element by element across backends, so the verification flavour
takes the noise as inputs and is compared with the PyTorch reference on the same noise; the
production flavour, which draws its own noise, is checked by its statistics and by exact identity
at utility 0 and focus 0.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
from scipy import stats

from aim.families.base import Agreement, Tolerance

# Two-sided KS tests must not reject at this level: a correct engine fails one check about once in
# a thousand runs, a wrong distribution (a shifted mean, a 5% scale error, correlated noises) fails
# every time at the sample sizes below.
KS_ALPHA = 1e-3
# Statistical checks gather at least this many noise values (repeating runs when outputs are small).
MIN_SAMPLES = 20_000
MAX_RUNS = 200
# Strength of the knobs in the statistical runs, in logit units.
SIGMA = 2.0


@dataclass
class Check:
    name: str
    passed: bool
    detail: str
    metrics: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def compare(name: str, reference: np.ndarray, actual: np.ndarray, tolerance: Tolerance) -> Check:
    """Element-wise comparison with Polygraphy's comparator: each element within atol or rtol."""
    from polygraphy.comparator import CompareFunc, IterationResult
    from polygraphy.logger import G_LOGGER

    if reference.shape != actual.shape:
        return Check(name, False, f"shapes differ: reference {list(reference.shape)}, engine {list(actual.shape)}")
    reference, actual = np.ascontiguousarray(reference), np.ascontiguousarray(actual)
    compare_func = CompareFunc.simple(atol=tolerance.atol, rtol=tolerance.rtol, check_error_stat="elemwise")
    with G_LOGGER.verbosity(G_LOGGER.CRITICAL):
        result = compare_func(
            IterationResult({"out": reference}, runner_name="pytorch"),
            IterationResult({"out": actual}, runner_name="engine"),
        )["out"]
    metrics = {
        "max_abs_diff": float(result.max_absdiff),
        "max_rel_diff": float(result.max_reldiff),
        "mean_abs_diff": float(result.mean_absdiff),
        "atol": tolerance.atol,
        "rtol": tolerance.rtol,
    }
    detail = f"max |diff| {metrics['max_abs_diff']:.3g} (atol {tolerance.atol:g}, rtol {tolerance.rtol:g})"
    return Check(name, bool(result), detail, metrics)


def agreement(name: str, reference: np.ndarray, actual: np.ndarray, spec: Agreement, class_axis: int) -> Check:
    """The task's reduced-precision comparator (ExportConfig.fp16): top-k set overlap per sample or pixel
    class-map agreement, with the top-k indices taken by Polygraphy's postprocessing."""
    from polygraphy.comparator import IterationResult, PostprocessFunc

    if reference.shape != actual.shape:
        return Check(name, False, f"shapes differ: reference {list(reference.shape)}, engine {list(actual.shape)}")
    k = 1 if spec.metric == "class_map" else spec.k
    top_k = PostprocessFunc.top_k(k=(k, class_axis))
    indices = [
        np.moveaxis(np.asarray(top_k(IterationResult({"out": np.ascontiguousarray(a)}))["out"]), class_axis, -1).reshape(-1, k)
        for a in (reference, actual)
    ]
    if spec.metric == "class_map":
        fraction = float(np.mean(indices[0][:, 0] == indices[1][:, 0]))
        what = "class-map pixels agree"
    elif spec.metric == "top_k":
        fraction = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(indices[0].tolist(), indices[1].tolist())]))
        what = f"top-{k} overlap"
    else:
        raise ValueError(f"unknown agreement metric {spec.metric!r}")
    top1 = float(np.mean(reference.argmax(class_axis) == actual.argmax(class_axis)))
    metrics = {
        "metric": spec.metric,
        "k": k,
        "agreement": fraction,
        "min_fraction": spec.min_fraction,
        "top1_agreement": top1,
        "max_abs_diff": float(np.max(np.abs(reference.astype(np.float64) - actual))),
    }
    detail = f"{what}: {fraction:.4f} (needs >= {spec.min_fraction:g}); top-1 {top1:.4f}; max |diff| {metrics['max_abs_diff']:.3g}"
    return Check(name, fraction >= spec.min_fraction, detail, metrics)


def identical(name: str, reference: np.ndarray, actual: np.ndarray) -> Check:
    same = reference.shape == actual.shape and np.array_equal(reference, actual)
    differing = int(np.sum(reference != actual)) if reference.shape == actual.shape else -1
    return Check(name, bool(same), "bit for bit" if same else f"{differing} elements differ", {"differing": differing})


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

    # n1 + |n2| for independent standard normals is sqrt(2) * SkewNormal(1); if the two random
    # nodes were merged (n2 = n1) half the values would be exactly 0 and the test would fail.
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


# ---------------------------------------------------------------------------------------------
# The reference data set of one build, and the checks over a build folder.

REFERENCE = "reference.npz"
REFERENCE_UTILITY = 2.5  # sigma of the noisy rows in the differential check
REFERENCE_FOCUS = 4.0  # strength of the boosted and the suppressed class


def pytorch_logits(config, model, inputs):
    """The PyTorch model's logits as the deployed graph produces them: resized to the input by the
    PyTorch twin of the upsample pass where the family asks for it."""
    from aim.families import reference_logits
    from aim.graph_passes.upsample import upsample_torch

    logits = reference_logits(config, model, inputs)
    if config.upsample_logits_to:
        logits = upsample_torch(logits, inputs[config.upsample_logits_to].shape[2:])
    return logits


def make_reference(config, model, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs, knobs and seeded noise, and what PyTorch computes for them: the model's logits (resized
    as the graph resizes them) and the reference redistribution on top. Saved as reference.npz, so a
    later run (another backend, another machine) verifies against the same PyTorch outputs."""
    import torch

    from aim.families import example_inputs
    from aim.graph_passes.redistribution import redistribute_torch

    inputs = example_inputs(config, model, seed=seed, **config.verify_sizes)
    logits = pytorch_logits(config, model, inputs)
    batch, classes = logits.shape[0], logits.shape[config.class_axis]
    utility = torch.zeros(batch)
    utility[1::2] = REFERENCE_UTILITY  # mixed service tiers in one batch
    focus = torch.zeros(batch, classes)
    focus[1::2, 1 % classes] = REFERENCE_FOCUS  # boost one class
    focus[1::2, 0] = -REFERENCE_FOCUS  # suppress another
    generator = torch.Generator().manual_seed(seed + 1)
    noise_utility = torch.randn(logits.shape, generator=generator)
    noise_focus = torch.randn(logits.shape, generator=generator)
    modulated = redistribute_torch(logits, utility, focus, noise_utility, noise_focus, config.class_axis)
    arrays = {f"input.{name}": tensor for name, tensor in inputs.items()}
    arrays.update(
        utility=utility, focus=focus, noise_utility=noise_utility, noise_focus=noise_focus,
        pytorch_logits=logits, pytorch_modulated=modulated,
    )
    return {name: np.ascontiguousarray(tensor.numpy()) for name, tensor in arrays.items()}


def model_inputs(reference: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {name.removeprefix("input."): array for name, array in reference.items() if name.startswith("input.")}


def tile_batch(inputs: dict[str, np.ndarray], repeats: int) -> dict[str, np.ndarray]:
    return {name: np.concatenate([array] * repeats) for name, array in inputs.items()}


def verify_build(
    bare,
    verification,
    engine,
    reference,
    tolerance: Tolerance,
    class_axis: int,
    max_batch: int,
    seed: int = 0,
    reduced_precision: Agreement | None = None,
) -> list[Check]:
    """Every check of one build. `bare`, `verification`, `engine`: runners (same interface as
    OnnxRuntimeEngine) of the bare model, the verification flavour and the production engine.
    `max_batch`: the largest batch the engine takes; small outputs are tiled up to it for statistics.
    `reduced_precision`: for FP16 builds, the task's comparator replaces the element-wise one."""

    def differential(name, expected, actual):
        if reduced_precision is not None:
            return agreement(name, expected, actual, reduced_precision, class_axis)
        return compare(name, expected, actual, tolerance)

    inputs = model_inputs(reference)
    bare_logits = bare.run(inputs)
    batch = bare_logits.shape[0]
    repeats = int(np.clip(np.ceil(MIN_SAMPLES / bare_logits.size), 1, max(1, max_batch // batch)))
    stats_inputs = tile_batch(inputs, repeats) if repeats > 1 else inputs
    stats_bare = bare.run(stats_inputs) if repeats > 1 else bare_logits
    checks = [
        differential("bare model vs PyTorch", reference["pytorch_logits"], bare_logits),
        differential(
            "modulated (verification flavour) vs PyTorch reference",
            reference["pytorch_modulated"],
            verification.run(
                inputs, reference["utility"], reference["focus"],
                noise_utility=reference["noise_utility"], noise_focus=reference["noise_focus"],
            ),
        ),
    ]
    return checks + statistical_checks(engine, stats_inputs, stats_bare, class_axis, seed)
