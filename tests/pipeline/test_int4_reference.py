"""The int4 reference computes with the engine's own weights dequantized on the fly (pipeline/quantized.py),
as a 7B model needs (its dequantized weights: 29 GB in FP32): the same logits as the model with every
Linear weight dequantized at once, one dequantized weight alive at a time, and the next-token logits
along the tokens those of transformers' own generate()."""

from __future__ import annotations

import copy
import weakref

import numpy as np
import pytest

from aim.graph_passes.quantize import dequantize, int8_blocks
from aim.pipeline import quantized, steps
from aim.pipeline.quantized import dequantizing, linear_weights
from tests.conftest import load


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """The tiny Llama, exported in FP32 and quantized to int4 as a build does it; the generation reference's
    prompts and greedy tokens."""
    family, task, model = load("llama")
    folder = tmp_path_factory.mktemp("int4-reference")
    exported = steps.export(family, task, model, folder / "exported.onnx")
    graph, coverage = steps.quantized_graph(folder, exported, "int4")
    extra = task.reference_extra(model, task.tokenizer(model, None))
    inputs = task.example_inputs(model, family.sizes(**family.verify_sizes))
    return family, task, model, exported, graph, coverage, extra, inputs


def materialised(model, bits: int = 4):
    """An independent reference: a copy of `model` with every Linear weight W replaced, all at once, by
    ONNX Runtime's quantization of W itself (an FP32 export holds W bit for bit), dequantized, and its
    inputs by their int8 blocks (numpy's, graph_passes.quantize.int8_blocks)."""
    import torch

    def int8_inputs(module, args):
        return (torch.from_numpy(int8_blocks(args[0].numpy())),)

    twin = copy.deepcopy(model)
    for module in twin.modules():
        if isinstance(module, torch.nn.Linear):
            values = module.weight.detach().numpy()  # [N, K]
            module.weight = torch.nn.Parameter(torch.from_numpy(dequantize(values.T, bits).T.copy()))
            module.register_forward_pre_hook(int8_inputs)
    return twin


def on_the_fly_outputs(llama):
    family, task, model, exported, graph, coverage, extra, inputs = llama
    linears = quantized.linear_weights(model, exported, graph, coverage.packed)
    with quantized.dequantizing(linears, graph.parent):
        return task.reference_logits(model, inputs).numpy(), quantized.forced_logits(model, extra), linears


def test_the_on_the_fly_reference_computes_the_materialised_one(llama):
    """Logits on the verification inputs and along the generation tokens equal, to FP32 rounding, those of
    the model with all its Linear weights dequantized at once (the same weights bit for bit; the matmul
    may round differently by the buffers' alignment: 1e-7 seen); and every Linear the graph quantized is
    found (7 per layer and the head)."""
    family, task, model, exported, graph, coverage, extra, inputs = llama
    logits, along, linears = on_the_fly_outputs(llama)
    twin = materialised(model)
    np.testing.assert_allclose(logits, task.reference_logits(twin, inputs).numpy(), rtol=1e-5, atol=1e-6)
    expected = quantized.forced_logits(twin, extra)
    for key, values in along.items():
        np.testing.assert_allclose(values, expected[key], rtol=1e-5, atol=1e-6)
    assert len(linears) == coverage.matmuls == model.config.num_hidden_layers * 7 + 1
    # and it is the quantized model, not the original (int4's own error, far from rounding)
    original = task.reference_logits(model, inputs).numpy()
    assert np.abs(logits - original).max() > 1e-3


def test_it_holds_one_dequantized_weight_at_a_time_and_leaves_the_model_as_it_was(llama, monkeypatch):
    """Every dequantized weight is released when its Linear returns (counted through weak references to
    what `unpack` made), and leaving restores the model's own parameters, untouched."""
    family, task, model, exported, graph, coverage, extra, inputs = llama
    import torch

    made, most = [], [0]
    unpack = quantized.unpack

    def counted(*args):
        weight = unpack(*args)
        alive = sum(ref() is not None for ref in made)
        most[0] = max(most[0], alive + 1)
        made.append(weakref.ref(weight))
        return weight

    monkeypatch.setattr(quantized, "unpack", counted)
    before = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    identities = {name: id(parameter) for name, parameter in model.named_parameters()}
    patched = [name for name, module in model.named_modules() if "forward" in vars(module)]
    on_the_fly_outputs(llama)
    assert len(made) == coverage.matmuls * 4  # each Linear, in each forward: the inputs' and 3 generation batches
    assert most[0] == 1
    for name, parameter in model.named_parameters():
        assert id(parameter) == identities[name] and torch.equal(parameter, before[name])
    assert [name for name, module in model.named_modules() if "forward" in vars(module)] == patched


def test_the_logits_along_the_tokens_are_those_generate_computes(llama):
    """One forward over prompt and tokens gives, position by position, the next-token logits transformers'
    generate() computes step by step through its cache (left-padded batches included)."""
    import torch

    family, task, model, exported, graph, coverage, extra, inputs = llama
    along = quantized.forced_logits(model, extra)
    index = 0
    while f"generation.{index}.tokens" in extra:
        ids, mask = extra[f"generation.{index}.input_ids"], extra[f"generation.{index}.attention_mask"]
        with torch.no_grad():
            run = model.generate(
                input_ids=torch.from_numpy(ids),
                attention_mask=torch.from_numpy(mask),
                max_new_tokens=extra[f"generation.{index}.tokens"].shape[1],
                do_sample=False,
                pad_token_id=int(extra["generation.pad_token_id"]),
                eos_token_id=[int(token) for token in extra["generation.stop_tokens"]] or None,
                output_logits=True,
                return_dict_in_generate=True,
            )
        np.testing.assert_array_equal(run.sequences[:, ids.shape[1] :].numpy(), extra[f"generation.{index}.tokens"])
        expected = torch.stack(run.logits, dim=1).numpy()
        np.testing.assert_allclose(along[f"generation.{index}.logits"], expected, rtol=1e-4, atol=1e-4)
        index += 1
    assert index == 3


def one_linear(path, weight: np.ndarray, bias: np.ndarray):
    """A graph of one nn.Linear as the dynamo exporter writes it: MatMul(x, Transpose(W)) + b, named."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes = [
        helper.make_node("Transpose", ["0.weight"], ["wt"], perm=[1, 0]),
        helper.make_node("MatMul", ["x", "wt"], ["xw"], name="matmul"),
        helper.make_node("Add", ["xw", "0.bias"], ["y"], name="add"),
    ]
    graph = helper.make_graph(
        nodes,
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", weight.shape[1]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", weight.shape[0]])],
        initializer=[numpy_helper.from_array(weight, "0.weight"), numpy_helper.from_array(bias, "0.bias")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.mark.parametrize("bits", [4, 8])
def test_a_linear_of_the_reference_computes_what_the_kernel_computes(tmp_path, bits):
    """Against ONNX Runtime's own MatMulNBits (accuracy_level 4): the reference's Linear, the engine's
    weight dequantized and its activations quantized to int8 per block of 32 as the kernel does, is
    within 1e-5 of the kernel (K = 72: a padded last block); the plain product with the dequantized
    weight is 1e-3 off, an error 32 random layers compound to 0.1 of the logits."""
    import onnxruntime as ort
    import torch

    rng = np.random.default_rng(bits)
    model = torch.nn.Sequential(torch.nn.Linear(72, 40))
    weight, bias = (tensor.detach().numpy() for tensor in (model[0].weight, model[0].bias))
    path = one_linear(tmp_path / "linear.onnx", weight, bias)
    graph, coverage = steps.quantized_graph(tmp_path, path, f"int{bits}")
    x = rng.normal(size=(16, 72)).astype(np.float32) * rng.choice([1, 8], size=(16, 72)).astype(np.float32)
    kernel = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    with dequantizing(linear_weights(model, path, graph, coverage.packed), graph.parent), torch.no_grad():
        reference = model(torch.from_numpy(x)).numpy()

    def error(values):
        return np.linalg.norm(values - kernel) / np.linalg.norm(kernel - bias)

    assert error(reference) < 1e-5
    plain = x @ dequantize(weight.T, bits) + bias
    assert error(plain) > 1e-3
    np.testing.assert_array_equal(quantized.int8_blocks(torch.from_numpy(x), 32).numpy(), int8_blocks(x))


def test_the_sensitivity_is_the_models_response_to_the_kernels_noise(llama, monkeypatch):
    """The reference's sensitivity (verify/quantized.bound): the logits' error under KERNEL_NOISE per
    MatMul. Without the kernel's int8 activations it is the model's linear response (twice the noise,
    twice the error); with them it is larger and grows less than linearly, as the int8 roundings the
    noise flips add their own error, which is how the engine's FP16 noise reaches its logits. On the
    tiny model it stays far below 0.05 / 3 (its bound stays 0.05), and the noise is gone once measured."""
    import dataclasses

    from aim.verify.quantized import KERNEL_NOISE, MAX_RELATIVE_ERROR, SENSITIVITY_FACTOR

    family, task, model, exported, graph, coverage, extra, inputs = llama
    linears = linear_weights(model, exported, graph, coverage.packed)
    float_activations = {module: dataclasses.replace(held, accuracy_level=0) for module, held in linears.items()}
    measured = {}
    for name, mapping in (("int8", linears), ("float", float_activations)):
        with dequantizing(mapping, graph.parent):
            logits = task.reference_logits(model, inputs).numpy()
            for noise in (KERNEL_NOISE, 2 * KERNEL_NOISE):
                monkeypatch.setattr(quantized, "KERNEL_NOISE", noise)
                measured[name, noise] = quantized.sensitivity(task, model, inputs, logits, list(mapping))
            np.testing.assert_array_equal(task.reference_logits(model, inputs).numpy(), logits)
    once, twice = measured["float", KERNEL_NOISE], measured["float", 2 * KERNEL_NOISE]
    assert 1.8 < twice / once < 2.2, measured
    once, twice = measured["int8", KERNEL_NOISE], measured["int8", 2 * KERNEL_NOISE]
    assert measured["float", KERNEL_NOISE] < once < twice < 2 * once, measured
    assert once < MAX_RELATIVE_ERROR / SENSITIVITY_FACTOR
