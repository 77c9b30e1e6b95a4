"""A user's graph brought to the build folder's IO conventions (graph_passes.dims)."""

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from aim.errors import InvalidGraphError
from aim.graph_passes.dims import conventional_io
from aim.layout import GraphIO


def two_outputs(batch_dim="n", spatial=None):
    """x [batch, 4, spatial] -> probabilities (first), scores (second)."""
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["x"], ["scores"], axes=[2], keepdims=0),
            helper.make_node("Softmax", ["scores"], ["probabilities"], axis=1),
        ],
        "user",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch_dim, 4, spatial])],
        [
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [batch_dim, 4]),
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, [batch_dim, 4]),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_batch_named_unnamed_dims_named_logits_first():
    model = two_outputs(spatial=None)
    conventional = conventional_io(model, "scores")
    io = GraphIO.of_model(conventional)
    assert [(t.name, t.dims) for t in io.inputs] == [("x", ["batch", 4, "x_axis2"])]
    assert [(t.name, t.dims) for t in io.outputs] == [("scores", ["batch", 4]), ("probabilities", ["batch", 4])]
    assert GraphIO.of_model(model).inputs[0].dims == ["n", 4, None]  # the user's model is left alone
    x = np.random.default_rng(0).normal(size=(3, 4, 5)).astype(np.float32)
    run = [
        ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]) for m in (model, conventional)
    ]
    assert np.array_equal(
        run[0].run(["scores"], {"x": x})[0], run[1].run(None, {"x": x})[0]
    )  # same computation, logits first


def test_a_static_batch_is_refused():
    with pytest.raises(InvalidGraphError, match=r"'x' has dims \[1, 4, 6\]: its axis 0 must be a dynamic batch"):
        conventional_io(two_outputs(batch_dim=1, spatial=6), "scores")
    with pytest.raises(InvalidGraphError, match="no output named 'logits'"):
        conventional_io(two_outputs(spatial=6), "logits")
