"""The sizes each family is benchmarked at: realistic shapes, random weights (no hub)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable


@dataclass(frozen=True)
class BenchModel:
    family: str  # the exporter config it goes through
    build: Callable[[], object]  # a transformers model with random weights
    sizes: dict[str, int]  # every dynamic dim of the family
    shape: str  # what it is, for the table and the README
    repeats: int = 10  # timed runs per variant (after warm-up)
    extra: dict = field(default_factory=dict)


def _resnet50():
    from transformers import ResNetConfig, ResNetForImageClassification

    return ResNetForImageClassification(ResNetConfig(num_labels=1000))  # the defaults are ResNet-50


def _segformer_b0():
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    return SegformerForSemanticSegmentation(SegformerConfig(num_labels=150))  # the defaults are B0


def _llama_decode():
    from transformers import LlamaConfig, LlamaForCausalLM

    # TinyLlama-1.1B's width (2048, GQA 32/4 heads, MLP 5632) and Llama-2's 32000-token vocabulary,
    # 6 of its 22 layers: 0.4 B parameters, the most that exports under protobuf's 2 GB single-file
    # limit. The logits, which is what modulation touches, have their real width.
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=6,
        num_attention_heads=32,
        num_key_value_heads=4,
        max_position_embeddings=2048,
    )
    return LlamaForCausalLM(config)


REALISTIC = {
    "resnet": BenchModel("resnet", _resnet50, {"batch": 1, "height": 224, "width": 224}, "ResNet-50, 1000 classes, 1x3x224x224", repeats=30),
    "segformer": BenchModel(
        "segformer",
        _segformer_b0,
        {"batch": 1, "height": 512, "width": 512},
        "SegFormer-B0, 150 classes, 1x3x512x512, logits upsampled to 512x512 in bare and modulated",
        repeats=20,
    ),
    "llama": BenchModel(
        "llama",
        _llama_decode,
        {"batch": 1, "sequence": 1, "past_sequence": 128},
        "Llama decode step (1 new token after a 128-token KV cache), width 2048, 6 layers, 0.4 B params, vocabulary 32000",
        repeats=30,
    ),
}


def tiny(family: str) -> BenchModel:
    """The family's tiny test model at its verification sizes: for the benchmark's own test."""
    from aim.families import get_config

    config = get_config(family)
    return BenchModel(family, config.build_tiny, dict(config.verify_sizes), f"tiny {family}", repeats=3)
