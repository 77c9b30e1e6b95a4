"""Production flavour statistics (SPEC section 5), measured here with scipy, and the checker's power:
the same checks must fail on engines whose noise is wrong."""

import numpy as np
import onnxruntime
import pytest
from scipy import stats

from aim.runtime.onnxruntime import OnnxRuntimeEngine
from aim.verify.statistics import statistical_checks
from tests.conftest import load


@pytest.fixture(scope="module")
def resnet(tmp_path_factory):
    """The ResNet family's production engine with a batch large enough for statistics."""
    from aim.graph_passes.modulate import modulate_file
    from aim.pipeline import steps

    family, task, model = load("resnet")
    folder = tmp_path_factory.mktemp("stats")
    exported = steps.export(family, task, model, folder / "exported.onnx")
    modulated = modulate_file(exported, folder / "production.onnx", "logits", 1)
    inputs = {k: v.numpy() for k, v in task.example_inputs(model, family.sizes(batch=32, height=32, width=32)).items()}
    bare = OnnxRuntimeEngine(exported).run(inputs)
    return OnnxRuntimeEngine(modulated), inputs, bare


def collect(engine, inputs, bare, utility, focus, runs=80):
    return np.stack([engine.run(inputs, utility, focus) - bare for _ in range(runs)]).ravel()


def test_utility_noise_is_standard_normal(resnet):
    onnxruntime.set_seed(11)
    engine, inputs, bare = resnet
    noise = collect(engine, inputs, bare, 3.0, None) / 3.0
    assert noise.size >= 25_000
    assert stats.kstest(noise, "norm").pvalue > 1e-3
    assert abs(noise.mean()) < 0.03 and abs(noise.std() - 1) < 0.03


def test_focus_noise_is_half_normal_and_one_signed(resnet):
    onnxruntime.set_seed(12)
    engine, inputs, bare = resnet
    boost = collect(engine, inputs, bare, 0.0, np.full(10, 2.0, np.float32)) / 2.0
    suppress = collect(engine, inputs, bare, 0.0, np.full(10, -2.0, np.float32)) / 2.0
    assert boost.min() >= 0 and suppress.max() <= 0
    assert stats.kstest(boost, "halfnorm").pvalue > 1e-3
    assert stats.kstest(-suppress, "halfnorm").pvalue > 1e-3
    # A focus on one class moves only that class.
    focus = np.zeros(10, np.float32)
    focus[3] = 5.0
    moved = engine.run(inputs, 0.0, focus) - bare
    assert np.all(moved[:, 3] > 0) and np.all(moved[:, [0, 1, 2, 4, 5, 6, 7, 8, 9]] == 0)


def test_two_runs_draw_afresh_and_noises_are_independent(resnet):
    onnxruntime.set_seed(13)
    engine, inputs, bare = resnet
    first, second = engine.run(inputs, 1.0), engine.run(inputs, 1.0)
    assert np.mean(first != second) > 0.99
    both = collect(engine, inputs, bare, 1.0, np.full(10, 1.0, np.float32))
    # n1 + |n2| with independent n1, n2 is sqrt(2) SkewNormal(1): mean sqrt(2/pi), var 2 - 2/pi.
    assert stats.kstest(both, stats.skewnorm(1.0, scale=np.sqrt(2)).cdf).pvalue > 1e-3
    assert abs(both.var() - (2 - 2 / np.pi)) < 0.05
    # Were the two draws the same (merged random nodes), half the values would be exactly 0.
    assert np.mean(both == 0) < 0.01


def test_checker_passes_a_correct_engine(resnet):
    onnxruntime.set_seed(14)
    engine, inputs, bare = resnet
    checks = statistical_checks(engine, inputs, bare, class_axis=1)
    assert [c.name for c in checks if not c.passed] == []
    assert len(checks) == 7


class FakeEngine:
    """An engine with a known defect, to show that each statistical check can fail."""

    def __init__(self, bare, defect):
        self.bare, self.defect = bare, defect
        self.rng = np.random.default_rng(0)

    def run(self, inputs, utility=0.0, focus=None):
        shape = self.bare.shape
        u = np.broadcast_to(np.asarray(utility, np.float32), shape[:1])[:, None]
        f = np.zeros(shape, np.float32) if focus is None else np.broadcast_to(np.asarray(focus, np.float32), shape)
        n1 = self.rng.normal(size=shape)
        n2 = n1 if self.defect == "merged" else self.rng.normal(size=shape)
        if self.defect == "scale":
            n1 = n1 * 1.05
        if self.defect == "stale":
            self.rng = np.random.default_rng(0)  # the same draws every run
        if self.defect == "signed":
            return (self.bare + u * n1 + f * n2).astype(np.float32)
        return (self.bare + u * n1 + f * np.abs(n2)).astype(np.float32)


@pytest.mark.parametrize(
    "defect, failing",
    [
        ("merged", {"utility and focus noises independent"}),
        ("scale", {"utility noise ~ N(0,1)"}),
        ("stale", {"fresh draws"}),
        ("signed", {"focus boost noise half-normal", "focus suppress noise half-normal", "utility and focus noises independent"}),
    ],
)
def test_checker_catches_wrong_noise(resnet, defect, failing):
    _, inputs, bare = resnet
    checks = statistical_checks(FakeEngine(bare, defect), inputs, bare, class_axis=1)
    failed = {c.name for c in checks if not c.passed}
    assert failing <= failed
    assert "identity at utility 0, focus 0" not in failed  # each defect is caught where it is
