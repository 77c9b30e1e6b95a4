"""Judging results element by element, or by what a task reads from them (top-k, class map).

Running engines is the runners' job; these functions only compare arrays they are given (as
Polygraphy's comparator separates running from judging), and each returns a `Check`.
"""

from __future__ import annotations

import numpy as np

from aim.verdicts import Agreement, Check, Tolerance


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
    """The task's reduced-precision comparator (Family.fp16): top-k set overlap per sample or pixel
    class-map agreement, with the top-k indices taken by Polygraphy's postprocessing."""
    from polygraphy.comparator import IterationResult, PostprocessFunc

    if reference.shape != actual.shape:
        return Check(name, False, f"shapes differ: reference {list(reference.shape)}, engine {list(actual.shape)}")
    k = 1 if spec.metric == "class_map" else spec.k
    top_k = PostprocessFunc.top_k(k=(k, class_axis))
    indices = [
        np.moveaxis(
            np.asarray(top_k(IterationResult({"out": np.ascontiguousarray(a)}))["out"]), class_axis, -1
        ).reshape(-1, k)
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
    detail = (
        f"{what}: {fraction:.4f} (needs >= {spec.min_fraction:g}); top-1 {top1:.4f}; "
        f"max |diff| {metrics['max_abs_diff']:.3g}"
    )
    return Check(name, fraction >= spec.min_fraction, detail, metrics)


def identical(name: str, reference: np.ndarray, actual: np.ndarray) -> Check:
    same = reference.shape == actual.shape and np.array_equal(reference, actual)
    differing = int(np.sum(reference != actual)) if reference.shape == actual.shape else -1
    return Check(name, bool(same), "bit for bit" if same else f"{differing} elements differ", {"differing": differing})


def rows_still_generating(tokens: np.ndarray, step: int, stop) -> np.ndarray:
    """The rows of `tokens` [B, steps] that have emitted no stop token before `step` (teacher forcing:
    a row's later steps are not judged once it stopped)."""
    if not step:
        return np.arange(len(tokens))
    return np.flatnonzero(~np.isin(tokens[:, :step], stop).any(axis=1))
