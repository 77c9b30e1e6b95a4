"""`make calibrate MODEL=x`: a utility level an owner can reason about, level -> sigma.

Level L in [0, 1] targets the top-1 agreement with the clean model

    A(L) = 1/C + max(L, FLOOR) * (1 - 1/C)

so level 1 keeps every answer (sigma 0, the exact model) and level 0 is within FLOOR of chance
(G only approaches 1/C as sigma grows, so exact chance needs an infinite sigma). The sigma of each
level is G^-1(A(L)), G computed from the clean logits of unlabelled calibration inputs
(evaluation.theory). The table is model-specific: sigma is in logit units.

Writes calibration.json, modulated.calibrated.onnx (utility_level instead of utility, the table
embedded by graph_passes.calibration) and engine.calibrated.onnxruntime.onnx into build/<model>/, and
records the table, the calibration set and a measured check on held-out inputs in the manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from scipy import optimize, special

from aim.evaluation import metrics, theory
from aim.evaluation.sweep import EngineData
from aim.files import atomic_path
from aim.graph_passes.calibration import add_utility_level
from aim.graph_passes.io import load_graph, save_onnx
from aim.layout import CALIBRATION_FILES, Manifest
from aim.pipeline.steps import onnxruntime_engine
from aim.runtime import onnxruntime as ort_engine

# 101 levels: linear interpolation in sigma between entries 0.01 apart keeps the agreement within
# ~0.005 of its target between them, also near level 1 where G bends most.
LEVELS = np.round(np.linspace(0.0, 1.0, 101), 4)
FLOOR = 0.01
# Levels measured through the calibrated engine on held-out inputs after calibration.
CHECK_LEVELS = (0.0, 0.25, 0.5, 0.75, 1.0)
# The held-out check's verdict: a level is off when its measured agreement, the mean over n held-out
# inputs of each input's agreement (a value in [0, 1]: a pixel or token average over the repeats), is
# too far from its target for n independent inputs of mean t. Hoeffding's (1963) bound says how far:
# P(mean >= x) <= exp(-n KL(x || t)) for any such values (likewise below), KL the Bernoulli relative
# entropy; a level is off when that bound is below FALSE_ALARM / (2 x levels). So a table that holds
# on inputs like the held-out ones is flagged with probability <= FALSE_ALARM, however few the inputs
# (no normal approximation), and the target taken as exact.
FALSE_ALARM = 0.01
# A check that flags only measured deviations beyond this is called weak, and more inputs advised.
WEAK = 0.05


def targets(levels, num_classes: int) -> np.ndarray:
    chance = 1.0 / num_classes
    return chance + np.maximum(np.asarray(levels, dtype=float), FLOOR) * (1 - chance)


def calibration_table(rows: np.ndarray, levels=LEVELS) -> dict:
    """Level -> sigma from clean logits `rows` [N, C] (unlabelled). Non-increasing in the level."""
    want = targets(levels, rows.shape[1])
    sigmas, achieved = theory.invert_agreement(rows, want)
    sigmas = np.minimum.accumulate(np.asarray(sigmas, dtype=np.float64))  # guard: non-increasing
    sigmas[np.asarray(levels) >= 1] = 0.0
    return {
        "levels": [float(x) for x in levels],
        "sigmas": [float(s) for s in sigmas],
        "target_agreement": [float(x) for x in want],
        "predicted_agreement": [float(x) for x in achieved],
        "floor": FLOOR,
        "rule": "target agreement = 1/C + max(level, floor) * (1 - 1/C); sigma = G^-1(target) on the calibration set",
    }


def _fingerprint(inputs: dict) -> str:
    digest = hashlib.sha256()
    for name in sorted(inputs):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(inputs[name]).tobytes())
    return digest.hexdigest()


def measure_levels(
    engine, split, batch: int, clean: np.ndarray, levels, repeats: int, target_fn, class_axis: int = 1
) -> list[dict]:
    """Measured agreement of a calibrated engine with `clean` predictions at each level."""

    results = []
    for level in levels:
        rates = []
        for _ in range(repeats):
            out = []
            for start in range(0, len(split), batch):
                part = {k: v[start : start + batch] for k, v in split.inputs.items()}
                out.append(engine.run(part, level=float(level)))
            rates.append(metrics.agreement(np.argmax(np.concatenate(out), axis=class_axis).reshape(-1), clean))
        agree, target = float(np.mean(rates)), float(target_fn(level))
        results.append(
            {
                "level": float(level),
                "target": target,
                "measured": agree,
                "samples": int(clean.size) * repeats,
                "inputs": len(split),
                "standard_error": float(np.sqrt(target * (1 - target) / len(split))),  # binomial, for the reader
                "tail_bound": tail_bound(agree, target, len(split)),
            }
        )
    for item in results:
        item["within_sampling_error"] = item["tail_bound"] > FALSE_ALARM / (2 * len(results))
    return results


def tail_bound(measured: float, target: float, n: int) -> float:
    """Hoeffding's bound on the probability that the mean of n independent values in [0, 1] of mean
    `target` lies at least as far from it as `measured`, on that side: exp(-n KL(measured || target))."""
    kl = special.rel_entr(measured, target) + special.rel_entr(1 - measured, 1 - target)
    return float(np.exp(-n * kl))


def detectable(target: float, n: int, levels: int) -> float:
    """The smallest measured deviation above `target` the check flags with n inputs (1 - target if none)."""
    limit = FALSE_ALARM / (2 * levels)
    if not 0 < target < 1 or tail_bound(1.0, target, n) >= limit:
        return 1.0 - target
    return float(optimize.brentq(lambda x: tail_bound(x, target, n) - limit, target, 1.0) - target)


def held_out_verdict(levels: list[dict]) -> str:
    """Whether the held-out agreements lie within their sampling error of the targets, and what to do
    when they do not, or when too few inputs make the check weak."""
    inputs = levels[0]["inputs"]
    off = [item for item in levels if not item["within_sampling_error"]]
    rule = (
        f"Hoeffding's bound for the mean of {inputs} held-out inputs: a table that holds is flagged with "
        f"probability <= {FALSE_ALARM:g}"
    )
    more = "give more inputs (--data with more inputs; the check holds out 20% of them)"
    if off:
        where = ", ".join(
            f"{item['level']:.2f} ({item['measured']:.3f} vs {item['target']:.3f}, chance <= {item['tail_bound']:.1g})"
            for item in off
        )
        return (
            f"WARNING: held-out agreement OUTSIDE its sampling error at level {where} ({rule}): the table, made "
            "from the calibration inputs, does not hold on the held-out ones. Calibrate on more inputs like those "
            f"the engine will serve: {more}."
        )
    blind = max(detectable(item["target"], inputs, len(levels)) for item in levels if item["target"] < 1)
    return f"held-out agreement within its sampling error at every level ({rule})" + (
        f"; with {inputs} inputs it flags only deviations above {blind:.2f}: for a tighter check, {more}"
        if blind > WEAK
        else ""
    )


def calibrate(
    model: str,
    out_dir: str | os.PathLike = "build",
    checkpoint: str | os.PathLike | None = None,
    levels=LEVELS,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> dict:
    """Calibrates build/<model>/ (trained and built first if needed); returns the manifest entry."""
    import onnxruntime

    from aim.evaluation.engine import eval_inputs, prepare_engine

    started = time.perf_counter()
    onnxruntime.set_seed(seed)  # before the engines' sessions exist: it seeds only sessions made after it
    prepared = prepare_engine(model, out_dir, checkpoint, seed, log)
    folder = Path(prepared.folder)
    calib = eval_inputs(prepared, seed, split="calibration")
    data = EngineData(prepared.engine, calib.split, calib.batch)
    rows = data.rows(data.clean)
    log(
        f"calibrating {model}: G(sigma) from {rows.shape[0]} unlabelled rows of the calibration split "
        f"({len(calib.split)} inputs), {rows.shape[1]} classes"
    )
    table = calibration_table(rows, levels)
    for level, sigma, want, got in list(
        zip(table["levels"], table["sigmas"], table["target_agreement"], table["predicted_agreement"])
    )[::10]:
        log(f"  level {level:4.2f} -> sigma {sigma:10.4f}   agreement target {want:.4f}, G {got:.4f}")

    manifest = Manifest.load(folder)
    paths = write_calibrated(manifest, table["sigmas"], log)

    # A check on held-out inputs: the test split, never seen by the calibration.
    test = eval_inputs(prepared, seed, split="test")
    test_data = EngineData(prepared.engine, test.split, test.batch)
    clean = test_data.predictions(test_data.clean)
    engine = ort_engine.OnnxRuntimeEngine(paths["calibrated_engine"])
    C = rows.shape[1]
    check = measure_levels(
        engine, test.split, test.batch, clean, CHECK_LEVELS, test.repeats, lambda L: targets([L], C)[0]
    )
    for item in check:
        log(
            f"  check on the test split: level {item['level']:.2f} agreement {item['measured']:.4f} (target "
            f"{item['target']:.4f}, {item['samples']} samples)"
        )

    entry = {
        **table,
        "num_classes": C,
        "calibration_set": {
            "family_data": model,
            "split": "calibration",
            "inputs": len(calib.split),
            "rows": int(rows.shape[0]),
            "seed": seed,
            "sha256": _fingerprint(calib.split.inputs),
            "labels_used": False,
        },
        "check": {"split": "test", "inputs": len(test.split), "levels": check},
        "seconds": round(time.perf_counter() - started, 1),
    }
    return record_calibration(manifest, paths, entry)


def write_calibrated(manifest: Manifest, sigmas, log: Callable[[str], None] = print) -> dict[str, Path]:
    """The build's production graph taking utility_level through the table `sigmas`, and its ONNX
    Runtime engine, in the build folder; returns the calibration files by key."""
    paths = {key: manifest.folder / name for key, name in CALIBRATION_FILES.items()}
    save_onnx(add_utility_level(load_graph(manifest.graph_path("production")), sigmas), paths["calibrated"])
    onnxruntime_engine(paths["calibrated"], paths["calibrated_engine"], manifest.precision)
    engine_data = paths["calibrated_engine"].with_name(paths["calibrated_engine"].name + ".data")
    if engine_data.is_file():  # a large model's engine keeps its weights beside it: hashed with the rest
        paths["calibrated_engine.data"] = engine_data
    log(f"  wrote {paths['calibrated'].name} and {paths['calibrated_engine'].name} (input utility_level [B] in [0, 1])")
    return paths


def record_calibration(manifest: Manifest, paths: dict[str, Path], entry: dict) -> dict:
    """calibration.json, and the table, its provenance and the files in the manifest."""
    entry = {**entry, "input": "utility_level FP32 [batch] in [0, 1]: 1 = the exact model, 0 = chance; NaN counts as 1"}
    entry["check"] = {**entry["check"], "verdict": held_out_verdict(entry["check"]["levels"])}
    with atomic_path(paths["calibration"]) as tmp:
        tmp.write_text(json.dumps(entry, indent=2) + "\n")
    manifest.calibration = {**entry, "files": {key: path.name for key, path in paths.items()}}
    for key, path in paths.items():
        manifest.record(key, path)
    manifest.save()
    return entry


def report(entry: dict) -> str:
    lines = [
        f"calibration ({entry['calibration_set']['rows']} unlabelled rows, {entry['num_classes']} classes): "
        "level -> sigma"
    ]
    for level, sigma, want in list(zip(entry["levels"], entry["sigmas"], entry["target_agreement"]))[::10]:
        lines.append(f"  {level:4.2f} -> {sigma:10.4f}  (agreement {want:.4f})")
    for item in entry["check"]["levels"]:
        lines.append(
            f"  measured on held-out inputs at level {item['level']:.2f}: {item['measured']:.4f} (target "
            f"{item['target']:.4f}, s.e. {item['standard_error']:.4f}"
            + ("" if item["within_sampling_error"] else ", OUTSIDE sampling error")
            + ")"
        )
    lines.append(entry["check"]["verdict"])
    return "\n".join(lines)
