"""Weight-only int4 / int8 (graph_passes/quantize.py): the dequantization the references use is what
ONNX Runtime's MatMulNBits kernel multiplies by; the pass quantizes exactly the MatMuls with constant
weights (also read through Transpose), never the redistribution, and the quantized graph refers to
its own weights file alone."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from aim.contract import PREFIX
from aim.graph_passes.quantize import (
    BLOCK_SIZE,
    dequantize,
    dequantized_model,
    quantizable,
    quantize_model,
)
from aim.weights import WeightsFile, data_files, save_model

K, N, CLASSES = 72, 24, 10  # K not a multiple of the block: the last block is padded


def run(path, feed: dict) -> list[np.ndarray]:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)


@pytest.mark.parametrize("bits, dtype", [(4, np.float32), (8, np.float32), (4, np.float16)])
def test_dequantize_is_what_the_kernel_multiplies_by(tmp_path, bits, dtype):
    """Against ONNX Runtime's own MatMulNBits (the kernel the engine runs, not our code): fed the
    identity, which its int8 activation quantization keeps exact, it returns the weights it holds (an
    FP16 graph's: with FP16 scales, rounded to FP16 on the way out)."""
    weight = np.random.default_rng(bits).normal(size=(K, N)).astype(dtype)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="matmul")],
        "one",
        [helper.make_tensor_value_info("x", elem, ["m", K])],
        [helper.make_tensor_value_info("y", elem, ["m", N])],
        initializer=[numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with WeightsFile(tmp_path / "weights.int4.data") as weights:
        quantized, coverage = quantize_model(model, tmp_path, weights, bits)
    save_model(quantized, tmp_path / "quantized.onnx")
    (node,) = quantized.graph.node
    assert node.op_type == "MatMulNBits" and coverage.matmuls == 1
    held = run(tmp_path / "quantized.onnx", {"x": np.eye(K, dtype=dtype)})[0]
    expected = dequantize(weight, bits)
    if dtype == np.float16:
        np.testing.assert_allclose(held, expected, rtol=2**-10, atol=1e-6)  # one FP16 rounding
        return
    np.testing.assert_allclose(held, expected, rtol=1e-6, atol=1e-6)  # one accumulation rounding
    # and a symmetric quantization of each block of 32: its largest |w| kept, every weight within one step
    # (max|w| / 8, or / 128: ONNX Runtime maps it to the negative end of the signed range)
    blocks = np.pad(np.abs(weight), ((0, -K % BLOCK_SIZE), (0, 0))).reshape(-1, BLOCK_SIZE, N).max(axis=1)
    step = np.repeat(blocks, BLOCK_SIZE, axis=0)[:K] / (8 if bits == 4 else 128)
    assert np.all(np.abs(expected - weight) <= step * 1.0001)
    levels = len(np.unique(np.round(expected[:BLOCK_SIZE, 0] / step[0, 0], 3)))
    assert levels <= 2**bits and (bits == 8 or levels > 4)


def mixed_model() -> onnx.ModelProto:
    """x [B, K] -> MatMul(x, W1) -> MatMul(., Transpose(W2)) -> Gemm -> logits; a MatMul of two
    activations and one named as the redistribution's, with constant weights, that must stay."""
    rng = np.random.default_rng(0)
    w1 = (rng.normal(size=(K, N)) / np.sqrt(K)).astype(np.float32)
    w2 = (rng.normal(size=(N, N)) / np.sqrt(N)).astype(np.float32)  # [out, in], read as its transpose
    w3 = rng.normal(size=(N, CLASSES)).astype(np.float32)
    eye = np.eye(CLASSES, dtype=np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h1"], name="/layer1/MatMul"),
        helper.make_node("Transpose", ["w2"], ["w2t"], name="/layer2/Transpose", perm=[1, 0]),
        helper.make_node("MatMul", ["h1", "w2t"], ["h2"], name="/layer2/MatMul"),
        helper.make_node("MatMul", ["h2", "h2t"], ["gram"], name="/activations/MatMul"),
        helper.make_node("Transpose", ["h2"], ["h2t"], name="/activations/Transpose", perm=[1, 0]),
        helper.make_node("Gemm", ["h2", "w3"], ["scores"], name="/head/Gemm"),
        helper.make_node("MatMul", ["scores", "eye"], ["logits"], name=f"{PREFIX}/MatMul"),
    ]
    nodes = [nodes[i] for i in (0, 1, 2, 4, 3, 5, 6)]  # topological order
    graph = helper.make_graph(
        nodes,
        "mixed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", K])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", CLASSES]),
            helper.make_tensor_value_info("gram", TensorProto.FLOAT, ["batch", "batch"]),
        ],
        initializer=[numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (w2, "w2"), (w3, "w3"), (eye, "eye"))],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_quantizes_constant_matmuls_only_and_computes_the_dequantized_model(tmp_path):
    """Both weight layouts are quantized (the Transpose dropped with its FP32 weight), the activations'
    MatMul, the Gemm and the redistribution's MatMul are left; the engine then computes what the same
    graph with the dequantized weights computes (int8 activations aside), and not the original."""
    source = tmp_path / "source"
    source.mkdir()
    original = save_model(mixed_model(), source / "model.onnx")
    model = onnx.load(str(original))
    assert [item.node.name for item in quantizable(model)] == ["/layer1/MatMul", "/layer2/MatMul"]
    with WeightsFile(tmp_path / "weights.int4.data") as weights:
        quantized, coverage = quantize_model(onnx.load(str(original)), source, weights, 4)
    path = save_model(quantized, tmp_path / "quantized.onnx")
    ops = [node.op_type for node in quantized.graph.node]
    assert ops.count("MatMulNBits") == 2 and ops.count("MatMul") == 2 and "Gemm" in ops
    assert not any(node.name == "/layer2/Transpose" for node in quantized.graph.node)
    assert {node.op_type for node in quantized.graph.node if node.name.startswith(PREFIX)} == {"MatMul"}
    assert all(
        n.attribute and dict((a.name, a.i) for a in n.attribute)["accuracy_level"] == 4
        for n in quantized.graph.node
        if n.op_type == "MatMulNBits"
    )
    assert coverage.matmuls == 2 and coverage.quantized_bytes == (K * N + N * N) * 4
    assert coverage.kept_bytes == {"Gemm": N * CLASSES * 4, "MatMul": CLASSES * CLASSES * 4}

    x = np.random.default_rng(1).normal(size=(64, K)).astype(np.float32)
    engine = run(path, {"x": x})[0]
    dequantized = save_model(dequantized_model(model, source, 4), tmp_path / "deq" / "model.onnx")
    reference = run(dequantized, {"x": x})[0]
    fp32 = run(original, {"x": x})[0]
    scale = np.linalg.norm(reference - reference.mean(1, keepdims=True), axis=1)
    near = np.median(np.linalg.norm(engine - reference, axis=1) / scale)
    far = np.median(np.linalg.norm(fp32 - reference, axis=1) / scale)
    assert near < 0.02 < far, (near, far)  # the engine is the quantized model, which is not the original


def test_external_weights_end_up_in_one_file_of_their_own(tmp_path):
    """A model whose weights are in a data file: the quantized graph refers to its own file alone (the
    kept weights copied in), so it runs with the source's data file gone."""
    source = tmp_path / "source"
    source.mkdir()
    model = mixed_model()
    onnx.save(
        model, str(source / "model.onnx"), save_as_external_data=True, location="model.onnx.data", size_threshold=0
    )
    x = np.random.default_rng(1).normal(size=(3, K)).astype(np.float32)
    (tmp_path / "build").mkdir()
    with WeightsFile(tmp_path / "build" / "weights.int4.data") as weights:
        quantized, _ = quantize_model(
            onnx.load(str(source / "model.onnx"), load_external_data=False), source, weights, 8
        )
    path = save_model(quantized, tmp_path / "build" / "quantized.onnx")
    assert data_files(onnx.load(str(path), load_external_data=False)) == ["weights.int4.data"]
    expected = run(source / "model.onnx", {"x": x})[0]
    (source / "model.onnx.data").unlink()
    got = run(path, {"x": x})[0]
    np.testing.assert_allclose(got, expected, rtol=0.05, atol=0.05 * np.abs(expected).max())
