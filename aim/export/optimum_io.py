"""Optimum's exporter machinery, used where it fits rather than per-architecture code of our own.

For a causal LM, Optimum's `text-generation-with-past` OnnxConfig of the model's architecture says
which inputs the graph takes (`input_ids`, `attention_mask`, `position_ids` where the architecture
needs them, `past_key_values.{i}.key/value`), the outputs (`present.{i}.key/value`), their dynamic
axes, and the shape of the cache (its dummy past-key-values generator knows each architecture's
layers, key/value heads and head size); its model patcher makes the forward traceable (masks without
vmap, a cache that does not concatenate onto an empty tensor, ops the TorchScript exporter lacks).

Where we depart from Optimum, and why:
- position_ids: Optimum leaves them out for some architectures (Gemma) although the forward takes them;
  transformers' `generate()` passes them, counted from the attention mask, so we add them whenever the
  forward takes them. (Rotary models only see a constant shift per left-padded row without them, which
  changes the logits by rounding; absolute positions (GPT-2) give other tokens: the test saw both.)
- the logits: Optimum exports every position's [B, S, V]; the redistribution acts on the next-token
  logits [B, V] (export/wrappers.py), so the model is asked for the last position only.
- dim names: ours (contract.BATCH, "sequence", ...) so that profiles and the manifest keep one vocabulary.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass

from aim.contract import BATCH

WITH_PAST = "text-generation-with-past"
# Optimum's dynamic axis names -> ours.
DIMS = {
    "batch_size": BATCH,
    "sequence_length": "sequence",
    "past_sequence_length": "past_sequence",
    "past_sequence_length + sequence_length": "total_sequence",
}
PAST, PRESENT = "past_key_values.", "present."


def onnx_config(model, task: str, **options):
    """Optimum's OnnxConfig of `model`'s architecture for an Optimum task name."""
    import optimum.exporters.onnx.model_configs  # noqa: F401  (registers the per-architecture configs)
    from optimum.exporters.tasks import TasksManager

    constructor = TasksManager.get_exporter_config_constructor(
        exporter="onnx", model=model, task=task, library_name="transformers"
    )
    return constructor(model.config, **options)


@dataclass(frozen=True)
class DecoderIO:
    """A causal LM's graph IO by Optimum's `text-generation-with-past` conventions."""

    tokens: tuple[str, ...]  # the non-cache inputs, in order: input_ids, attention_mask[, position_ids]
    layers: int
    dims: dict[str, tuple]  # every input and present output: Optimum's dynamic axes in our names, the rest static
    logits_to_keep: bool  # the forward can compute the last position's logits only

    def cache(self, prefix: str) -> list[str]:
        return [f"{prefix}{i}.{kind}" for i in range(self.layers) for kind in ("key", "value")]


def _dims(axes: dict[int, str], shape: tuple) -> tuple:
    """One tensor's dims: Optimum's dynamic axes in our names, the other axes the size they have."""
    unknown = set(axes.values()) - set(DIMS)
    if unknown:
        raise NotImplementedError(f"dynamic axes {sorted(unknown)}: the decode loop knows {sorted(DIMS)}")
    return tuple(DIMS[axes[i]] if i in axes else size for i, size in enumerate(shape))


def decoder_io(model) -> DecoderIO:
    config = onnx_config(model, WITH_PAST, use_past_in_inputs=True)
    parameters = inspect.signature(model.forward).parameters
    axes = {**config.inputs, **config.outputs}
    if "position_ids" not in axes and "position_ids" in parameters:
        axes["position_ids"] = axes["input_ids"]  # see the module docstring
    tokens = tuple(name for name in axes if name in ("input_ids", "attention_mask", "position_ids"))
    dummy = config.generate_dummy_inputs(
        framework="pt", batch_size=1, sequence_length=2
    )  # (its generators draw lengths in [1, n))
    past = dummy["past_key_values"]
    shape = tuple(past[0][0].shape)
    if len(shape) != 4 or any(tuple(t.shape) != shape for layer in past for t in layer):
        raise NotImplementedError(
            f"cache layout {shape}: the decode loop takes [batch, heads, past_sequence, head_dim] per layer"
        )
    dims = {name: _dims(axes[name], (1, 2)) for name in tokens}
    dims.update({name: _dims(axes[name], shape) for name in axes if name.startswith((PAST, PRESENT))})
    return DecoderIO(tokens, len(past), dims, "logits_to_keep" in parameters)


@contextlib.contextmanager
def patched_for_export(model, task: str, **model_kwargs):
    """Optimum's model patcher of the architecture, active while torch.onnx traces. `model_kwargs` are
    passed to every forward call (e.g. logits_to_keep)."""
    import torch

    config = onnx_config(model, task, **({"use_past_in_inputs": True} if task == WITH_PAST else {}))
    overrides = config.values_override or {}
    saved = {key: getattr(model.config, key) for key in overrides if hasattr(model.config, key)}
    for key, value in overrides.items():
        setattr(model.config, key, value)
    try:
        with torch.no_grad(), config.patch_model_for_export(model, model_kwargs=model_kwargs):
            yield
    finally:
        for key, value in saved.items():
            setattr(model.config, key, value)
