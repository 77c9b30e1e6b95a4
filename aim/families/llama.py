"""Llama text generation: next-token logits [B, V], prefill and decode in one graph with a KV cache."""

from aim.families import Benchmark, Family, Trained, register

TRAINED_VOCAB = 1024  # the BPE vocabulary the small trained model learns on the documentation corpus


def tiny():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=32000,  # Llama-2's vocabulary: realistic logits width
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
    )


def trained():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=TRAINED_VOCAB,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def decode_step():
    """TinyLlama-1.1B's width (2048, GQA 32/4 heads, MLP 5632) and Llama-2's 32000-token vocabulary,
    6 of its 22 layers: 0.4 B parameters, the most that exports under protobuf's 2 GB single-file
    limit. The logits, which is what modulation touches, have their real width."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=6,
        num_attention_heads=32,
        num_key_value_heads=4,
        max_position_embeddings=2048,
    )


def tinyllama():
    """TinyLlama-1.1B's shape (22 layers, width 2048, GQA 32/4 heads, MLP 5632, vocabulary 32000):
    the real-size checkpoint `make scale-check` saves in bf16 and builds (random weights: no hub)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
    )


LLAMA = register(
    Family(
        name="llama",
        task="text-generation",
        model_class="LlamaForCausalLM",
        tiny=tiny,
        # Rotary angles are position x inv_freq: in FP16 a position near 1000 keeps only ~0.5 rad of precision.
        # The task finds these modules on the PyTorch model; this names them for passes on an exported graph.
        fp16_keep_fp32=("/model/model/rotary_emb/",),
        trained=Trained(trained, steps=400, lr=3e-3, batch=32, version=3, eval_batch=500, eval_repeats=4),
        benchmark=Benchmark(
            decode_step,
            {"batch": 1, "sequence": 1, "past_sequence": 128},
            "Llama decode step (1 new token after a 128-token KV cache), width 2048, 6 layers, 0.4 B params, "
            "vocabulary 32000",
            repeats=30,
        ),
        scale=tinyllama,
    )
)
