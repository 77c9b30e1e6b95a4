"""The reference of an int4 / int8 build: the model computing with the weights the engine holds, dequantized.

The engine multiplies by ONNX Runtime's quantization of each MatMul weight (graph_passes/quantize.py).
Its verdict (verify/quantized.py) compares it with the same model computing with exactly those
weights, so that it judges the kernels, not what int4 does to the model; the model's logits before
quantization are kept beside it (`original.logits`) for the agreement figure.

- A PyTorch model (`quantized_reference`): the export is quantized before the reference, and each
  `nn.Linear` whose weight the engine holds quantized (found in the exported graph by parameter name,
  or by value: graph_passes.quantize.digest) multiplies, while the reference runs, by the engine's own
  packed weight read from the quantized graph's weights file and dequantized on the fly, in FP32, for
  that one call (`dequantizing`), and by the activations as the kernel quantizes them (int8 per block
  of 32 at accuracy_level 4: graph_passes.quantize.int8_blocks; without that, a random 7B model's logits
  were 0.1 off the engine's: the kernel's 0.5% per MatMul compounded over 32 random layers). Memory
  holds one dequantized weight at a time (the largest: the head, 0.5 GB at 7B), never the model's (29
  GB in FP32 at 7B); a bf16 / fp16 checkpoint stays mapped as stored and computes in FP32 arithmetic a
  module at a time (verify/reference.computing_in_fp32); the Linears' stored weights are not even
  read. A tied embedding keeps its own values, as the engine's Gather does. A quantized weight that is
  no `nn.Linear`'s fails the build here: a reference that does not compute the engine's model would
  fail it later with a misleading error.
- Text generation: the tokens are the original model's greedy ones (its `generate()`, in its own
  dtype), and the reference's next-token logits along them come from one forward over each whole
  batch (`forced_logits`). The engine is judged along the same tokens (teacher forcing), so any prefix
  is a fair one; the dequantized model's own greedy tokens would cost a dequantization of every weight
  per new token (12 sweeps of 7B weights per batch instead of one).
- A user's ONNX: the same graph with its quantizable weights replaced by their dequantization, on
  ONNX Runtime in FP32 (`dequantized_onnx_logits`); its activations are not quantized (the kernel's
  0.5% per MatMul stays in the error: fine for the shallow graphs measured, not for a deep random one).
"""

from __future__ import annotations

import contextlib
import functools
import tempfile
from pathlib import Path

import numpy as np

from aim.errors import CheckpointError
from aim.graph_passes.io import load_onnx, save_onnx
from aim.graph_passes.quantize import BITS, Held, dequantized_model, digest, held_weights, quantizable, weight
from aim.verify.judges import ORIGINAL
from aim.verify.quantized import KERNEL_NOISE, SENSITIVITY, figures
from aim.verify.reference import Reference, computing_in_fp32, reference_of


def linear_weights(model, exported: Path, quantized: Path, packed: dict[str, str]) -> dict:
    """Each `nn.Linear` of `model` whose weight the graph `exported` has quantized into the graph
    `quantized` -> what the engine holds for it (`packed`: the quantized weight initializer's name -> its
    packed weight's, graph_passes.quantize.Coverage.packed). Found by parameter name (an export that
    keeps them: W's name or a tied alias's), else by value (W.T's digest; one weight read at a time).
    Fails if a quantized weight is no Linear's."""
    import torch

    held = held_weights(load_onnx(quantized))
    linears = [module for module in model.modules() if isinstance(module, torch.nn.Linear)]
    aliases: dict[int, list[str]] = {}  # a parameter -> every name it has (tied weights have several)
    for name, parameter in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(parameter), []).append(name)
    found, left = {}, set(packed)
    for module in linears:
        names = aliases.get(id(module.weight), [])
        hit = next((key for key in sorted(packed) for name in names if key == name or key.endswith("." + name)), None)
        if hit is not None:
            found[module] = held[packed[hit]]
            left.discard(hit)
    if left:  # an export that renamed its weights (FP32 torch.onnx): by value
        digests = {}
        for item in quantizable(load_onnx(exported)):
            if item.initializer.name in left and item.initializer.name not in digests.values():
                digests[digest(weight(item, exported.parent))] = item.initializer.name
        for module in linears:
            key = None if module in found else digests.get(digest(module.weight.detach().float().numpy().T))
            if key is not None:
                found[module] = held[packed[key]]
                left.discard(key)
    if left:
        raise CheckpointError(
            f"{len(left)} of the {len(packed)} weights the int{next(iter(held.values())).bits} engine holds are no "
            "nn.Linear weight of the model, so the PyTorch reference cannot compute what the engine computes; build "
            "it with PRECISION=fp32 or fp16"
        )
    return found


def unpack(packed: np.ndarray, scales: np.ndarray, bits: int, rows: int):
    """graph_passes.quantize.unpack in torch (its threads: the reference runs it for every weight of every
    forward): float32 [N, K] of MatMulNBits' packed levels and scales."""
    import torch

    levels = torch.from_numpy(packed)
    cols, blocks = levels.shape[0], levels.shape[1]
    if bits == 4:  # two values per byte, the low nibble first; symmetric: zero point 8
        values = torch.empty(*levels.shape, 2)
        values[..., 0], values[..., 1] = levels & 0x0F, levels >> 4
        values = values.view(cols, blocks, -1).sub_(8)
    else:  # symmetric: zero point 128
        values = levels.float().sub_(128)
    values.mul_(torch.from_numpy(np.ascontiguousarray(scales)).float().view(cols, blocks, 1))
    return values.view(cols, -1)[:, :rows]


def int8_blocks(activations, block_size: int):
    """graph_passes.quantize.int8_blocks in torch: the activations [..., K] as MatMulNBits at accuracy_level
    4 multiplies by them, quantized to int8 per block of K (scale max|a| / 127, rounded to nearest even)."""
    import torch

    k = activations.shape[-1]
    padded = torch.nn.functional.pad(activations, (0, -k % block_size))
    blocks = padded.unflatten(-1, (-1, block_size))
    largest = blocks.abs().amax(dim=-1, keepdim=True)
    inverse = torch.where(largest != 0, 127 / largest, torch.zeros_like(largest))
    return (torch.round(blocks * inverse) * (largest / 127)).flatten(-2)[..., :k]


def _dequantized_forward(module, held: Held, weights_dir: Path, inputs):
    import torch

    weight = unpack(*held.arrays(weights_dir), held.bits, held.rows)  # this call's, released when it returns
    inputs = inputs.float()
    if held.accuracy_level == 4:  # the kernel multiplies int8 activations (graph_passes/quantize.py)
        inputs = int8_blocks(inputs, held.block_size)
    bias = module.bias
    return torch.nn.functional.linear(inputs, weight, None if bias is None else bias.float())


@contextlib.contextmanager
def dequantizing(linears: dict, weights_dir: Path):
    """While inside, each `nn.Linear` in `linears` (-> what the engine holds for it, linear_weights)
    computes in FP32 with the engine's weight, read and dequantized for each call and released after it.
    Its own weight is set aside for a placeholder of its shape holding one value, so nothing reads or
    upcasts the stored one (computing_in_fp32 passes an FP32 parameter by); restored on leaving, ties
    included."""
    import torch

    saved = []
    try:
        for module, held in linears.items():
            saved.append((module, module._parameters["weight"], module.__dict__.get("forward")))
            placeholder = torch.zeros((), dtype=torch.float32).expand(held.cols, held.rows)
            module._parameters["weight"] = torch.nn.Parameter(placeholder, requires_grad=False)
            module.forward = functools.partial(_dequantized_forward, module, held, Path(weights_dir))
        yield
    finally:
        for module, weight_of_its_own, forward in saved:
            module._parameters["weight"] = weight_of_its_own
            module.__dict__.pop("forward", None)
            if forward is not None:
                module.forward = forward


def forced_logits(model, extra: dict) -> dict:
    """For each reference batch of text generation (`generation.{i}.*` in `extra`): `model`'s next-token
    logits [B, steps, V] along the batch's tokens, from one forward over prompt and tokens (positions
    and padding as generate() has them: tasks.decoder_inputs.position_ids)."""
    import torch

    from aim.tasks.decoder_inputs import position_ids

    out = {}
    index = 0
    while f"generation.{index}.tokens" in extra:
        ids, mask = extra[f"generation.{index}.input_ids"], extra[f"generation.{index}.attention_mask"]
        tokens = extra[f"generation.{index}.tokens"]
        sequence = np.concatenate([ids, tokens[:, :-1]], axis=1)
        attended = np.concatenate([mask, np.ones((len(ids), tokens.shape[1] - 1), mask.dtype)], axis=1)
        with torch.no_grad():
            logits = model(
                input_ids=torch.from_numpy(sequence),
                attention_mask=torch.from_numpy(attended),
                position_ids=torch.from_numpy(position_ids(attended, sequence.shape[1])),
                use_cache=False,
            ).logits
        out[f"generation.{index}.logits"] = logits[:, ids.shape[1] - 1 :].float().numpy()
        index += 1
    return out


def sensitivity(task, model, inputs: dict, logits: np.ndarray, linears: list) -> float:
    """How far this model's logits for `inputs` move (median relative error, verify/quantized.figures)
    when Gaussian noise of KERNEL_NOISE x its RMS is added to the output of each of `linears`, what the
    engine adds to each MatMul: the model's own amplification, by which verify/quantized.bound raises
    the bound of a model that amplifies (seeded: the same figure on every run)."""
    import torch

    generator = torch.Generator().manual_seed(0)

    def perturbed(module, args, output):
        noise = torch.randn(output.shape, generator=generator, dtype=output.dtype)
        return output + KERNEL_NOISE * output.pow(2).mean().sqrt() * noise

    hooks = [module.register_forward_hook(perturbed) for module in linears]
    try:
        moved = task.reference_logits(model, inputs).float().numpy()
    finally:
        for hook in hooks:
            hook.remove()
    return figures(logits, moved, task.class_axis)["relative_error"]


def quantized_reference(
    task,
    model,
    tokenizer,
    inputs: dict,
    seed: int,
    exported: Path,
    quantized: Path,
    packed: dict,
    precision: str,
    fp32: bool,
    log=None,
) -> Reference:
    """The reference of an int4 / int8 build of a PyTorch model (`exported` quantized into `quantized`,
    `packed`: Coverage.packed) on the verification `inputs`: its logits with the engine's weights
    dequantized on the fly, the original model's beside them (`original.logits`), the model's
    sensitivity (`quantized.sensitivity`), and for text generation the original model's greedy tokens
    with the reference's next-token logits along them.
    `fp32`: a model kept in bf16 / fp16, computing in FP32 arithmetic a module at a time."""
    arithmetic = computing_in_fp32 if fp32 else (lambda model: contextlib.nullcontext())
    timed = _Timed(log)
    with arithmetic(model), timed("the original model's logits"):
        original = task.reference_logits(model, inputs).float().numpy()
    with timed("its greedy tokens"):
        extra = task.reference_extra(model, tokenizer, seed)  # tokens of the original model, in its own dtype
    linears = linear_weights(model, exported, quantized, packed) if packed else {}
    logits = original  # nothing quantized (a ResNet): the reference is the model itself, and says so
    if linears:
        with dequantizing(linears, quantized.parent), arithmetic(model):
            with timed(f"the {precision} logits"):
                logits = task.reference_logits(model, inputs).float().numpy()
            with timed("along the tokens"):
                extra.update(forced_logits(model, extra))
            with timed("sensitivity"):
                extra[SENSITIVITY] = np.array(sensitivity(task, model, inputs, logits, list(linears)))
    timed.report()
    reference = reference_of(
        {name: tensor.numpy() for name, tensor in inputs.items()},
        logits,
        task.class_axis,
        seed,
        source=f"PyTorch with the {precision} weights" if linears else "PyTorch",
        extra=extra,
    )
    reference.extra[ORIGINAL] = original
    return reference


class _Timed:
    """The wall time of each part of the reference, for its log line (a 7B reference takes minutes a part)."""

    def __init__(self, log):
        self.log, self.parts = log, []

    @contextlib.contextmanager
    def __call__(self, what: str):
        import time

        start = time.perf_counter()
        yield
        self.parts.append(f"{what} {time.perf_counter() - start:.1f} s")

    def report(self) -> None:
        if self.log is not None:
            self.log("      " + "; ".join(self.parts))


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
