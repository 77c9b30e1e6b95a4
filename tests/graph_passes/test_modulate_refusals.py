"""`aim modulate`'s refusals are real limits: the opset bound is where ONNX Runtime stops loading the
modulated graph, and an integer output is refused while a float one of the same model is not."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from aim.errors import InvalidGraphError
from aim.graph_passes import modulate
from aim.graph_passes.modulate import MAX_OPSET, modulate_file
from aim.runtime.onnxruntime import OnnxRuntimeEngine
from tests.conftest import tiny_classifier


def at_opset(source, target, opset):
    model = onnx.load(str(source))
    model.opset_import[0].version = opset
    onnx.save(model, str(target))
    return target


def test_the_opset_bound_is_where_onnx_runtime_stops_loading(tmp_path, monkeypatch):
    mine = tiny_classifier(tmp_path / "mine.onnx")
    x = np.random.default_rng(0).normal(size=(4, 6)).astype(np.float32)
    highest = modulate_file(at_opset(mine, tmp_path / "a.onnx", MAX_OPSET), tmp_path / "a.mod.onnx", logits="scores")
    assert OnnxRuntimeEngine(highest).run({"x": x}, 1.0).shape == (4, 5)  # the bound itself runs
    with pytest.raises(InvalidGraphError, match=f"opset {MAX_OPSET + 1}.*past opset {MAX_OPSET}"):
        modulate_file(at_opset(mine, tmp_path / "b.onnx", MAX_OPSET + 1), tmp_path / "b.mod.onnx", logits="scores")
    assert not (tmp_path / "b.mod.onnx").exists()
    monkeypatch.setattr(modulate, "MAX_OPSET", 99)  # without the refusal, the next opset's graph is written ...
    past = modulate_file(tmp_path / "b.onnx", tmp_path / "b.mod.onnx", logits="scores")
    with pytest.raises(InvalidGraphError, match="RandomUniformLike"):  # ... and ONNX Runtime cannot load it
        OnnxRuntimeEngine(past)
