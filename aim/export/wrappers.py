"""The modules torch.onnx traces: a transformers model wrapped so that its positional inputs are the
graph's inputs and its first output the logits the redistribution acts on.

Why our own wrappers rather than Optimum's exported models: Optimum's `text-generation-with-past`
export returns logits for every position, [B, S, V]; the redistribution belongs on the next-token
logits [B, V] only (SPEC section 2), so the causal LM asks transformers for the last position
(`logits_to_keep=1`) and keeps Optimum's input and output names and its traceable patches.
"""

from __future__ import annotations

import torch


class LogitsOnly(torch.nn.Module):
    """pixel_values -> logits: image classification [B, C], segmentation [B, C, h, w]."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        return self.model(pixel_values=pixel_values).logits


class NextTokenWithPast(torch.nn.Module):
    """(input_ids, attention_mask, position_ids, *past) -> (logits [B, V] of the last position, *present).

    One graph does prefill (a past of length 0) and decode (one new token after a past of T)."""

    def __init__(self, model, positions: bool = True):
        super().__init__()
        self.model = model
        self.positions = positions

    def forward(self, input_ids, attention_mask, *rest):
        from transformers.cache_utils import DynamicCache

        position_ids, past = (rest[0], rest[1:]) if self.positions else (None, rest)
        cache = DynamicCache.from_legacy_cache(tuple(zip(past[0::2], past[1::2])))
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        present = [tensor for layer in out.past_key_values.layers for tensor in (layer.keys, layer.values)]
        return (out.logits[:, -1, :], *present)
