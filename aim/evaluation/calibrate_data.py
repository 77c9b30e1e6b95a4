"""`aim calibrate OUT/<name> --data unlabeled.npy`: the level -> sigma table of any build folder from
the user's own unlabelled inputs (`aim calibrate --onnx yours.onnx --data ...` builds the folder
first, as `aim engine --onnx` does, unless it holds a build of that very file).

As for the families (calibrate.py): G(sigma) from the clean logits (theory.py), inverted at each
level, the table embedded as utility_level (graph_passes.calibration) in modulated.calibrated.onnx and
its ONNX Runtime engine. The inputs are split by a seeded permutation: HELD_OUT of them are kept
apart, and the agreement measured through the calibrated engine on them is recorded beside the
table (labels are never needed).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aim.contract import BATCH, MODULATION_INPUTS
from aim.errors import AimError, InvalidInputError
from aim.evaluation.calibrate import (
    CHECK_LEVELS,
    LEVELS,
    calibration_table,
    measure_levels,
    record_calibration,
    targets,
    write_calibrated,
)
from aim.files import load_arrays, sha256
from aim.layout import Manifest
from aim.runtime.folder import Build
from aim.runtime.onnxruntime import OnnxRuntimeEngine

HELD_OUT = 0.2  # of the inputs, for the check
CHECK_PREDICTIONS = 2000  # predictions per level in the check (the held-out inputs run repeatedly)
MAX_REPEATS = 20


@dataclass
class Unlabelled:
    """Inputs without labels, batch first (what measure_levels reads of a split)."""

    inputs: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))

    def take(self, index) -> Unlabelled:
        return Unlabelled({name: array[index] for name, array in self.inputs.items()})


def read_data(path: str | os.PathLike, manifest: Manifest) -> Unlabelled:
    """.npy: the inputs of a one-input model; .npz: one array per model input, by name."""
    path = Path(path)
    names = [t.name for t in manifest.graph.inputs if t.name not in MODULATION_INPUTS]
    try:
        loaded = load_arrays(path)  # every header checked against the file's size first
    except (OSError, ValueError) as error:
        raise InvalidInputError(f"--data {path}: not a readable .npy or .npz file ({error})") from None
    if isinstance(loaded, np.lib.npyio.NpzFile):
        with loaded:
            arrays = dict(loaded)
    elif len(names) == 1:
        arrays = {names[0]: loaded}
    else:
        raise InvalidInputError(
            f"--data {path}: the model has inputs {names}; give an .npz with one array per input (numpy.savez)"
        )
    if sorted(arrays) != sorted(names):
        raise InvalidInputError(f"--data {path} holds {sorted(arrays)}; the model's inputs are {sorted(names)}")
    sizes = {len(array) if np.ndim(array) else 0 for array in arrays.values()}
    if len(sizes) != 1 or sizes.pop() < 2:
        raise InvalidInputError(
            f"--data {path}: every input needs the same number of samples on axis 0, at least 2 (one held out)"
        )
    return Unlabelled(arrays)


def _run(engine, data: Unlabelled, batch: int) -> np.ndarray:
    """Clean logits (utility 0) of every input, `batch` at a time."""
    return np.concatenate(
        [engine.run(data.take(slice(start, start + batch)).inputs) for start in range(0, len(data), batch)]
    )


def calibrate_build(folder, data, seed: int = 0, levels=LEVELS, log: Callable[[str], None] = print) -> dict:
    """Calibrates the build in `folder` on the unlabelled inputs in file `data`; returns the manifest entry."""
    import onnxruntime

    started = time.perf_counter()
    onnxruntime.set_seed(seed)  # before the engines' sessions exist: it seeds only sessions made after it
    build = Build.open(folder)
    manifest = build.manifest
    inputs = read_data(data, manifest)
    order = np.random.default_rng(seed).permutation(len(inputs))
    held = max(1, round(len(inputs) * HELD_OUT))
    calibration, check_set = inputs.take(np.sort(order[held:])), inputs.take(np.sort(order[:held]))
    axis, batch = manifest.modulation.class_axis, manifest.dynamic_dims[BATCH].max
    note = build.runs_on()[1]
    runner = build.runner("production")
    if note:
        log(f"note: {note}")
    with runner:
        clean = _run(runner, calibration, batch)
        clean_check = np.argmax(_run(runner, check_set, batch), axis=axis).reshape(-1)
    rows = np.moveaxis(clean, axis, -1).reshape(-1, clean.shape[axis])
    log(
        f"calibrating {manifest.model}: G(sigma) from {rows.shape[0]} unlabelled rows of {len(calibration)} "
        f"inputs of {data}, {rows.shape[1]} classes"
    )
    table = calibration_table(rows, levels)
    for level, sigma, want, got in list(
        zip(table["levels"], table["sigmas"], table["target_agreement"], table["predicted_agreement"])
    )[::10]:
        log(f"  level {level:4.2f} -> sigma {sigma:10.4f}   agreement target {want:.4f}, G {got:.4f}")
    paths = write_calibrated(manifest, table["sigmas"], log)

    repeats = int(np.clip(np.ceil(CHECK_PREDICTIONS / clean_check.size), 1, MAX_REPEATS))
    classes = rows.shape[1]
    with OnnxRuntimeEngine(paths["calibrated_engine"]) as engine:
        check = measure_levels(
            engine, check_set, batch, clean_check, CHECK_LEVELS, repeats, lambda L: targets([L], classes)[0], axis
        )
    for item in check:
        log(
            f"  check on {held} held-out inputs: level {item['level']:.2f} agreement {item['measured']:.4f} "
            f"(target {item['target']:.4f}, {item['samples']} samples)"
        )
    entry = {
        **table,
        "num_classes": classes,
        "calibration_set": {
            "file": str(Path(data).resolve()),
            "sha256": sha256(data),
            "split": f"the file's inputs but {held} held out (seeded permutation)",
            "inputs": len(calibration),
            "rows": int(rows.shape[0]),
            "seed": seed,
            "labels_used": False,
        },
        "check": {"split": f"{held} held-out inputs of the file", "inputs": held, "levels": check},
        "seconds": round(time.perf_counter() - started, 1),
    }
    return record_calibration(manifest, paths, entry)


def calibrate_onnx(
    onnx_path, data, out_dir="build", seed: int = 0, log: Callable[[str], None] = print, **build
) -> dict:
    """Builds OUT/<stem>/ from a user's ONNX (`build`: OnnxSource's arguments) unless it holds a build
    the pipeline's reuse rule keeps (that very file, those shapes and inputs), then calibrates it on `data`."""
    from aim.pipeline.builder import build_or_reuse
    from aim.pipeline.onnx_source import OnnxSource
    from aim.pipeline.request import BuildRequest

    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise AimError(f"{onnx_path}: no such ONNX file")
    built, reused = build_or_reuse(OnnxSource(onnx_path, **build), BuildRequest(out_dir, seed=seed), log)
    folder = built.folder
    if reused:
        log(f"engine reused: {folder} (built from {onnx_path})")
    return calibrate_build(folder, data, seed, log=log)
