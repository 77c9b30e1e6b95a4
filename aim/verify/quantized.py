"""Judging a weight-only int4 / int8 engine (graph_passes/quantize.py): arrays in, verdicts out.

The reference multiplies by the engine's own quantized weights, dequantized (PyTorch for a model, the
user's graph on ONNX Runtime for an ONNX file: pipeline/quantized.py), so what is left between them
is the kernel's: MatMulNBits at accuracy_level 4 quantizes the activations to int8 per block and sums
in another order. Against the original model the error is what int4 does to the model, large on
random weights (30 random layers: relative error 0.31) and model-dependent; it is reported as a
figure, not judged.

Why these numbers (measured, docs/results.md; relative error: median over positions of
|e - mean e| / |r - mean r| across the classes, sigma: std of the centred error):
- engine vs dequantized PyTorch: relative error 0.0024 (max 0.009) on the trained tiny Llama, 0.015
  (max 0.018) on a 30-layer random 135M model. The bound, 0.05, is 3x the worst seen; a wrong kernel,
  a weight quantized twice or left out, or a reference that is not the engine's model is far past it
  (the original model against the dequantized one: 0.03 trained, 0.3 random).
- top-1: the engine may swap near-tied classes, so it must agree only where the reference's margin
  top1 - top2 exceeds MARGIN_SIGMAS x sigma. Across 1,152 measured positions no flip happened above
  3.8 sigma. At 6 sigma a flip has probability Phi(-6 / sqrt 2) ~ 1e-5 per position with Gaussian
  errors, but rows whose own error is larger than the pooled sigma made 1 of 100 simulated builds fail
  (tests/pipeline/test_int4_verdict.py); at 8 sigma, Phi(-8 / sqrt 2) ~ 8e-9 per position: a correct
  engine fails a build's ~1,000 positions with probability < 1e-5. The margin rule alone would be
  circular (a broken engine has a large sigma and judges nothing), hence the bound on the error itself.
- the bound grows with the model's own sensitivity (`bound`): a model that turns a small perturbation of
  each MatMul into a large logit error cannot be held to 0.05. The reference measures it
  (pipeline/quantized.py, `SENSITIVITY` in its extra): the relative logit error that Gaussian noise of
  KERNEL_NOISE x the output's RMS added to every quantized Linear's output makes. KERNEL_NOISE, 2e-3, is
  what the engine adds per MatMul (measured: the first MatMuls of a 4096-wide model are 1.8e-3 off the
  reference's, FP16 activations and the int8 roundings they flip). The bound is then
  max(MAX_RELATIVE_ERROR, SENSITIVITY_FACTOR x sensitivity). Measured on the Mistral-7B-shaped random
  model (32 layers of 4096, init std 0.02: each layer amplifies): perturbations of 1e-3 and 3e-3 per
  MatMul give 0.105 and 0.124, and the correct engine 0.108; trained and small models measure far below
  0.05 / 3, so their bound stays 0.05. What a sensitive model's check still catches: any error past
  3x what the engine's own noise makes in it (at 7B random, 0.3: a wrong or misplaced weight, scale or
  nibble, a reference that is not the engine's model, 0.98); not a kernel a few times noisier than it
  should be, which no comparison of that model's logits can tell from a correct one.
"""

from __future__ import annotations

import numpy as np

from aim.verdicts import Check, Quantization
from aim.verify.compare import rows_still_generating

MAX_RELATIVE_ERROR = 0.05
MARGIN_SIGMAS = 8.0
KERNEL_NOISE = 2e-3  # what the engine adds to each MatMul's output, relative to its RMS (see above)
SENSITIVITY_FACTOR = 3.0
SENSITIVITY = "quantized.sensitivity"  # the reference's extra: the model's error under KERNEL_NOISE per MatMul
WHY = (
    "the engine against the same model with its weights quantized and dequantized and its activations as the "
    f"kernel quantizes them (what it computes): median relative logit error <= {MAX_RELATIVE_ERROR:g} (3x the "
    f"worst measured, 0.015 on a 30-layer random model) or {SENSITIVITY_FACTOR:g}x the model's sensitivity if "
    f"larger (the error noise of {KERNEL_NOISE:g} per MatMul, the engine's own, makes in it), top-1 equal "
    f"wherever the reference's margin exceeds {MARGIN_SIGMAS:g} sigma of the error (no flip measured above 3.8 "
    "sigma; false alarms < 1e-5 per build); agreement with the original model is a figure, not a verdict"
)


def bound(spec: Quantization, sensitivity=None) -> float:
    """The largest median relative error `spec` allows a model whose reference measured `sensitivity`."""
    if sensitivity is None:
        return spec.max_relative_error
    return max(spec.max_relative_error, SENSITIVITY_FACTOR * float(sensitivity))


def quantization(bits: int) -> Quantization:
    """The check an int`bits` build is held to."""
    return Quantization(bits, MAX_RELATIVE_ERROR, MARGIN_SIGMAS, WHY)


def figures(reference: np.ndarray, actual: np.ndarray, class_axis: int) -> dict:
    """How closely `actual` follows `reference` (same shape), position by position along the classes:
    median and max relative error, sigma, top-1 agreement overall and where the margin is clear, top-5
    overlap."""
    expected = np.moveaxis(np.asarray(reference, np.float64), class_axis, -1)
    expected = expected.reshape(-1, expected.shape[-1])
    got = np.moveaxis(np.asarray(actual, np.float64), class_axis, -1).reshape(expected.shape)
    error = got - expected
    error -= error.mean(axis=1, keepdims=True)  # a shift of all classes changes no decision
    spread = np.linalg.norm(expected - expected.mean(axis=1, keepdims=True), axis=1)
    relative = np.linalg.norm(error, axis=1) / np.maximum(spread, np.finfo(np.float64).tiny)
    sigma = float(error.std())
    top2 = np.sort(expected, axis=1)[:, -2:] if expected.shape[1] > 1 else np.repeat(expected, 2, axis=1)
    margin = top2[:, 1] - top2[:, 0]
    agree = expected.argmax(axis=1) == got.argmax(axis=1)
    k = min(5, expected.shape[1])
    top_expected = np.argsort(-expected, axis=1)[:, :k]
    top_got = np.argsort(-got, axis=1)[:, :k]
    overlap = np.mean([len(set(a) & set(b)) / k for a, b in zip(top_expected.tolist(), top_got.tolist())])
    return {
        "positions": int(len(expected)),
        "relative_error": float(np.median(relative)),
        "relative_error_max": float(relative.max()),
        "sigma": sigma,
        "top1_agreement": float(agree.mean()),
        f"top{k}_overlap": float(overlap),
        "_margin": margin,
        "_agree": agree,
    }


def quantized_agreement(
    name: str,
    reference: np.ndarray,
    actual: np.ndarray,
    spec: Quantization,
    class_axis: int,
    original: np.ndarray | None = None,
    sensitivity=None,
) -> Check:
    """The engine's logits against the dequantized reference by `spec`, its bound raised for a model of
    `sensitivity` (`bound`); with `original` (the model's logits before quantization) the agreement with
    it as a figure in the detail and metrics."""
    if reference.shape != actual.shape:
        return Check(name, False, f"shapes differ: reference {list(reference.shape)}, engine {list(actual.shape)}")
    found = figures(reference, actual, class_axis)
    margin, agree = found.pop("_margin"), found.pop("_agree")
    clear = margin > spec.margin_sigmas * found["sigma"]
    flipped = int(np.sum(clear & ~agree))
    allowed = bound(spec, sensitivity)
    passed = found["relative_error"] <= allowed and flipped == 0
    metrics = {
        **found,
        "judged_positions": int(clear.sum()),
        "flipped_clear": flipped,
        "max_relative_error": allowed,
        "margin_sigmas": spec.margin_sigmas,
    }
    raised = ""
    if sensitivity is not None:
        metrics["sensitivity"] = float(sensitivity)
        if allowed > spec.max_relative_error:
            raised = f": {SENSITIVITY_FACTOR:g}x this model's sensitivity {float(sensitivity):.3g}"
    detail = (
        f"relative error {found['relative_error']:.3g} (max {found['relative_error_max']:.3g}, needs <= "
        f"{allowed:.3g}{raised}); top-1 {found['top1_agreement']:.4f}, equal at "
        f"{int(clear.sum()) - flipped}/{int(clear.sum())} positions with a margin > {spec.margin_sigmas:g} sigma"
    )
    if original is not None and original.shape == actual.shape:
        against = figures(original, actual, class_axis)
        against.pop("_margin"), against.pop("_agree")
        metrics["vs_original"] = against
        detail += (
            f"; vs the original model (a figure): top-1 {against['top1_agreement']:.4f}, relative error "
            f"{against['relative_error']:.3g}"
        )
    return Check(name, bool(passed), detail, metrics)


def quantized_generation_checks(runs: dict, extra: dict, spec: Quantization) -> list[Check]:
    """Text generation: along the reference's tokens (the original model's greedy ones, teacher forcing:
    pipeline/quantized.py), the engine's next-token logits against the reference's
    (`generation.{i}.logits` in `extra`, [B, steps, V]) by `spec`, over every step of every row until it
    stopped: the engine's greedy token is the reference's wherever the reference's choice is clear. The KV
    cache against the full recompute, likewise. Nothing for a reference without prompts (a user's ONNX)."""
    if "generation.0.tokens" not in extra:
        return []
    stop = extra["generation.stop_tokens"]
    expected, got = [], []
    index = 0
    while f"generation.{index}.tokens" in extra:
        tokens, logits = extra[f"generation.{index}.tokens"], extra[f"generation.{index}.logits"]
        for step, engine_logits in enumerate(runs[f"generation.{index}.logits"]):
            live = rows_still_generating(tokens, step, stop)
            expected.append(logits[live, step])
            got.append(engine_logits[live])
        index += 1
    greedy = quantized_agreement(
        f"greedy tokens where clear = the int{spec.bits} reference's (teacher forcing)",
        np.concatenate(expected),
        np.concatenate(got),
        spec,
        1,
        sensitivity=extra.get(SENSITIVITY),
    )
    cached, recomputed = runs["generation.cached"], runs["generation.recomputed"]
    kv = quantized_agreement(  # two FP16 paths through one sensitive model: the same allowance
        "KV cache vs full recompute (quantized)",
        recomputed.reshape(-1, cached.shape[-1]),
        cached.reshape(-1, cached.shape[-1]),
        spec,
        1,
        sensitivity=extra.get(SENSITIVITY),
    )
    return [greedy, kv]
