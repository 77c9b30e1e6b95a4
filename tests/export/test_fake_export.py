"""Issue 23: a checkpoint stored in bf16 exports to an FP16 graph without its weights in memory (the
dynamo exporter on a FakeTensor model, the safetensors attached tensor by tensor), and that graph computes
what transformers computes; the reference in FP32 arithmetic over the bf16 weights is FP32's. Issue 24:
FP32 builds of such checkpoints (past LEAN_EXPORT_BYTES) take the same exporter, in FP32 (the build
itself: tests/pipeline/test_lean_build.py)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from aim.families.from_checkpoint import checkpoint_family
from aim.layout import FILES
from aim.pipeline import model_source as source_module
from aim.pipeline import steps
from aim.pipeline.model_source import CheckpointSource
from aim.pipeline.request import BuildRequest
from aim.tasks import get_task
from aim.verify.reference import computing_in_fp32
from tests.conftest import load


def relative_error(got: np.ndarray, expected: np.ndarray) -> float:
    """|got - expected| over the spread of expected across classes (a logit shift is no error)."""
    centred = expected - expected.mean(-1, keepdims=True)
    difference = got - expected
    return float(np.linalg.norm(difference - difference.mean(-1, keepdims=True)) / np.linalg.norm(centred))


def checkpoint(folder, tied: bool):
    """A tiny Llama (its own config) or a tiny Qwen2 with tied embeddings, with weights of a trained
    model's size (std 1 rather than 0.02, so the logits spread and a wrong weight shows), saved in bf16."""
    import transformers

    if tied:
        config = transformers.Qwen2Config(
            vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=True,
        )  # fmt: skip
        model = transformers.Qwen2ForCausalLM(config)
    else:
        model = load("llama")[2]
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.normal_(0, parameter.shape[-1] ** -0.5)
    model.to(torch.bfloat16).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=[False, True], ids=["llama", "qwen2-tied"])
def exported(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("fake")
    folder = checkpoint(root / "checkpoint", request.param)
    family = checkpoint_family(folder)
    task = get_task(family.task)
    graph, attached = steps.export_reduced(family, task, folder, root / "out" / FILES["exported"])
    return folder, family, task, graph, attached


def test_the_fp16_graph_computes_what_transformers_computes(exported):
    folder, family, task, graph, _ = exported
    model = family.model_class_object().from_pretrained(folder, dtype=torch.float32)  # the bf16 values in fp32
    inputs = task.example_inputs(model, family.sizes(**family.verify_sizes))
    expected = task.reference_logits(model, inputs).numpy()
    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    assert [o.type for o in session.get_outputs()] == ["tensor(float)"] * len(session.get_outputs())  # FP32 interface
    got = session.run(None, {name: array.numpy() for name, array in inputs.items()})[0]
    # fp16 activations: relative error ~5e-4 measured (docs/real-sizes.md); bf16 arithmetic would be ~1e-2
    assert relative_error(got, expected) < 5e-3
    assert np.array_equal(got.argmax(-1), expected.argmax(-1))


def test_one_fp16_copy_of_the_weights(exported):
    folder, family, _, graph, attached = exported
    half = 2 * family.model_class_object().from_pretrained(folder).num_parameters()  # transformers: tied once
    data = graph.with_name(graph.name + ".data").stat().st_size
    assert half <= attached.bytes < half * 1.01  # each weight once, in fp16 (+ the computed rotary frequencies)
    assert attached.bytes <= data < attached.bytes + 4096 * attached.tensors  # + page alignment
    model = onnx.load(str(graph), load_external_data=False)
    large = [tensor for tensor in model.graph.initializer if np.prod(tensor.dims) >= 4096]
    assert large and all(tensor.data_type == onnx.TensorProto.FLOAT16 for tensor in large)
    inline = [tensor for tensor in model.graph.initializer if tensor.data_location != onnx.TensorProto.EXTERNAL]
    assert sum(tensor.ByteSize() for tensor in inline) < 4096  # the graph holds no weights


def test_fp32_arithmetic_over_bf16_weights_is_fp32(exported):
    folder, family, task, _, _ = exported
    fp32 = family.model_class_object().from_pretrained(folder, dtype=torch.float32)
    bf16 = family.model_class_object().from_pretrained(folder, dtype=torch.bfloat16)
    inputs = task.example_inputs(fp32, family.sizes(**family.verify_sizes))
    expected = task.reference_logits(fp32, inputs).numpy()
    with computing_in_fp32(bf16):
        got = task.reference_logits(bf16, inputs).float().numpy()
    assert relative_error(got, expected) < 1e-5
    assert all(parameter.dtype == torch.bfloat16 for parameter in bf16.parameters())  # restored after each module
    in_bf16 = {name: x.to(torch.bfloat16) if x.is_floating_point() else x for name, x in inputs.items()}
    plain = task.reference_logits(bf16, in_bf16).float().numpy()
    assert relative_error(plain, expected) > 1e-3  # what bf16 arithmetic gives instead: the check can tell


def test_an_fp32_build_of_a_supported_checkpoint_chooses_the_lean_export(exported, tmp_path, monkeypatch):
    """The export choice (model_source.fake_exported): FP16 for a bf16 checkpoint's reduced builds; FP32
    for every FP32-path build of a Llama / Qwen2 checkpoint from LEAN_EXPORT_BYTES of FP32 weights on;
    TorchScript below it (the suite's small checkpoints) and for an architecture it is not tested on."""
    import transformers

    folder = exported[0]
    values = CheckpointSource(folder).family.model_class_object().from_pretrained(folder).num_parameters()
    source = CheckpointSource(folder)

    def choice(precision: str, source=source) -> str | None:
        return source.fake_exported(BuildRequest(tmp_path, precision=precision))

    monkeypatch.setattr(source_module, "LEAN_EXPORT_BYTES", 4 * values)  # its FP32 bytes: lean
    assert [choice(p) for p in ("fp32", "fp16", "int4", "int8")] == ["float32", "float16", "float16", "float16"]
    fp32_stored = tmp_path / "fp32-stored"
    family = source.family
    family.model_class_object().from_pretrained(folder, dtype=torch.float32).save_pretrained(fp32_stored)
    stored = CheckpointSource(fp32_stored)
    assert [choice(p, stored) for p in ("fp32", "fp16", "int4", "int8")] == ["float32"] * 4
    monkeypatch.setattr(source_module, "LEAN_EXPORT_BYTES", 4 * values + 4096)  # just past it: TorchScript
    assert [choice("fp32"), choice("fp16"), choice("fp32", stored)] == [None, "float16", None]
    monkeypatch.setattr(source_module, "LEAN_EXPORT_BYTES", 0)
    config = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=1, n_head=2)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    assert choice("fp32", CheckpointSource(tmp_path / "gpt2")) is None  # not FAKE_EXPORTED


def test_tensorrt_parses_the_dynamo_graph(exported):
    """The exporter computes a ReduceMean's axes from Constants; TensorRT's parser takes them only as a
    constant (the export folds them: fake_export.folded)."""
    pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx not installed: pip install -e '.[rtx]'")
    from aim.runtime.tensorrt import parse_network

    graph = exported[3]
    network = parse_network(graph, "tensorrt-rtx")[2]
    assert network.num_outputs == len(onnx.load(str(graph), load_external_data=False).graph.output)


def test_linear_weights_are_stored_transposed(exported):
    """A Linear's weight is stored as the MatMul reads it, with no Transpose for ONNX Runtime to fold into
    a copy of it in every session; only a tied head (the embedding, which a Gather also reads) keeps one."""
    folder, family, _, graph, _ = exported
    model = onnx.load(str(graph), load_external_data=False)
    weights = {tensor.name for tensor in model.graph.initializer if len(tensor.dims) == 2}
    transposed = [
        node.input[0] for node in model.graph.node if node.op_type == "Transpose" and node.input[0] in weights
    ]
    tied = family.model_class_object().from_pretrained(folder).config.tie_word_embeddings
    gathered = {node.input[0] for node in model.graph.node if node.op_type == "Gather"}
    assert len(transposed) == tied and set(transposed) <= gathered  # the tied head: the embedding's one copy
