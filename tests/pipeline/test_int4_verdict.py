"""The int4 / int8 verdict (verify/quantized.py) on arrays whose error is known: a small Gaussian error
passes whatever near-ties it swaps, a flip of a clear choice fails, and an engine far from the
reference fails however few positions its large sigma leaves clear (the margin rule alone would be
circular)."""

from __future__ import annotations

import numpy as np

from aim.verify.quantized import quantization, quantized_agreement

POSITIONS, CLASSES = 300, 50


def logits(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(scale=3.0, size=(POSITIONS, CLASSES))


def with_error(reference: np.ndarray, relative: float, seed: int) -> np.ndarray:
    """The reference plus i.i.d. Gaussian error of `relative` x its spread across classes."""
    noise = np.random.default_rng(seed).normal(size=reference.shape)
    return reference + relative * reference.std(axis=1, keepdims=True) * noise


def test_a_kernel_sized_error_never_fails_in_a_hundred_trials():
    """False alarms: errors of 0.02 (the worst measured kernel error, 0.015, rounded up) over 300
    positions, 100 independent trials, every near-tie flip included: none fails (the theory: a flip
    beyond 8 sigma has probability ~8e-9 per position; at 6 sigma one of these 100 trials failed)."""
    spec = quantization(4)
    failed = [
        seed
        for seed in range(100)
        if not quantized_agreement("t", logits(seed), with_error(logits(seed), 0.02, seed + 1000), spec, 1).passed
    ]
    assert not failed


def test_a_clear_flip_fails_and_a_near_tie_swap_does_not():
    spec = quantization(4)
    reference = logits(1)
    engine = with_error(reference, 0.005, 2)
    order = np.argsort(-reference, axis=1)
    margins = reference[np.arange(POSITIONS), order[:, 0]] - reference[np.arange(POSITIONS), order[:, 1]]
    tie, clear = int(np.argmin(margins)), int(np.argmax(margins))
    swapped = engine.copy()
    swapped[tie, order[tie, 0]], swapped[tie, order[tie, 1]] = engine[tie, order[tie, 1]], engine[tie, order[tie, 0]]
    assert quantized_agreement("tie", reference, swapped, spec, 1).passed
    flipped = engine.copy()
    flipped[clear, order[clear, 0]] = reference[clear, order[clear, 1]] - 1.0  # below the runner-up
    check = quantized_agreement("clear", reference, flipped, spec, 1)
    assert not check.passed and check.metrics["flipped_clear"] == 1


def test_an_engine_far_from_its_reference_fails_even_without_a_clear_flip():
    """An error of 0.2 of the spread (a weight left FP32 or quantized twice, a wrong reference) with
    every top-1 kept: fails on the error bound."""
    spec = quantization(4)
    reference = logits(3)
    engine = with_error(reference, 0.2, 4)
    top = reference.argmax(axis=1)
    engine[np.arange(POSITIONS), top] = engine.max(axis=1) + 0.1  # no decision changed
    check = quantized_agreement("far", reference, engine, spec, 1)
    assert check.metrics["flipped_clear"] == 0 and not check.passed


def test_a_sensitive_models_bound_is_three_times_what_the_engines_noise_makes_in_it():
    """The Mistral-7B-shaped random model turns 2e-3 of noise per MatMul into 0.1 of its logits (its
    measured sensitivity): its correct engine, 0.108 off, passes on the bound 3 x 0.105; the same error
    fails a model whose sensitivity is small (the bound stays 0.05), and a defect's error, 0.9, fails
    either way."""
    spec = quantization(4)
    reference = logits(5)
    top = reference.argmax(axis=1)

    def engine(relative, seed):
        values = with_error(reference, relative, seed)
        values[np.arange(POSITIONS), top] = values.max(axis=1) + 0.1  # no decision changed: the bound decides
        return values

    correct, defect = engine(0.108, 6), engine(0.9, 7)
    check = quantized_agreement("7b", reference, correct, spec, 1, sensitivity=np.array(0.105))
    assert check.passed and abs(check.metrics["max_relative_error"] - 0.315) < 1e-9, check.detail
    assert "sensitivity 0.105" in check.detail
    assert not quantized_agreement("fixed", reference, correct, spec, 1).passed
    assert not quantized_agreement("calm", reference, correct, spec, 1, sensitivity=0.005).passed
    assert not quantized_agreement("defect", reference, defect, spec, 1, sensitivity=0.105).passed
