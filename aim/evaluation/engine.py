"""The engine an evaluation runs, and the inputs it runs on.

`prepare_engine` trains the family's model (cached) unless a checkpoint is given, and builds its
engine into build/<model>/ with the regular pipeline unless that folder already holds an engine built
from the same checkpoint after the checkpoint was written.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from aim.layout import MANIFEST, read_manifest
from aim.runtime.onnxruntime import OnnxRuntimeEngine
from aim.evaluation import datasets
from aim.evaluation.datasets import Split
from aim.evaluation.train import TRAINING, load_tokenizer, train

# Per family: rows per engine call, and repeats per sweep point (make eval) so that every point
# has several thousand samples (standard error of an agreement rate <= 0.5 / sqrt(samples)).
SETTINGS = {
    "resnet": {"batch": 512, "repeats": 20, "images": None},
    "segformer": {"batch": 8, "repeats": 1, "images": 16},
    "llama": {"batch": 500, "repeats": 4, "images": None},
}


@dataclass
class Prepared:
    folder: Path
    engine: OnnxRuntimeEngine
    checkpoint: Path
    training: dict | None


@dataclass
class Setup:
    split: Split
    batch: int
    repeats: int
    segmentation: bool
    language: bool


def _up_to_date(folder: Path, checkpoint: Path) -> bool:
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        return False
    manifest = read_manifest(folder)
    same = manifest.get("source", {}).get("checkpoint") == str(checkpoint.resolve())
    same = same and manifest.get("backend") == "onnxruntime" and manifest.get("precision", "fp32") == "fp32"
    newer = manifest_path.stat().st_mtime >= (checkpoint / "config.json").stat().st_mtime
    return same and newer and (folder / manifest["engine"]).is_file()


def prepare_engine(
    model: str, out_dir="build", checkpoint: str | os.PathLike | None = None, seed: int = 0, log: Callable = print
) -> Prepared:
    from aim.pipeline.build import build_model

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
    manifest = read_manifest(folder)
    return Prepared(folder, OnnxRuntimeEngine(folder / manifest["engine"]), checkpoint, training)


def eval_inputs(model: str, prepared: Prepared, seed: int = 0, split: str = "test") -> Setup:
    """The labelled `split` ("test" or "calibration") of the family's data, shaped for the engine."""
    settings = SETTINGS[model]
    if model == "resnet":
        channels = prepared.engine.inputs["pixel_values"][1][1]
        data = datasets.digits(seed, channels=channels if isinstance(channels, int) else 1)[split]
    elif model == "segformer":
        data = datasets.shapes(seed, {split: settings["images"]})[split]
    elif model == "llama":
        from aim.tasks.generation import prefill_inputs

        data = datasets.corpus(load_tokenizer(prepared.checkpoint), seed)[split]
        # Each window is a prefill step of the KV-cache export: positions and an empty cache added.
        data = Split(prefill_inputs(prepared.engine, data.inputs["input_ids"], data.inputs["attention_mask"]), data.labels)
    else:
        raise ValueError(f"no evaluation data for {model!r}")
    return Setup(data, settings["batch"], settings["repeats"], model == "segformer", model == "llama")
