"""`make engine PRECISION=int4|int8`: a CPU engine whose MatMul weights are ONNX Runtime's MatMulNBits,
verified against the model with the same weights dequantized (verify/quantized.py), the redistribution
FP32, utility 0 the bare quantized graph bit for bit; for a family, a model without MatMul weights
(said so, verified as FP32), and a user's ONNX."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from aim.cli import main
from aim.contract import PREFIX
from aim.errors import AimError
from aim.layout import REFERENCE, Manifest
from aim.pipeline.builder import build
from aim.pipeline.model_source import FamilySource
from aim.pipeline.request import BuildRequest
from aim.runtime.folder import Build
from aim.runtime.onnxruntime import OnnxRuntimeEngine
from aim.verify.judges import ORIGINAL
from aim.verify.reference import Reference


@pytest.fixture(scope="module")
def llama_int4(tmp_path_factory):
    lines = []
    built = build(FamilySource("llama"), BuildRequest(tmp_path_factory.mktemp("int4"), precision="int4"), lines.append)
    return built, lines


def test_llama_int4_builds_verifies_and_keeps_one_weights_file(llama_int4):
    built, lines = llama_int4
    manifest = built.manifest
    assert manifest.verification.passed and manifest.precision == "int4" and manifest.backend == "onnxruntime"
    assert manifest.verification.quantized.bits == 4 and manifest.verification.reduced_precision is None
    checks = {check.name: check for check in manifest.verification.checks}
    assert checks["identity at utility 0, focus 0"].detail == "bit for bit"
    bare = next(check for name, check in checks.items() if name.startswith("bare model vs"))
    assert "vs_original" in bare.metrics and bare.metrics["relative_error"] <= 0.05
    assert any(name.startswith("greedy tokens where clear") for name in checks)
    # one weights file, no FP32 graph or data left, no optimised model of its own
    files = {path.name for path in manifest.folder.iterdir()}
    assert "weights.int4.data" in files and not files & {"exported.onnx", "exported.onnx.data", "modulated.onnx"}
    for role in ("bare", "verification", "production"):  # graphs only: every weight is in the one file
        assert manifest.graph_path(role).stat().st_size < 1e6
    engine = onnx.load(str(manifest.engine_path()), load_external_data=False)
    assert engine == onnx.load(str(manifest.graph_path("production")), load_external_data=False)
    nbits = [node for node in engine.graph.node if node.op_type == "MatMulNBits"]
    assert len(nbits) == manifest.quantization["matmuls"] > 0
    assert not any(node.name.startswith(PREFIX) for node in nbits)
    assert not [node.op_type for node in engine.graph.node if node.op_type == "MatMul" and "proj" in node.name]
    assert any("int4: " in line and "MatMuls" in line for line in lines)


def test_a_reference_that_is_not_the_engines_model_fails_it(llama_int4):
    """The check's power: the same engine's outputs judged against the original model's logits (int4's
    own error, 0.12 on the tiny random Llama) instead of the dequantized one's fail the bare check."""
    from aim.pipeline.verify import judge_build, run_build
    from aim.tasks import get_task

    manifest = llama_int4[0].manifest
    reference = Reference.load(manifest.folder / REFERENCE)
    results = run_build(Build(manifest), reference, "onnxruntime")
    task = get_task(manifest.task)
    honest = judge_build(manifest, task, reference, results)
    assert all(check.passed for check in honest)
    reference.logits = reference.extra[ORIGINAL]
    wrong = {check.name: check.passed for check in judge_build(manifest, task, reference, results)}
    assert not wrong[next(name for name in wrong if name.startswith("bare model vs"))]


def test_quantized_precisions_are_onnx_runtime_engines():
    with pytest.raises(AimError, match="BACKEND=onnxruntime"):
        BuildRequest(precision="int4", backend="tensorrt-rtx").resolve()
    assert BuildRequest(precision="int8", backend="auto").resolve().backend == "onnxruntime"


def test_a_model_without_matmul_weights_is_said_so_and_verified_as_fp32(tmp_path):
    """ResNet: convolutions and a Gemm classifier, nothing MatMulNBits takes: a warning, not a silent
    no-op, and the FP32 element-wise tolerance, not the int4 one."""
    lines = []
    manifest = build(FamilySource("resnet"), BuildRequest(tmp_path, precision="int4"), lines.append).manifest
    assert any("warning: int4 quantized nothing" in line and "Conv, Gemm" in line for line in lines)
    assert manifest.verification.passed and manifest.verification.quantized is None
    assert manifest.quantization["matmuls"] == 0 and set(manifest.quantization["kept_bytes"]) == {"Conv", "Gemm"}
    bare = next(check for check in manifest.verification.checks if check.name.startswith("bare model vs"))
    assert bare.metrics["atol"] <= 1e-4 and "int4" not in bare.name  # element-wise, against the model itself


def mlp(path, inputs: int = 64, hidden: int = 96, classes: int = 10):
    """A user's ONNX written by hand: x [B, 64] -> MatMul -> Relu -> MatMul -> scores [B, 10]."""
    rng = np.random.default_rng(3)
    w1 = (rng.normal(size=(inputs, hidden)) / np.sqrt(inputs)).astype(np.float32)
    w2 = (rng.normal(size=(hidden, classes)) / np.sqrt(hidden) * 4).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
            helper.make_node("Relu", ["h"], ["r"], name="relu"),
            helper.make_node("MatMul", ["r", "w2"], ["scores"], name="fc2"),
        ],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", inputs])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["n", classes])],
        initializer=[numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_your_onnx_quantized_against_its_own_graph_dequantized(tmp_path, precision):
    source = mlp(tmp_path / "mlp.onnx")
    out = tmp_path / "out"
    args = ["engine", "--onnx", str(source), "--logits", "scores", "--out", str(out), "--precision", precision]
    assert main([*args, "--max-shapes", "x:16x64"]) == 0
    manifest = Manifest.load(out / "mlp")
    assert manifest.verification.passed and manifest.precision == precision
    assert manifest.quantization["matmuls"] == 2 and not manifest.quantization["kept_bytes"]
    reference = Reference.load(manifest.folder / REFERENCE)
    assert precision in reference.source and ORIGINAL in reference.extra
    x = np.random.default_rng(9).normal(size=(16, 64)).astype(np.float32)
    with OnnxRuntimeEngine(manifest.engine_path()) as engine, OnnxRuntimeEngine(source) as original:
        quantized, exact = engine.run({"x": x}, 0.0), original.run({"x": x})
    error = np.median(
        np.linalg.norm(quantized - exact, axis=1) / np.linalg.norm(exact - exact.mean(1, keepdims=True), axis=1)
    )
    assert 0 < error < (0.03 if precision == "int8" else 0.15)  # quantized (int8 activations too), and close


def test_prepacking_can_be_turned_off_and_still_computes_the_quantized_model(llama_int4):
    """session.disable_prepacking (weights stay file pages, docs/backends.md): set on the session when
    asked. MatMulNBits then takes another path (its answers differ from the prepacked ones by ~1% of
    the logits' spread), still the quantized model: within the int4 check of the dequantized reference."""
    from aim.verify.quantized import quantization, quantized_agreement

    manifest = llama_int4[0].manifest
    reference = Reference.load(manifest.folder / REFERENCE)
    with (
        OnnxRuntimeEngine(manifest.graph_path("bare")) as packed,
        OnnxRuntimeEngine(manifest.graph_path("bare"), prepacking=False) as mapped,
    ):
        assert mapped.session.get_session_options().get_session_config_entry("session.disable_prepacking") == "1"
        with pytest.raises(RuntimeError, match="does not have configuration"):  # the default: prepacked
            packed.session.get_session_options().get_session_config_entry("session.disable_prepacking")
        for engine in (packed, mapped):
            check = quantized_agreement("bare", reference.logits, engine.run(reference.inputs), quantization(4), 1)
            assert check.passed, check.detail


def half_graph(path, named: dict, extra: np.ndarray | None = None):
    """An export that keeps parameter names and FP16 weights, read as MatMul(x, Transpose(W)) (the dynamo
    exporter's nn.Linear), one after another; `extra`: one more constant [K, N] MatMul that is no Linear."""
    nodes, inits, current = [], [], "x"
    for index, (name, weight) in enumerate(named.items()):
        inits.append(numpy_helper.from_array(weight.astype(np.float16), name))
        nodes.append(helper.make_node("Transpose", [name], [f"t{index}"], perm=[1, 0]))
        nodes.append(helper.make_node("MatMul", [current, f"t{index}"], [f"h{index}"], name=f"mm{index}"))
        current = f"h{index}"
    if extra is not None:
        inits.append(numpy_helper.from_array(extra.astype(np.float16), "stray"))
        nodes.append(helper.make_node("MatMul", [current, "stray"], ["h_extra"], name="stray"))
        current = "h_extra"
    first = next(iter(named.values()))
    graph = helper.make_graph(
        nodes,
        "half",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["n", first.shape[1]])],
        [helper.make_tensor_value_info(current, TensorProto.FLOAT16, ["n", None])],
        initializer=inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


def test_the_reference_finds_the_graphs_weights_by_name_and_computes_with_the_engines_copy(tmp_path):
    """An FP16 export of a model (its weights not the PyTorch ones bit for bit): each Linear is found by
    its parameter name (a tied alias too), and computes with the dequantization of the graph's FP16
    weight, what the engine holds, while a tied embedding keeps its own values; a quantized weight that
    is no Linear's fails instead of giving a wrong reference."""
    import torch

    from aim.errors import CheckpointError
    from aim.graph_passes.quantize import dequantize, int8_blocks
    from aim.pipeline.quantized import dequantizing, linear_weights
    from aim.pipeline.steps import quantized_graph

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32, bias=False), torch.nn.Linear(32, 48, bias=False))
    embedding = torch.nn.Embedding(48, 32)
    model[1].weight = embedding.weight  # tied: the graph names it after the embedding
    model.add_module("embed", embedding)
    named = {
        "inner.0.weight": model[0].weight.detach().numpy(),
        "inner.embed.weight": embedding.weight.detach().numpy(),
    }
    path = half_graph(tmp_path / "half.onnx", named)
    graph, coverage = quantized_graph(tmp_path, path, "int4")
    linears = linear_weights(model, path, graph, coverage.packed)
    assert set(linears) == {model[0], model[1]}
    x = torch.from_numpy(np.random.default_rng(1).normal(size=(5, 64)).astype(np.float32))
    w0, w1 = (dequantize(weight.astype(np.float16).T, 4) for weight in named.values())  # [K, N]
    stored = embedding.weight.detach().clone()
    with dequantizing(linears, graph.parent), torch.no_grad():
        expected = int8_blocks(int8_blocks(x.numpy()) @ w0) @ w1  # the kernel's int8 activations
        np.testing.assert_allclose(model[1](model[0](x)).numpy(), expected, rtol=1e-5, atol=1e-5)
        assert torch.equal(embedding(torch.arange(48)), stored)  # the embedding reads its own values
    assert model[1].weight is embedding.weight and torch.equal(embedding.weight, stored)  # tied as before
    (tmp_path / "stray").mkdir()
    stray = half_graph(tmp_path / "stray" / "stray.onnx", named, extra=np.ones((48, 8), np.float32))
    graph, coverage = quantized_graph(stray.parent, stray, "int4")
    with pytest.raises(CheckpointError, match="1 of the 3 weights"):
        linear_weights(model, stray, graph, coverage.packed)


def test_an_int4_build_of_a_bf16_checkpoint_quantizes_its_fp16_export(tmp_path, monkeypatch):
    """Issue 23: a bf16 checkpoint is exported in FP16 without an FP32 copy (the dynamo path), and int4
    quantizes that export as it reads the checkpoint's tensors, never writing an FP16 copy of the weights:
    FP16 MatMulNBits, one weights file, verified against the bf16 model with the engine's weights
    dequantized, computing in FP32 arithmetic."""
    import torch

    from aim.pipeline.model_source import model_source
    from tests.conftest import load

    load("llama")[2].to(torch.bfloat16).save_pretrained(tmp_path / "checkpoint")

    def no_fp16_copy(*args):
        raise AssertionError("the FP16 weights were written out")

    monkeypatch.setattr("aim.export.attach.attach", no_fp16_copy)
    lines = []
    source = model_source(None, tmp_path / "checkpoint")
    manifest = build(source, BuildRequest(tmp_path / "out", precision="int4"), lines.append).manifest
    assert manifest.verification.passed, [c.detail for c in manifest.verification.checks if not c.passed]
    assert any("export to ONNX in float16" in line and "no float16 copy" in line for line in lines)
    assert any("read from the checkpoint in float16" in line for line in lines)  # straight into the int4 file
    assert [path.name for path in manifest.folder.glob("*.data")] == ["weights.int4.data"]
    engine = onnx.load(str(manifest.engine_path()), load_external_data=False)
    scales = {init.name: init.data_type for init in engine.graph.initializer if init.name.endswith("_scales")}
    assert scales and set(scales.values()) == {TensorProto.FLOAT16}
