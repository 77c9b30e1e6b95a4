"""Shared fixtures: each family is exported and modulated once per session (tiny, random weights)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

import aim.families as exporter
from aim.graph_passes.io import load_onnx, save_onnx
from aim.graph_passes.modulate import deployment_graphs

FAMILIES = exporter.list_models()


@dataclass
class Exported:
    config: exporter.ExportConfig
    model: torch.nn.Module
    folder: Path

    def path(self, kind: str) -> Path:
        return self.folder / f"{kind}.onnx"


@pytest.fixture(scope="session", params=FAMILIES)
def family(request, tmp_path_factory) -> Exported:
    """A family's tiny model exported, with bare (upsampled if needed), production and verification ONNX."""
    config = exporter.get_config(request.param)
    model = exporter.load_model(config, seed=0)
    folder = tmp_path_factory.mktemp(config.name)
    exported = Exported(config, model, folder)
    exporter.export_onnx(config, model, exported.path("exported"))
    graphs = deployment_graphs(
        load_onnx(exported.path("exported")), config.logits.name, config.class_axis, config.upsample_logits_to
    )
    for kind, graph in graphs.items():
        save_onnx(graph, exported.path(kind))
    return exported


def tiny_classifier(path: Path, features: int = 6, classes: int = 5, dtype=TensorProto.FLOAT, seed: int = 0) -> Path:
    """A classifier written by hand with onnx.helper, not by the exporter: x [B, F] -> MatMul, Add -> scores [B, C]."""
    rng = np.random.default_rng(seed)
    np_dtype = helper.tensor_dtype_to_np_dtype(dtype)
    weight = helper.make_tensor("weight", dtype, [features, classes], rng.normal(size=(features, classes)).astype(np_dtype).ravel())
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
