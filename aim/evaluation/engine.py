"""The engine an evaluation runs, and the inputs it runs on.

`prepare_engine` trains the family's model (cached) unless a checkpoint is given, and builds its
engine into build/<model>/ with the regular pipeline unless that folder already holds an engine built
from the same checkpoint after the checkpoint was written.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from aim.evaluation.datasets import Split
from aim.evaluation.task_evaluation import TaskEvaluation, evaluation_of
from aim.evaluation.train import TRAINING, train
from aim.families import Family, get_family
from aim.files import check_writable
from aim.layout import Manifest, ManifestError
from aim.runtime.folder import open_build
from aim.runtime.onnxruntime import OnnxRuntimeEngine


@dataclass
class Prepared:
    folder: Path
    engine: OnnxRuntimeEngine
    checkpoint: Path
    training: dict | None
    family: Family
    evaluation: TaskEvaluation  # the task's data, metric and variants


@dataclass
class Setup:
    split: Split
    batch: int
    repeats: int


def _up_to_date(folder: Path, checkpoint: Path) -> bool:
    try:
        manifest = Manifest.load(folder)
    except ManifestError:
        return False
    same = manifest.source.checkpoint == str(checkpoint.resolve())
    same = same and manifest.backend == "onnxruntime" and manifest.precision == "fp32"
    newer = manifest.file.stat().st_mtime >= (checkpoint / "config.json").stat().st_mtime
    return same and newer and manifest.engine_path().is_file()


def prepare_engine(
    model: str, out_dir="build", checkpoint: str | os.PathLike | None = None, seed: int = 0, log: Callable = print
) -> Prepared:
    from aim.pipeline.build import build_model

    family = get_family(model)
    check_writable(out_dir)  # before training and building
    training = None
    if checkpoint is None:
        training = train(model, seed=seed, log=log)
        checkpoint = training["checkpoint"]
    checkpoint = Path(checkpoint)
    if training is None and (checkpoint / TRAINING).is_file():
        training = json.loads((checkpoint / TRAINING).read_text())
    folder = Path(out_dir) / model
    if _up_to_date(folder, checkpoint):
        log(f"engine reused: {folder} (built from {checkpoint})")
    else:
        log(f"building the engine of {checkpoint} into {folder}")
        build_model(model, out_dir, checkpoint, backend="onnxruntime", seed=seed, log=log)
    manifest = open_build(folder)  # every file checked against its hash
    # No profile: the sweeps run ONNX Runtime at batches past the TensorRT profile's (ONNX Runtime has none).
    return Prepared(
        folder, OnnxRuntimeEngine(manifest.engine_path()), checkpoint, training, family, evaluation_of(family.task)
    )


def eval_inputs(prepared: Prepared, seed: int = 0, split: str = "test") -> Setup:
    """The labelled `split` ("test" or "calibration") of the task's data, shaped for the engine, with
    the family's rows per engine call and repeats per sweep point."""
    trained = prepared.family.trained
    data = prepared.evaluation.eval_split(prepared.engine, prepared.checkpoint, split, seed, trained.eval_inputs)
    return Setup(data, trained.eval_batch, trained.eval_repeats)
