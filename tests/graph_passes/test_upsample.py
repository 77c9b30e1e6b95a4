"""The logits upsampling pass (ONNX Resize) against its PyTorch twin (F.interpolate, bilinear)."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from aim.errors import InvalidGraphError
from aim.graph_passes.io import load_graph, save_onnx
from aim.graph_passes.upsample import PREFIX, upsample_logits, upsample_torch


def segmenter(path, classes=4):
    """pixel_values [B, 3, H, W] -> logits [B, C, H/4, W/4] by average pooling and a 1x1 convolution."""
    weight = helper.make_tensor(
        "w", TensorProto.FLOAT, [classes, 3, 1, 1], np.random.default_rng(0).normal(size=classes * 3)
    )
    graph = helper.make_graph(
        [
            helper.make_node("AveragePool", ["pixel_values"], ["pooled"], kernel_shape=[4, 4], strides=[4, 4]),
            helper.make_node("Conv", ["pooled", "w"], ["logits"]),
        ],
        "segmenter",
        [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["batch", 3, "height", "width"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes, "h4", "w4"])],
        initializer=[weight],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.mark.parametrize("size", [(32, 48), (36, 20), (61, 37)])
def test_resize_matches_pytorch_bilinear(tmp_path, size):
    graph = upsample_logits(load_graph(segmenter(tmp_path / "seg.onnx")), "logits", like="pixel_values")
    path = save_onnx(graph, tmp_path / "up.onnx")
    x = np.random.default_rng(1).normal(size=(2, 3, *size)).astype(np.float32)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"pixel_values": x})
    low = ort.InferenceSession(str(tmp_path / "seg.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"pixel_values": x}
    )[0]
    assert out.shape == (2, 4, *size)  # per input pixel, also when H, W are not multiples of 4
    expected = upsample_torch(torch.from_numpy(low), size).numpy()
    # Same interpolation weights; the scale is computed as out/in vs in/out: float rounding only.
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_upsample_keeps_name_and_prefixes_its_nodes(tmp_path):
    graph = upsample_logits(load_graph(segmenter(tmp_path / "seg.onnx")), "logits", like="pixel_values")
    assert [t.name for t in graph.outputs] == ["logits"]
    assert graph.outputs[0].shape == ["batch", 4, "height", "width"]
    assert all(n.name.startswith(PREFIX) for n in graph.nodes if n.op in ("Resize", "Shape", "Concat"))


def test_upsample_to_unknown_tensor(tmp_path):
    with pytest.raises(InvalidGraphError, match="no such tensor"):
        upsample_logits(load_graph(segmenter(tmp_path / "seg.onnx")), "logits", like="image")


def test_hand_computed_half_pixel_example(tmp_path):
    """2x2 logits [[0, 1], [2, 3]] to 4x4, worked out by hand. Half-pixel bilinear (align_corners=False,
    what transformers' SegFormer post-processor asks for): output pixel i samples input coordinate
    (i + 0.5) / 2 - 0.5, clamped to [0, 1], i.e. weights 0, 0.25, 0.75, 1 along each axis, so
    out[i, j] = 2 a[i] + a[j] with a = (0, 0.25, 0.75, 1). (align_corners=True would give a = (0, 1/3, 2/3, 1).)"""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["low"], ["logits"])],
        "low_resolution",
        [
            helper.make_tensor_value_info("low", TensorProto.FLOAT, [1, 1, 2, 2]),
            helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, [1, 3, 4, 4]),
        ],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 1, 2, 2])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "low.onnx"))
    path = save_onnx(
        upsample_logits(load_graph(tmp_path / "low.onnx"), "logits", like="pixel_values"), tmp_path / "up.onnx"
    )
    low = np.array([[[[0.0, 1.0], [2.0, 3.0]]]], np.float32)
    a = np.array([0.0, 0.25, 0.75, 1.0])
    expected = (2 * a[:, None] + a[None, :])[None, None]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"low": low, "pixel_values": np.zeros((1, 3, 4, 4), np.float32)})
    np.testing.assert_array_equal(out, expected)  # every value is exact in binary floating point
    np.testing.assert_array_equal(upsample_torch(torch.from_numpy(low), (4, 4)).numpy(), expected)
