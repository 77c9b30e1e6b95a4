"""The reference of an int4 / int8 build: the model with the weights the engine holds, dequantized.

The engine multiplies by ONNX Runtime's quantization of each MatMul weight (graph_passes/quantize.py).
Its verdict (verify/quantized.py) compares it with the same model computing with exactly those
weights, dequantized to FP32 by the same C++ routine, so that it judges the kernels, not what int4
does to the model; the model's logits before quantization are kept beside it (`original.logits`) for
the agreement figure.

- A PyTorch model: each `nn.Linear` whose weight W the exported graph multiplies by (as W.T, found by
  value: graph_passes.quantize.digest, or by parameter name) gets the dequantization of the graph's
  copy of W as a new parameter, so a tied embedding keeps its own values, as the engine's Gather
  does. A quantized weight that is no `nn.Linear`'s fails the build here: a reference that does not
  compute the engine's model would fail it later with a misleading error. A model kept in bf16 / fp16
  (an FP16 export of such a checkpoint) gets the dequantized weights in its own dtype, and computes
  in FP32 arithmetic (verify/reference.computing_in_fp32) for the logits, in its dtype for generation.
- A user's ONNX: the same graph with its quantizable weights replaced by their dequantization, on
  ONNX Runtime in FP32.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from aim.errors import CheckpointError
from aim.graph_passes.io import load_onnx, save_onnx
from aim.graph_passes.quantize import BITS, dequantize, dequantized_model, digest, iter_weights
from aim.verify.judges import ORIGINAL
from aim.verify.reference import Reference


def dequantize_linears(model, exported: Path, bits: int) -> int:
    """Gives every `nn.Linear` of `model` whose weight the graph `exported` quantizes the dequantization
    of the weight the graph holds (a new parameter); returns how many. A Linear's weight W is found in
    the graph by value (W.T, an FP32 export) or else by name (an export that keeps parameter names, its
    weights in another dtype: W's name or a tied alias's). Fails if a quantized weight is no Linear's."""
    import torch

    items = {}  # digest or initializer name -> (the quantizable's key, its weight [K, N] as the graph holds it)
    for item, values in iter_weights(load_onnx(exported), exported.parent):
        key = item.initializer.name
        items[digest(values)] = items[key] = (key, values)
    aliases = {}  # a parameter -> every name it has (tied weights have several)
    for name, parameter in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(parameter), []).append(name)
    wanted, found = {key for key, _ in items.values()}, set()
    for module in model.modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        hit = items.get(digest(module.weight.detach().float().numpy().T)) or next(
            (
                items[initializer]
                for name in aliases.get(id(module.weight), [])
                for initializer in items
                if initializer.endswith(name) and initializer in wanted
            ),
            None,
        )
        if hit is None:
            continue
        key, values = hit
        dequantized = torch.from_numpy(np.ascontiguousarray(dequantize(values, bits).T)).to(module.weight.dtype)
        module.weight = torch.nn.Parameter(dequantized, requires_grad=False)  # unties a shared embedding
        found.add(key)
    if wanted - found:
        raise CheckpointError(
            f"{len(wanted - found)} of the {len(wanted)} weights int{bits} quantizes in the exported graph are no "
            "nn.Linear weight of the model, so the PyTorch reference cannot compute what the engine computes; "
            "build it with PRECISION=fp32 or fp16"
        )
    return len(found)


def quantized_reference(model, inputs_of, reference_of_model, exported: Path, precision: str) -> Reference:
    """The reference of an int`bits` build of a PyTorch model: `reference_of_model(model)` (the build's
    PyTorch reference, model_source.pytorch_reference) after the model's Linear weights are replaced by
    the engine's, with the original model's logits on the same inputs (`inputs_of(model)` -> logits)
    kept as `original.logits`, and for text generation the reference's next-token logits along its
    greedy tokens (`generation.{i}.logits`, [B, steps, V])."""
    bits = BITS[precision]
    original = inputs_of(model)
    replaced = dequantize_linears(model, exported, bits)
    reference = reference_of_model(model)
    if replaced:  # else nothing is quantized (a ResNet): the reference is the model itself, and says so
        reference.source = f"PyTorch with the {precision} weights"
    reference.extra[ORIGINAL] = original
    reference.extra.update(_generation_logits(model, reference.extra))
    return reference


def _generation_logits(model, extra: dict) -> dict:
    """PyTorch's next-token logits along its greedy tokens for each reference batch (text generation),
    from the same generate() call the tokens came from (aim/tasks/text_generation.py); it must give
    the same tokens."""
    import torch

    from aim.tasks.text_generation import NEW_TOKENS

    out = {}
    index = 0
    stop = [int(token) for token in extra.get("generation.stop_tokens", [])]
    while f"generation.{index}.tokens" in extra:
        ids, mask = extra[f"generation.{index}.input_ids"], extra[f"generation.{index}.attention_mask"]
        with torch.no_grad():
            run = model.generate(
                input_ids=torch.from_numpy(ids),
                attention_mask=torch.from_numpy(mask),
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                pad_token_id=int(extra["generation.pad_token_id"]),
                eos_token_id=stop or None,
                top_k=None,
                top_p=None,
                temperature=None,
                output_logits=True,
                return_dict_in_generate=True,
            )
        tokens = run.sequences[:, ids.shape[1] :].numpy()
        if not np.array_equal(tokens, extra[f"generation.{index}.tokens"]):
            raise RuntimeError("generate() gave other tokens on the same call: the reference is not repeatable")
        out[f"generation.{index}.logits"] = torch.stack(run.logits, dim=1).float().numpy()
        index += 1
    return out


def dequantized_onnx_logits(model, weights_dir: Path, precision: str, inputs: dict, logits: str) -> np.ndarray:
    """A user's graph `model` (its weights in `weights_dir`) with the weights the int4 / int8 engine holds,
    dequantized, on ONNX Runtime in FP32: its `logits` for `inputs`."""
    from aim.runtime.onnxruntime import OnnxRuntimeEngine

    with tempfile.TemporaryDirectory(prefix="aim-dequantized-") as scratch:
        path = save_onnx(
            dequantized_model(model, weights_dir, BITS[precision]),
            Path(scratch) / "dequantized.onnx",
            False,
            weights_dir,
        )
        with OnnxRuntimeEngine(path) as engine:
            return engine.infer(inputs)[logits]
