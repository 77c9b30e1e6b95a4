"""Llama causal LM: next-token logits [B, V] at the last position (no KV cache in this export)."""

import contextlib

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from exporter.configs import Agreement, DimRange, ExportConfig, TensorSpec, Tolerance, register


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


class NextTokenLogits(torch.nn.Module):
    """Only the last position's logits are computed (logits_to_keep=1): [B, V], never [B, S, V]."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=1, use_cache=False)
        return out.logits[:, -1, :]


def make_inputs(model, sizes, generator):
    batch, seq = sizes["batch"], sizes["sequence"]
    input_ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=generator)
    attention_mask = torch.ones(batch, seq, dtype=torch.int64)
    if batch > 1 and seq > 2:
        attention_mask[0, : seq // 3] = 0  # a left-padded row, as batched generation has
    return {"input_ids": input_ids, "attention_mask": attention_mask}


@contextlib.contextmanager
def traceable_attention_masks():
    """transformers >= 4.53 builds masks with vmap, which TorchScript cannot trace; Optimum's exporter
    swaps in vectorised versions while exporting. We reuse its functions rather than copy them."""
    import transformers.masking_utils as masking
    from optimum.exporters.onnx import model_patcher as patcher

    registry = masking.ALL_MASK_ATTENTION_FUNCTIONS
    saved = {key: registry._global_mapping[key] for key in ("sdpa", "eager")}
    saved_packed = masking.find_packed_sequence_indices
    registry.register("sdpa", patcher.sdpa_mask_without_vmap)
    registry.register("eager", patcher.eager_mask_without_vmap)
    masking.find_packed_sequence_indices = patcher.find_packed_sequence_indices_patched
    try:
        yield
    finally:
        for key, function in saved.items():
            registry.register(key, function)
        masking.find_packed_sequence_indices = saved_packed


LLAMA = register(
    ExportConfig(
        name="llama",
        task="text-generation",
        build_tiny=build_tiny,
        model_class=LlamaForCausalLM,
        wrap=NextTokenLogits,
        make_inputs=make_inputs,
        inputs=(
            TensorSpec("input_ids", "int64", ("batch", "sequence")),
            TensorSpec("attention_mask", "int64", ("batch", "sequence")),
        ),
        logits=TensorSpec("logits", "float32", ("batch", None)),
        class_axis=1,
        num_classes=lambda model: model.config.vocab_size,
        dims={"batch": DimRange(1, 2, 8), "sequence": DimRange(1, 128, 1024)},
        verify_sizes={"batch": 2, "sequence": 12},
        export_context=traceable_attention_masks,
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
