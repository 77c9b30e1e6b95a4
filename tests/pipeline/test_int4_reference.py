"""The int4 reference computes with the engine's own weights dequantized on the fly (pipeline/quantized.py),
as a 7B model needs (its dequantized weights: 29 GB in FP32): the same logits as the model with every
Linear weight dequantized at once, one dequantized weight alive at a time, and the next-token logits
along the tokens those of transformers' own generate()."""

from __future__ import annotations

import copy
import weakref

import numpy as np
import pytest

from aim.graph_passes.quantize import dequantize
from aim.pipeline import quantized, steps
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
    ONNX Runtime's quantization of W itself (an FP32 export holds W bit for bit), dequantized."""
    import torch

    twin = copy.deepcopy(model)
    for module in twin.modules():
        if isinstance(module, torch.nn.Linear):
            values = module.weight.detach().numpy()  # [N, K]
            module.weight = torch.nn.Parameter(torch.from_numpy(dequantize(values.T, bits).T.copy()))
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
