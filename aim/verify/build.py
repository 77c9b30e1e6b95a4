"""Every check of one build: differential (engine vs reference, element-wise or by the task's
reduced-precision comparator) and statistical (the production engine's own noise)."""

from __future__ import annotations

import numpy as np

from aim.verdicts import Agreement, Check, Tolerance
from aim.verify.compare import agreement, compare
from aim.verify.keyed import keyed_checks
from aim.verify.reference import Reference, tile_batch
from aim.verify.statistics import MIN_SAMPLES, statistical_checks


def statistics_inputs(bare, inputs: dict, bare_logits: np.ndarray, max_batch: int) -> tuple[dict, np.ndarray]:
    """The statistical checks' inputs and bare logits: the reference inputs, their batch tiled (up to
    `max_batch`) until one run gives MIN_SAMPLES values where it can, so small outputs need fewer runs."""
    batch = bare_logits.shape[0]
    repeats = int(np.clip(np.ceil(MIN_SAMPLES / bare_logits.size), 1, max(1, max_batch // batch)))
    if repeats == 1:
        return inputs, bare_logits
    tiled = tile_batch(inputs, repeats)
    return tiled, bare.run(tiled)


def verify_build(
    bare,
    verification,
    engine,
    reference: Reference,
    tolerance: Tolerance,
    class_axis: int,
    max_batch: int,
    seed: int = 0,
    reduced_precision: Agreement | None = None,
    keyed: bool = False,
) -> list[Check]:
    """`bare`, `verification`, `engine`: runners of the bare model, the verification flavour and the
    production engine, used in that order; bare and verification are closed once done with (runners
    opened on first use, runtime.base.OnFirstUse, then hold one model's weights at a time).
    `max_batch`: the largest batch the engine takes; small outputs are tiled up to it for the
    statistics. `reduced_precision`: for FP16 builds, the task's comparator replaces the element-wise
    one. `keyed`: the production engine's noise is keyed (verify/keyed.py)."""

    def differential(name, expected, actual):
        if reduced_precision is not None:
            return agreement(name, expected, actual, reduced_precision, class_axis)
        return compare(name, expected, actual, tolerance)

    inputs = reference.inputs
    bare_logits = bare.run(inputs)
    stats_inputs, stats_bare = statistics_inputs(bare, inputs, bare_logits, max_batch)
    bare.close()
    modulated = verification.run(
        inputs,
        reference.utility,
        reference.focus,
        noise_utility=reference.noise_utility,
        noise_focus=reference.noise_focus,
    )
    verification.close()
    checks = [
        differential(f"bare model vs {reference.source}", reference.logits, bare_logits),
        differential(
            f"modulated (verification flavour) vs {reference.source} reference", reference.modulated, modulated
        ),
    ]
    if keyed:
        return checks + keyed_checks(
            engine, stats_inputs, stats_bare, class_axis, reference, tolerance, reduced_precision is not None
        )
    return checks + statistical_checks(engine, stats_inputs, stats_bare, class_axis, seed)
