"""The engine an evaluation runs, and the inputs it runs on.

`prepare_engine` trains the family's model (cached) unless a checkpoint is given, and builds its
engine into build/<model>/ with the regular pipeline unless that folder holds a build the pipeline's
one reuse rule keeps (pipeline/builder.reusable: made from the checkpoint's very files, ONNX Runtime,
FP32, fresh noise, every file as recorded).
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
from aim.runtime.base import OnFirstUse


@dataclass
class Prepared:
    folder: Path
    engine: OnFirstUse  # the build's production engine on ONNX Runtime, opened on first use
    checkpoint: Path
    training: dict | None
    family: Family
    evaluation: TaskEvaluation  # the task's data, metric and variants


@dataclass
class Setup:
    split: Split
    batch: int
    repeats: int


def prepare_engine(
    model: str, out_dir="build", checkpoint: str | os.PathLike | None = None, seed: int = 0, log: Callable = print
) -> Prepared:
    from aim.pipeline.builder import build, reusable
    from aim.pipeline.model_source import FamilySource
    from aim.pipeline.request import BuildRequest

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
    source, request = FamilySource(model, checkpoint), BuildRequest(out_dir, seed=seed)
    built = reusable(source, request)
    if built is not None:
        log(f"engine reused: {folder} (built from {checkpoint})")
    else:
        log(f"building the engine of {checkpoint} into {folder}")
        built = build(source, request, log)
    # Unbounded: the sweeps run ONNX Runtime at batches past the engine profile's (ONNX Runtime has none).
    engine = built.runner("production", "onnxruntime", bounded=False)
    return Prepared(folder, engine, checkpoint, training, family, evaluation_of(family.task))


def eval_inputs(prepared: Prepared, seed: int = 0, split: str = "test") -> Setup:
    """The labelled `split` ("test" or "calibration") of the task's data, shaped for the engine, with
    the family's rows per engine call and repeats per sweep point."""
    trained = prepared.family.trained
    data = prepared.evaluation.eval_split(prepared.engine, prepared.checkpoint, split, seed, trained.eval_inputs)
    return Setup(data, trained.eval_batch, trained.eval_repeats)
