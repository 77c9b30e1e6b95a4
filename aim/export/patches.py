"""Patches active while tracing, borrowed from Optimum's exporter rather than copied."""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def traceable_attention_masks():
    """transformers >= 4.53 builds masks with vmap, which TorchScript cannot trace, and its cache
    concatenates onto an empty tensor on first use; Optimum's exporter swaps in traceable versions
    while exporting. We reuse its functions rather than copy them."""
    import transformers.masking_utils as masking
    from optimum.exporters.onnx import model_patcher as patcher
    from transformers.cache_utils import DynamicLayer

    registry = masking.ALL_MASK_ATTENTION_FUNCTIONS
    saved = {key: registry._global_mapping[key] for key in ("sdpa", "eager")}
    saved_packed = masking.find_packed_sequence_indices
    saved_update = DynamicLayer.update
    registry.register("sdpa", patcher.sdpa_mask_without_vmap)
    registry.register("eager", patcher.eager_mask_without_vmap)
    masking.find_packed_sequence_indices = patcher.find_packed_sequence_indices_patched
    DynamicLayer.update = patcher.patched_dynamic_layer_update
    try:
        yield
    finally:
        for key, function in saved.items():
            registry.register(key, function)
        masking.find_packed_sequence_indices = saved_packed
        DynamicLayer.update = saved_update
