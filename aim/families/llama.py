"""Llama causal LM with a KV cache: prefill and decode in one ONNX, next-token logits [B, V] only.

Inputs and outputs follow Optimum's `text-generation-with-past` convention (input_ids, attention_mask
over past + new tokens, position_ids, `past_key_values.{i}.key/value` in, `present.{i}.key/value`
out), so Optimum-style decode loops and TensorRT-LLM-style tooling recognise them. Unlike Optimum's
export, which returns logits [B, S, V], the wrapper asks the model for the last position only
(logits_to_keep=1): the redistribution then never sees, and the engine never keeps, a [B, S, V] tensor.
Prefill is the same graph with a past of length 0.
"""

import contextlib

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from aim.families.base import Agreement, DimRange, ExportConfig, TensorSpec, Tolerance, register
from aim.export.tokenizer import model_tokenizer

PAST, PRESENT = "past_key_values", "present"


def build_tiny():
    config = LlamaConfig(
        vocab_size=32000,  # Llama-2's vocabulary: realistic logits width
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
    )
    return LlamaForCausalLM(config)


def cache_shape(model) -> tuple[int, int, int]:
    """(layers, key/value heads, head dim) of the model's KV cache."""
    config = model.config
    heads = config.num_key_value_heads or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_hidden_layers, heads, head_dim


def cache_names(layers: int, prefix: str) -> list[str]:
    return [f"{prefix}.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]


def kv_io(model):
    """One key and one value tensor per layer: past_key_values.* in, present.* out."""
    layers, heads, head_dim = cache_shape(model)
    inputs = tuple(TensorSpec(name, "float32", ("batch", heads, "past_sequence", head_dim)) for name in cache_names(layers, PAST))
    outputs = tuple(TensorSpec(name, "float32", ("batch", heads, "total_sequence", head_dim)) for name in cache_names(layers, PRESENT))
    return inputs, outputs


class NextTokenWithPast(torch.nn.Module):
    """(input_ids, attention_mask, position_ids, *past) -> (logits [B, V] of the last position, *present)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers.cache_utils import DynamicCache

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


def position_ids(attention_mask: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Positions of the last `new_tokens` tokens, counting only attended ones (left padding), as
    transformers' generate() computes them."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 1)[:, -new_tokens:]


def make_inputs(model, sizes, generator):
    """A prefill-or-decode step: `sequence` new tokens after a random cache of `past_sequence`."""
    batch, seq, past = sizes["batch"], sizes["sequence"], sizes["past_sequence"]
    input_ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=generator)
    attention_mask = torch.ones(batch, past + seq, dtype=torch.int64)
    if batch > 1 and past + seq > 2:
        attention_mask[0, : (past + seq) // 3] = 0  # a left-padded row, as batched generation has
    _, heads, head_dim = cache_shape(model)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids(attention_mask, seq)}
    for name in cache_names(model.config.num_hidden_layers, PAST):
        inputs[name] = torch.randn(batch, heads, past, head_dim, generator=generator)
    return inputs


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


def _generation_reference(*args, **kwargs):
    from aim.tasks.generation import generation_reference

    return generation_reference(*args, **kwargs)


def _generation_checks(*args, **kwargs):
    from aim.tasks.generation import generation_checks

    return generation_checks(*args, **kwargs)


LLAMA = register(
    ExportConfig(
        name="llama",
        task="text-generation",
        build_tiny=build_tiny,
        model_class=LlamaForCausalLM,
        wrap=NextTokenWithPast,
        make_inputs=make_inputs,
        inputs=(
            TensorSpec("input_ids", "int64", ("batch", "sequence")),
            TensorSpec("attention_mask", "int64", ("batch", "total_sequence")),  # past + new tokens
            TensorSpec("position_ids", "int64", ("batch", "sequence")),
        ),
        model_io=kv_io,
        logits=TensorSpec("logits", "float32", ("batch", None)),
        class_axis=1,
        num_classes=lambda model: model.config.vocab_size,
        # total_sequence = past_sequence + sequence: prefill is (sequence S, past 0), a decode step
        # (sequence 1, past T); opt values are one consistent point, as a TensorRT profile needs.
        dims={
            "batch": DimRange(1, 2, 8),
            "sequence": DimRange(1, 64, 1024),
            "past_sequence": DimRange(0, 64, 1023),
            "total_sequence": DimRange(1, 128, 1024),
        },
        verify_sizes={"batch": 2, "sequence": 12, "past_sequence": 3},
        export_context=traceable_attention_masks,
        tokenizer=model_tokenizer,
        task_reference=_generation_reference,
        task_checks=_generation_checks,
        tolerance=Tolerance(
            atol=1e-4,
            rtol=1e-4,
            why="fp32 both sides; matmul and softmax reductions ordered differently by ONNX Runtime and "
            "PyTorch, ~1e-6 relative per layer",
        ),
        fp16=Agreement(
            metric="top_k",
            k=5,
            min_fraction=0.9,
            why="the next token comes from the top candidates (greedy: the first; sampling: the top-k); FP16 may "
            "swap near-tied candidates at the edge of the top-5, one swap in the two-prompt batch (0.9) is tolerated",
        ),
        # Rotary angles are position x inv_freq: in FP16 a position near 1000 keeps only ~0.5 rad of precision.
        fp16_keep_fp32=("/model/model/rotary_emb/",),
    )
)
