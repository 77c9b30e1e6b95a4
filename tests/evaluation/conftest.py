"""One briefly trained model per family, turned into an engine once per session.

Training here is short (tens of steps): the theory holds for any logits, so these tests check the
engine against it; the full-length training is `make eval`'s job. The engine is made with the
pipeline's own steps (export, deployment graphs, ONNX Runtime build) but without `make engine`'s
verification run, which tests/engines covers; test_eval_cli goes through the whole pipeline once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import onnxruntime
import pytest

from aim.contract import LOGITS
from aim.evaluation.engine import Prepared, eval_inputs
from aim.evaluation.sweep import EngineData
from aim.evaluation.task_evaluation import evaluation_of
from aim.evaluation.train import train
from aim.graph_passes.io import load_onnx, save_onnx
from aim.graph_passes.modulate import deployment_graphs
from aim.pipeline import steps
from aim.runtime.onnxruntime import OnnxRuntimeEngine, build
from tests.conftest import load

QUICK_STEPS = {"resnet": 40, "segformer": 15, "llama": 10}
# Test inputs per family (rows per engine run: images, 2 x 4096 pixels, token positions).
TEST_INPUTS = {"resnet": 360, "segformer": 2, "llama": 300}
# Llama's windows are cut to their last tokens here: the engine's cost per row falls fourfold and
# the theory does not care how long the context was.
LLAMA_CONTEXT = 8


@dataclass
class Trained:
    model: str
    prepared: Prepared
    data: EngineData  # part of the test split through the production engine
    calibration: EngineData  # part of the calibration split


def quick_engine(model: str, checkpoint: Path, folder: Path) -> Path:
    family, task, pytorch_model = load(model, checkpoint)
    steps.export(family, task, pytorch_model, folder / "exported.onnx")
    graphs = deployment_graphs(load_onnx(folder / "exported.onnx"), LOGITS, task.class_axis, task.upsample_logits_to)
    save_onnx(graphs["production"], folder / "modulated.onnx")
    return build(folder / "modulated.onnx", folder / "engine.onnxruntime.onnx")


@pytest.fixture(scope="session")
def quick_checkpoint(tmp_path_factory):
    """model -> training result of a short run (trained once per session)."""
    results = {}

    def get(model: str) -> dict:
        if model not in results:
            folder = tmp_path_factory.mktemp(f"trained-{model}")
            results[model] = train(model, folder, steps=QUICK_STEPS[model], log=lambda _: None)
        return results[model]

    return get


@pytest.fixture(scope="session", params=["resnet", "segformer", "llama"])
def trained(request, tmp_path_factory, quick_checkpoint) -> Trained:
    model = request.param
    root = tmp_path_factory.mktemp(f"eval-{model}")
    result = quick_checkpoint(model)
    checkpoint = Path(result["checkpoint"])
    onnxruntime.set_seed(0)  # before the engine's session exists: it seeds only sessions made after it
    family, _, _ = load(model, checkpoint)
    engine = OnnxRuntimeEngine(quick_engine(model, checkpoint, root))
    prepared = Prepared(root, engine, checkpoint, result, family, evaluation_of(family.task))
    parts = {}
    for split in ("test", "calibration"):
        setup = eval_inputs(prepared, split=split)
        data = setup.split.take(slice(0, TEST_INPUTS[model]))
        if model == "llama":
            data.inputs = {name: array[:, -LLAMA_CONTEXT:] for name, array in data.inputs.items()}
        parts[split] = EngineData(prepared.engine, data, setup.batch)
    return Trained(model, prepared, parts["test"], parts["calibration"])
