"""Every verdict on one build, from what its engines answered (verify/results.RunResults): differential
(engine vs reference, element-wise or by the task's reduced-precision comparator) and statistical (the
production engine's own noise: verify/statistics.py, or verify/keyed.py for keyed noise). Arrays in,
verdicts out: nothing here runs an engine (pipeline/engine_runs.py does, once per build)."""

from __future__ import annotations

from aim.verdicts import Agreement, Check, Quantization, Tolerance
from aim.verify.compare import agreement, compare
from aim.verify.keyed import keyed_checks
from aim.verify.quantized import SENSITIVITY, quantized_agreement
from aim.verify.reference import Reference
from aim.verify.results import RunResults
from aim.verify.statistics import statistical_checks

ORIGINAL = "original.logits"  # int4 / int8 builds: the model's logits before quantization (a figure)


def judge(
    results: RunResults,
    reference: Reference,
    tolerance: Tolerance,
    class_axis: int,
    seed: int = 0,
    reduced_precision: Agreement | Quantization | None = None,
    keyed: bool = False,
) -> list[Check]:
    """The build's checks: its bare engine and its verification flavour against the reference (for FP16
    builds by the task's comparator `reduced_precision`, for int4 / int8 builds by the quantization
    check against the dequantized reference, else element-wise within `tolerance`), then its production
    engine's noise, fresh or `keyed` (`seed` seeds the statistics' subsampling)."""

    def differential(name, expected, actual):
        if isinstance(reduced_precision, Quantization):
            original = reference.extra.get(ORIGINAL) if expected is reference.logits else None
            sensitivity = reference.extra.get(SENSITIVITY)  # the bound of a sensitive model (verify/quantized.py)
            return quantized_agreement(name, expected, actual, reduced_precision, class_axis, original, sensitivity)
        if reduced_precision is not None:
            return agreement(name, expected, actual, reduced_precision, class_axis)
        return compare(name, expected, actual, tolerance)

    checks = [
        differential(f"bare model vs {reference.source}", reference.logits, results.bare),
        differential(
            f"modulated (verification flavour) vs {reference.source} reference",
            reference.modulated,
            results.verification,
        ),
    ]
    if keyed:
        return checks + keyed_checks(
            results.draws, results.statistics, class_axis, reference, tolerance, reduced_precision is not None
        )
    return checks + statistical_checks(results.draws, results.statistics, class_axis, seed)
