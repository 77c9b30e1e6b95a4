"""The built engine (production flavour, in-graph noise) behaves as the theory says, per family.

Each comparison runs the engine enough times that its tolerance is at least Z standard errors of the
measured rate; the standard error is the Monte-Carlo one given the inputs, sqrt(mean p (1 - p) / n),
with p the predicted per-row probabilities and n = rows x runs. Sample counts and standard errors
are recorded as test properties (pytest --junitxml shows them) and in assertion messages.
"""

from __future__ import annotations

import math

import numpy as np

from aim.evaluation import calibrate, metrics, sweep, theory
from aim.graph_passes.calibration import add_utility_level
from aim.graph_passes.io import load_graph, save_onnx
from aim.runtime.onnxruntime import OnnxRuntimeEngine, build

AGREEMENT_TOLERANCE = 0.01
LEVEL_TOLERANCE = 0.02
# A tolerance is at least this many standard errors: with ~25 comparisons, a correct engine would fail
# one about once in 600 seeds. Each test seeds its engine's session first, so its verdict repeats;
# that rate is what a change of seed or of the draw order risks (more runs would cost ~1.8x for 1e-7).
Z = 4.0
CHECK_LEVELS = (1.0, 0.75, 0.5, 0.25, 0.0)


def _runs(p: np.ndarray, tolerance: float) -> int:
    """Engine runs over all rows so that the standard error is <= tolerance / Z."""
    return max(1, math.ceil(np.mean(p * (1 - p)) / (tolerance / Z) ** 2 / p.size))


def _measure(data: sweep.EngineData, runs: int, target: np.ndarray, **knobs) -> float:
    hits = 0.0
    for _ in range(runs):
        predicted = data.predictions(data.run(knobs.get("utility", 0.0), knobs.get("focus")))
        hits += np.mean(predicted == target)
    return hits / runs


def test_agreement_follows_g(trained, record_property):
    data = trained.data
    data.engine.set_seed(1)  # this test's own draws, whichever tests used the engine before
    rows, clean = data.rows(data.clean), data.predictions(data.clean)
    top2 = -np.sort(-rows, axis=1)[:, :2]
    gap = float(np.median(top2[:, 0] - top2[:, 1]))
    results = []
    for sigma in (0.5 * gap, 2 * gap, 8 * gap):  # from mild to heavy noise for this model's logits
        p = theory.win_probability(rows, clean, sigma)
        runs = _runs(p, AGREEMENT_TOLERANCE)
        measured = _measure(data, runs, clean, utility=sigma)
        n, se = rows.shape[0] * runs, float(np.sqrt(np.mean(p * (1 - p)) / (rows.shape[0] * runs)))
        results.append({"sigma": sigma, "G": float(p.mean()), "measured": measured, "samples": n, "standard_error": se})
        assert AGREEMENT_TOLERANCE >= Z * se
        assert abs(measured - p.mean()) < AGREEMENT_TOLERANCE, results[-1]
    record_property("agreement_vs_G", results)
    g = [r["G"] for r in results]
    assert g[0] > g[1] > g[2] and g[0] - g[2] > 0.3, f"the sigmas must span the curve: {results}"


def test_boost_rate_follows_formula(trained, record_property):
    data = trained.data
    data.engine.set_seed(2)
    rows, clean = data.rows(data.clean), data.predictions(data.clean)
    boosted, _ = sweep.focus_classes(data)
    margin = np.delete(rows, boosted, axis=1).max(1) - rows[:, boosted]
    strength = float(np.median(margin[margin > 0]))  # about half the rows that can flip, flip
    p = theory.boost_win_probability(rows, boosted, strength)[0]
    runs = _runs(p, AGREEMENT_TOLERANCE)
    focus = np.zeros([data.num_classes], dtype=np.float32)
    focus[boosted] = strength
    measured = _measure(data, runs, np.full_like(clean, boosted), focus=focus)
    se = float(np.sqrt(np.mean(p * (1 - p)) / (rows.shape[0] * runs)))
    record_property(
        "boost",
        {
            "class": boosted,
            "strength": strength,
            "predicted": float(p.mean()),
            "measured": measured,
            "samples": rows.shape[0] * runs,
            "standard_error": se,
        },
    )
    assert 0.1 < p.mean() < 0.9
    assert AGREEMENT_TOLERANCE >= Z * se
    assert abs(measured - p.mean()) < AGREEMENT_TOLERANCE, (measured, p.mean(), se)


def test_calibrated_engine(trained, tmp_path, record_property):
    """Table from the calibration split's clean logits, embedded in the graph; measured on the same
    unlabelled inputs (the held-out check is part of `make calibrate`)."""
    data = trained.calibration
    if trained.model == "llama":  # 1,024 classes: fewer rows keep the inversion to seconds
        data = sweep.EngineData(data.engine, data.split.take(slice(0, 100)), data.batch)
    rows, levels = data.rows(data.clean), np.linspace(0, 1, 21)  # make calibrate uses 101 levels
    table = calibrate.calibration_table(rows, levels)
    assert table["sigmas"][-1] == 0.0 and np.all(np.diff(table["sigmas"]) <= 0)

    folder = trained.prepared.folder
    graph = add_utility_level(load_graph(folder / "modulated.onnx"), table["sigmas"])
    path = save_onnx(graph, tmp_path / "calibrated.onnx", weights_dir=folder)  # the build's weights copied beside
    engine = OnnxRuntimeEngine(build(path, tmp_path / "calibrated.engine.onnx"))
    engine.set_seed(3)
    assert engine.calibrated and not engine.modulated

    def run(level):
        return np.concatenate(
            [
                engine.run({k: v[s : s + data.batch] for k, v in data.split.inputs.items()}, level=level)
                for s in range(0, len(data.split), data.batch)
            ]
        )

    assert np.array_equal(run(1.0), data.clean), "level 1 must be the exact model, bit for bit"
    clean = data.predictions(data.clean)
    target = calibrate.targets(CHECK_LEVELS, rows.shape[1])
    measured, details = [], []
    for level, want in zip(CHECK_LEVELS, target):
        sigma = float(np.interp(level, levels, table["sigmas"]))
        p = theory.win_probability(rows, clean, sigma)
        runs = _runs(p, LEVEL_TOLERANCE) if level < 1 else 1
        value = float(np.mean([metrics.agreement(data.predictions(run(level)), clean) for _ in range(runs)]))
        se = float(np.sqrt(np.mean(p * (1 - p)) / (rows.shape[0] * runs)))
        measured.append(value)
        details.append(
            {
                "level": level,
                "target": float(want),
                "measured": value,
                "samples": rows.shape[0] * runs,
                "standard_error": se,
            }
        )
        assert LEVEL_TOLERANCE >= Z * se
        assert abs(value - want) < LEVEL_TOLERANCE, details[-1]
    record_property("calibrated_levels", details)
    assert np.all(np.diff(measured) < 0), f"agreement must fall with the level: {details}"
