"""The modules torch.onnx traces: a transformers model wrapped so that its positional inputs are the
graph's inputs and its first output the logits the redistribution acts on.

Why our own wrappers rather than Optimum's exported models: Optimum's `text-generation-with-past`
export returns logits for every position, [B, S, V]; the redistribution belongs on the next-token
logits [B, V] only (docs/method.md §2), so the causal LM asks transformers for the last position
(`logits_to_keep=1` where the architecture has it) and keeps Optimum's input and output names and
its model patcher (export/optimum_io.py). Image models need no more than `.logits` of the output:
their input is Optimum's too (`pixel_values`).
"""

from __future__ import annotations

import torch


class LogitsOnly(torch.nn.Module):
    """pixel_values -> logits: image classification [B, C], segmentation [B, C, h, w]."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        out = self.model(pixel_values=pixel_values)
        return out["logits"]  # a ModelOutput, or the dict Optimum's patcher returns while exporting


def _layers(cache) -> list[tuple]:
    """(key, value) per layer of a transformers Cache, or of the legacy tuple Optimum's patcher returns."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return [tuple(layer[:2]) for layer in cache]


class NextTokenWithPast(torch.nn.Module):
    """(*tokens, *past) -> (logits [B, V] of the last position, *present), where `tokens` names the
    non-cache inputs (input_ids, attention_mask, and position_ids where the model takes them) and
    past / present are key, value per layer.

    One graph does prefill (a past of length 0) and decode (one new token after a past of T)."""

    def __init__(
        self,
        model,
        tokens: tuple[str, ...] = ("input_ids", "attention_mask", "position_ids"),
        logits_to_keep: bool = True,
    ):
        super().__init__()
        self.model = model
        self.tokens = tokens
        self.logits_to_keep = logits_to_keep

    def forward(self, *inputs):
        from transformers.cache_utils import DynamicCache

        named = dict(zip(self.tokens, inputs))
        past = inputs[len(self.tokens) :]
        cache = DynamicCache.from_legacy_cache(tuple(zip(past[0::2], past[1::2])))
        if self.logits_to_keep:
            named["logits_to_keep"] = 1  # the lm head on the last position only (not every position's [S, V])
        out = self.model(**named, past_key_values=cache, use_cache=True)
        present = [tensor for layer in _layers(out["past_key_values"]) for tensor in layer]
        return (out["logits"][:, -1, :], *present)
