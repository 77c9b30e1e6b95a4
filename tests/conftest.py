"""Shared fixtures: each family is exported and modulated once per session (tiny, random weights)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from aim.contract import LOGITS
from aim.families import Family, get_family, list_families
from aim.graph_passes.io import load_onnx, save_onnx
from aim.graph_passes.modulate import deployment_graphs
from aim.pipeline import steps
from aim.tasks import Task, get_task

FAMILIES = list_families()


@dataclass
class Exported:
    """A family's tiny model (random weights, seed 0) and its graphs on disk."""

    family: Family
    task: Task
    model: object
    folder: Path

    @property
    def name(self) -> str:
        return self.family.name

    def path(self, kind: str) -> Path:
        return self.folder / f"{kind}.onnx"

    def inputs(self, seed: int = 0, **sizes: int) -> dict:
        """Example inputs (torch tensors) at the family's opt sizes, overridden by `sizes`."""
        return self.task.example_inputs(self.model, self.family.sizes(**sizes), seed)

    def reference(self, seed: int = 0):
        """What `make engine` verifies against (verify.reference.Reference), for this model."""
        from aim.pipeline.model_source import pytorch_reference

        tokenizer = self.task.tokenizer(self.model, None)
        return pytorch_reference(self.family, self.task, self.model, tokenizer, seed)

    def logits(self, inputs: dict, model=None):
        """PyTorch's logits as the deployed graph computes them (upsampled where the task asks)."""
        return self.task.reference_logits(self.model if model is None else model, inputs)


def load(name: str, checkpoint=None, seed: int = 0):
    """(family, task, model) of a family: a checkpoint folder, or random weights from its tiny config."""
    family = get_family(name)
    task = get_task(family.task)
    return family, task, steps.load(family, task, checkpoint, seed).model


@pytest.fixture(scope="session", params=FAMILIES)
def family(request, tmp_path_factory) -> Exported:
    """A family's tiny model exported, with bare (upsampled if needed), production and verification ONNX."""
    spec, task, model = load(request.param)
    folder = tmp_path_factory.mktemp(spec.name)
    exported = Exported(spec, task, model, folder)
    steps.export(spec, task, model, exported.path("exported"))
    # Standalone files, as the pass tests copy and save them elsewhere: the weights back inside the graph
    # (a build keeps them in exported.onnx.data, which its graphs share: tests/pipeline/test_lean_build.py).
    save_onnx(load_onnx(exported.path("exported"), weights=True), exported.path("exported"))
    (folder / "exported.onnx.data").unlink()
    graphs = deployment_graphs(load_onnx(exported.path("exported")), LOGITS, task.class_axis, task.upsample_logits_to)
    for kind, graph in graphs.items():
        save_onnx(graph, exported.path(kind))
    return exported


@pytest.fixture(scope="session")
def build_folder(tmp_path_factory):
    """build_folder("resnet") -> Path of a verified build folder (built on first use, shared by every
    test of the session: copy it before changing anything in it)."""
    from aim.pipeline.builder import build
    from aim.pipeline.model_source import FamilySource
    from aim.pipeline.request import BuildRequest

    root = tmp_path_factory.mktemp("builds")
    built: dict[str, Path] = {}

    def get(model: str) -> Path:
        if model not in built:
            built[model] = build(FamilySource(model), BuildRequest(root), log=lambda line: None).folder
        return built[model]

    return get


@pytest.fixture(scope="session")
def keyed_build(tmp_path_factory):
    """keyed_build("resnet") -> the manifest of a verified keyed build (`make engine NOISE=keyed`, one
    key file for every family), built on first use; keyed_build.key_file is that file."""
    from aim.pipeline.builder import build
    from aim.pipeline.model_source import FamilySource
    from aim.pipeline.request import BuildRequest

    root = tmp_path_factory.mktemp("keyed")
    built = {}

    def get(model: str):
        if model not in built:
            built[model] = build(
                FamilySource(model),
                BuildRequest(root / "build", noise="keyed", key=root / "noise.key"),
                log=lambda line: None,
            ).manifest
        return built[model]

    get.key_file = root / "noise.key"
    return get


def tiny_classifier(path: Path, features: int = 6, classes: int = 5, dtype=TensorProto.FLOAT, seed: int = 0) -> Path:
    """A classifier written by hand with onnx.helper, not by the exporter: x [B, F] -> MatMul, Add -> scores [B, C]."""
    rng = np.random.default_rng(seed)
    np_dtype = helper.tensor_dtype_to_np_dtype(dtype)
    weight = helper.make_tensor(
        "weight", dtype, [features, classes], rng.normal(size=(features, classes)).astype(np_dtype).ravel()
    )
    bias = helper.make_tensor("bias", dtype, [classes], rng.normal(size=classes).astype(np_dtype))
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "weight"], ["hidden"], name="matmul"),
            helper.make_node("Add", ["hidden", "bias"], ["scores"], name="add"),
            helper.make_node("Softmax", ["scores"], ["probabilities"], name="softmax", axis=1),
        ],
        "hand_made",
        [helper.make_tensor_value_info("x", dtype, ["batch", features])],
        [
            helper.make_tensor_value_info("scores", dtype, ["batch", classes]),
            helper.make_tensor_value_info("probabilities", dtype, ["batch", classes]),
        ],
        initializer=[weight, bias],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def link_or_copy(source, target) -> None:
    """copytree's copy_function for a fast copy of a build: hard links, but external weights copied
    (ONNX Runtime refuses a weights file with several hard links: a guard against hard-link attacks)."""
    import os
    import shutil

    (shutil.copy2 if str(source).endswith(".data") else os.link)(source, target)
