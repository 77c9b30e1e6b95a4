"""SegFormer semantic segmentation: logits [B, C, H/4, W/4], upsampled to [B, C, H, W] before modulation."""

from aim.families import Benchmark, Family, Trained, register
from aim.specs import DimRange


def tiny():
    from transformers import SegformerConfig

    return SegformerConfig(
        num_encoder_blocks=4,
        depths=[1, 1, 1, 1],
        hidden_sizes=[8, 16, 32, 64],
        num_attention_heads=[1, 1, 2, 2],
        decoder_hidden_size=32,
        num_labels=150,  # ADE20K's classes, as in the reference code
    )


def trained(labels: tuple[str, ...], channels: int):
    """Sized for the task's training data: its classes and its images' channels."""
    from transformers import SegformerConfig

    return SegformerConfig(
        num_channels=channels,
        depths=[1, 1, 1, 1],
        hidden_sizes=[16, 32, 64, 128],
        num_attention_heads=[1, 1, 2, 4],
        decoder_hidden_size=64,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
    )


def b0():
    from transformers import SegformerConfig

    return SegformerConfig(num_labels=150)  # the defaults are B0


SEGFORMER = register(
    Family(
        name="segformer",
        task="semantic-segmentation",
        model_class="SegformerForSemanticSegmentation",
        tiny=tiny,
        # Down to 32 px, where its stride-32 last stage is 1x1 (the task's checkpoints start at 64).
        dims={"height": DimRange(32, 512, 1024), "width": DimRange(32, 512, 1024)},
        trained=Trained(trained, steps=600, lr=2e-3, batch=16, version=3, eval_batch=8, eval_repeats=1, eval_inputs=16),
        benchmark=Benchmark(
            b0,
            {"batch": 1, "height": 512, "width": 512},
            "SegFormer-B0, 150 classes, 1x3x512x512, logits upsampled to 512x512 in bare and modulated",
            repeats=20,
            time_make_engine=True,
            noise_latency_bound=2.0,
        ),
    )
)
