"""The production noise's scale, measured tightly: 4,000,000 draws of a real production graph on ONNX
Runtime (seeded before its session exists). The build's statistics run on samples sized for a build
(20,000 values: a 5% scale error); this pins the scale to +-0.5%, which a utility noise scaled by 1.01
(variance +2%) or 1.02 fails by far.

False alarms: the sample variance of n standard normal draws has standard error sqrt(2 / n), 0.071%
at n = 4e6, so +-0.5% is 7.1 standard errors: a correct graph fails with probability ~1e-12 (the
second moment of |n2|, the focus noise, has the same standard error: E n^4 - 1 = 2). Power: a scale
of 1.01 moves the variance by 2.01%, 28 standard errors."""

from __future__ import annotations

import numpy as np
import onnxruntime
import pytest

from aim.graph_passes.modulate import modulate_file
from aim.runtime.onnxruntime import OnnxRuntimeEngine
from tests.conftest import tiny_classifier

BATCH, CLASSES, FEATURES = 2000, 1000, 4  # 2e6 values per run
RUNS = 2
SIGMA = 2.0
TOLERANCE = 0.005


@pytest.fixture(scope="module")
def production(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scale")
    source = tiny_classifier(folder / "bare.onnx", features=FEATURES, classes=CLASSES)
    x = {"x": np.zeros((BATCH, FEATURES), np.float32)}  # logits = the bias: small, so z' - z keeps its bits
    bare = OnnxRuntimeEngine(source).run(x)
    return modulate_file(source, folder / "production.onnx", "scores", 1), x, bare


def draws(production, seed: int, utility: float, focus) -> np.ndarray:
    path, x, bare = production
    onnxruntime.set_seed(seed)  # before the session exists: it seeds only sessions made after it
    engine = OnnxRuntimeEngine(path)
    values = np.stack([engine.run(x, utility, focus) for _ in range(RUNS)]).astype(np.float64) - bare
    assert values.size == RUNS * BATCH * CLASSES == 4_000_000
    return values.ravel() / SIGMA


def test_utility_noise_has_unit_variance_within_half_a_percent(production):
    noise = draws(production, 21, SIGMA, None)
    variance = float(np.mean(noise**2))  # the mean is 0: its own test elsewhere; here the scale alone
    assert abs(variance - 1) < TOLERANCE, variance
    assert abs(float(noise.mean())) < 7 * np.sqrt(1 / noise.size)


def test_focus_noise_has_unit_second_moment_within_half_a_percent(production):
    half = draws(production, 22, 0.0, np.full(CLASSES, SIGMA, np.float32))
    assert half.min() >= 0
    second = float(np.mean(half**2))  # |n2|^2 = n2^2: mean 1, variance 2, as the utility noise's
    assert abs(second - 1) < TOLERANCE, second
