"""Production flavour statistics (docs/method.md §5), measured here with scipy, and the checker's power:
the same checks must fail on engines whose noise is wrong.

Every test seeds ONNX Runtime and only then creates the session it draws from (a session takes its
seed when it is created), so no test depends on another's seed or on the order they run in. Each
scipy test rejects at the checker's ALPHA (1e-7) on >= 20,000 values: with the seeds fixed the
verdicts are repeatable; were the seeds changed, a correct engine would fail one of the six with
probability < 1e-6.
"""

import numpy as np
import onnxruntime
import pytest
from scipy import stats

from aim.pipeline.engine_runs import run_statistical_checks
from aim.runtime.onnxruntime import OnnxRuntimeEngine
from aim.verify.defects import DEFECTS, DefectiveEngine
from aim.verify.statistics import (
    ALPHA,
    FALSE_FAILURE_RATE,
    MIN_SAMPLES,
    STATISTICAL_CHECKS,
    SumOfNoises,
    statistical_checks,
)
from tests.conftest import load

RUNS = 80  # x 32 rows x 10 classes = 25,600 values per test


@pytest.fixture(scope="module")
def resnet(tmp_path_factory):
    """The ResNet family's production graph, inputs with a batch large enough for statistics, and the
    bare logits. Each test makes its own session (seeded first) from the graph."""
    from aim.graph_passes.modulate import modulate_file
    from aim.pipeline import steps

    family, task, model = load("resnet")
    folder = tmp_path_factory.mktemp("stats")
    exported = steps.export(family, task, model, folder / "exported.onnx")
    modulated = modulate_file(exported, folder / "production.onnx", "logits", 1)
    inputs = {k: v.numpy() for k, v in task.example_inputs(model, family.sizes(batch=32, height=32, width=32)).items()}
    bare = OnnxRuntimeEngine(exported).run(inputs)
    return modulated, inputs, bare


def seeded_engine(path, seed: int) -> OnnxRuntimeEngine:
    onnxruntime.set_seed(seed)  # before the session exists: it seeds only sessions made after it
    return OnnxRuntimeEngine(path)


def collect(engine, inputs, bare, utility, focus, runs=RUNS):
    return np.stack([engine.run(inputs, utility, focus) - bare for _ in range(runs)]).ravel()


def within(values: np.ndarray, mean: float, var: float) -> bool:
    """The sample mean within the two-sided ALPHA bound of its normal approximation."""
    return abs(values.mean() - mean) < stats.norm.isf(ALPHA / 2) * np.sqrt(var / values.size)


def test_utility_noise_is_standard_normal(resnet):
    path, inputs, bare = resnet
    noise = collect(seeded_engine(path, 11), inputs, bare, 3.0, None) / 3.0
    assert noise.size >= MIN_SAMPLES
    assert stats.kstest(noise, "norm").pvalue > ALPHA
    assert within(noise, 0.0, 1.0) and within(noise**2, 1.0, 2.0)


def test_focus_noise_is_half_normal_and_one_signed(resnet):
    path, inputs, bare = resnet
    engine = seeded_engine(path, 12)
    boost = collect(engine, inputs, bare, 0.0, np.full(10, 2.0, np.float32)) / 2.0
    suppress = collect(engine, inputs, bare, 0.0, np.full(10, -2.0, np.float32)) / 2.0
    assert boost.min() >= 0 and suppress.max() <= 0
    assert stats.kstest(boost, "halfnorm").pvalue > ALPHA
    assert stats.kstest(-suppress, "halfnorm").pvalue > ALPHA
    # A focus on one class moves only that class.
    focus = np.zeros(10, np.float32)
    focus[3] = 5.0
    moved = engine.run(inputs, 0.0, focus) - bare
    assert np.all(moved[:, 3] > 0) and np.all(moved[:, [0, 1, 2, 4, 5, 6, 7, 8, 9]] == 0)


def test_two_runs_draw_afresh_and_noises_are_independent(resnet):
    path, inputs, bare = resnet
    engine = seeded_engine(path, 13)
    first, second = engine.run(inputs, 1.0), engine.run(inputs, 1.0)
    assert np.mean(first != second) > 0.99
    both = collect(engine, inputs, bare, 1.0, np.full(10, 1.0, np.float32))
    # n1 + |n2| with independent n1, n2 is sqrt(2) SkewNormal(1): mean sqrt(2/pi), var 2 - 2/pi.
    assert stats.kstest(both, SumOfNoises(1.0).cdf).pvalue > ALPHA
    assert within(both, np.sqrt(2 / np.pi), 2 - 2 / np.pi)
    # Were the two draws the same (merged random nodes), half the values would be exactly 0.
    assert np.mean(both == 0) < 0.01


def test_sum_of_noises_is_scipys_skew_normal():
    """The CDF the checks use (Owen's T) against scipy's own skewnorm, including negative values."""
    x = np.linspace(-6, 20, 53)
    for c in (1.0, 4.0):
        expected = stats.skewnorm(c, scale=np.sqrt(1 + c * c)).cdf(x)
        np.testing.assert_allclose(SumOfNoises(c).cdf(x), expected, atol=1e-12)
        np.testing.assert_allclose(
            SumOfNoises(c).stats("mvk"), stats.skewnorm(c, scale=np.sqrt(1 + c * c)).stats("mvk")
        )


def test_checker_passes_a_correct_engine(resnet):
    path, inputs, bare = resnet
    checks = run_statistical_checks(seeded_engine(path, 14), inputs, bare, class_axis=1)
    assert [c.name for c in checks if not c.passed] == []
    assert len(checks) == 8 and set(STATISTICAL_CHECKS) <= {c.name for c in checks}
    for check in checks:
        if check.name in STATISTICAL_CHECKS:
            assert check.metrics["alpha"] == ALPHA and "fails below 1e-07" in check.detail
    assert FALSE_FAILURE_RATE == len(STATISTICAL_CHECKS) * ALPHA <= 1e-6


def test_stated_power_at_the_fewest_samples():
    """A 5% scale error of the utility noise (too wide or too narrow), at MIN_SAMPLES values: the
    variance test's z (normal approximation, scipy's quantiles) clears the Bonferroni threshold but for
    a miss rate < 1e-5."""
    n = MIN_SAMPLES
    threshold = stats.norm.isf(ALPHA / 3 / 2)  # three tests per check, two-sided
    for s in (1.05, 0.95):
        expected = (s * s - 1) / np.sqrt(2 / n)  # (sample variance - 1) in null standard errors
        spread = s * s  # its standard deviation under the defect, in the same units
        assert stats.norm.cdf((threshold - abs(expected)) / spread) < 1e-5


@pytest.mark.parametrize(
    "defect, failing",
    [
        ("merged", {"utility and focus noises independent"}),
        ("scale", {"utility noise ~ N(0,1)"}),
        ("stale", {"fresh draws"}),
        (
            "signed",
            {
                "focus boost noise half-normal",
                "focus suppress noise half-normal",
                "utility and focus noises independent",
            },
        ),
        ("shifted", {"noises uncorrelated across classes and rows"}),
        ("shifted-rows", {"noises uncorrelated across classes and rows"}),
    ],
)
def test_checker_catches_wrong_noise(resnet, defect, failing):
    _, inputs, bare = resnet
    assert defect in DEFECTS
    checks = run_statistical_checks(DefectiveEngine(bare, 1, defect), inputs, bare, class_axis=1)
    failed = {c.name for c in checks if not c.passed}
    assert failing <= failed
    assert "identity at utility 0, focus 0" not in failed  # each defect is caught where it is
    if defect.startswith("shifted"):  # only the correlation sees a shifted stream: each value alone is right
        assert failed == failing
        (check,) = [c for c in checks if c.name in failing]
        assert max(abs(n["r"]) for n in check.metrics["neighbours"]) > 0.8


def test_defect_free_stand_in_passes(resnet):
    _, inputs, bare = resnet
    assert all(
        c.passed for c in run_statistical_checks(DefectiveEngine(bare, 1, "none", seed=1), inputs, bare, class_axis=1)
    )


def test_too_few_values_fail_under_that_name_not_under_a_test_of_the_noise():
    """Issue 21: a statistical check given fewer than MIN_SAMPLES values fails as "too few noise values",
    not as the test it could not run (whose name would blame the noise); and the plan asks for enough
    runs for any output size: a one-logit batch of 16 has 8 focused values per checkerboard run."""
    from aim.verify.statistics import statistical_plan

    plan = statistical_plan((16, 1), 1)
    assert len(plan["checkerboard"]) * 8 >= MIN_SAMPLES and len(plan["utility"]) * 16 >= MIN_SAMPLES
    bare = np.zeros((16, 1), np.float32)
    engine = DefectiveEngine(bare, 1, "none", seed=3)
    draws = {name: np.stack([engine.run(None, k.utility, k.focus) for k in runs]) for name, runs in plan.items()}
    assert all(check.passed for check in statistical_checks(draws, bare, 1))  # enough: a correct engine passes
    draws["checkerboard"] = draws["checkerboard"][:100]  # 800 values
    checks = {check.name: check for check in statistical_checks(draws, bare, 1)}
    failed = [name for name, check in checks.items() if not check.passed]
    assert failed == [f"too few noise values for {name!r}" for name in STATISTICAL_CHECKS[3:]], failed
    assert "800 values (needs 20000)" in checks[failed[0]].detail
    assert "700 neighbour pairs" in checks[failed[1]].detail  # 7 focused rows with a next row, 100 runs
