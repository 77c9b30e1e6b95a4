"""SegFormer semantic segmentation: logits [B, C, H/4, W/4], upsampled to [B, C, H, W] before modulation."""

from aim.families import Benchmark, Family, Trained, register
from aim.specs import DimRange
from aim.verdicts import Agreement, Tolerance


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
        model_type="segformer",
        model_class="SegformerForSemanticSegmentation",
        tiny=tiny,
        dims={"batch": DimRange(1, 2, 8), "height": DimRange(32, 512, 1024), "width": DimRange(32, 512, 1024)},
        verify_sizes={"batch": 2, "height": 64, "width": 96},
        tolerance=Tolerance(
            atol=1e-4,
            rtol=1e-4,
            why="fp32 both sides; attention, convolution and bilinear resize summed in different orders by "
            "ONNX Runtime and PyTorch, ~1e-6 relative per layer",
        ),
        fp16=Agreement(
            metric="class_map",
            k=1,
            min_fraction=0.99,
            why="the segmentation map is the argmax per pixel; FP16 flips only pixels whose top two classes are "
            "nearly tied (class boundaries), at most 1% of them (measured 0.2% on the tiny model, whose logits "
            "differ by only ~1e-3 between classes)",
        ),
        trained=Trained(trained, steps=600, lr=2e-3, batch=16, version=3, eval_batch=8, eval_repeats=1, eval_inputs=16),
        benchmark=Benchmark(
            b0,
            {"batch": 1, "height": 512, "width": 512},
            "SegFormer-B0, 150 classes, 1x3x512x512, logits upsampled to 512x512 in bare and modulated",
            repeats=20,
            time_make_engine=True,
            p1b_target=2.0,
        ),
    )
)
