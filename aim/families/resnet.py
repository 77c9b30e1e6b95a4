"""ResNet image classification (transformers' ResNetForImageClassification: logits [B, C])."""

from aim.families import Benchmark, Family, Trained, register
from aim.specs import DimRange
from aim.verdicts import Agreement, Tolerance


def tiny():
    from transformers import ResNetConfig

    return ResNetConfig(
        embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], layer_type="basic", num_labels=10
    )


def trained(labels: tuple[str, ...], channels: int):
    """Sized for the task's training data: its classes and its images' channels."""
    from transformers import ResNetConfig

    return ResNetConfig(
        num_channels=channels,
        embedding_size=16,
        hidden_sizes=[16, 32, 64, 128],
        depths=[1, 1, 1, 1],
        layer_type="basic",
        num_labels=len(labels),
    )


def resnet50():
    from transformers import ResNetConfig

    return ResNetConfig(num_labels=1000)  # the defaults are ResNet-50


RESNET = register(
    Family(
        name="resnet",
        task="image-classification",
        model_type="resnet",
        model_class="ResNetForImageClassification",
        tiny=tiny,
        dims={"batch": DimRange(1, 4, 32), "height": DimRange(32, 224, 512), "width": DimRange(32, 224, 512)},
        verify_sizes={"batch": 2, "height": 64, "width": 48},
        tolerance=Tolerance(
            atol=1e-4,
            rtol=1e-4,
            why="fp32 both sides; convolution kernels of ONNX Runtime (MLAS) and PyTorch (oneDNN) sum in "
            "different orders, ~1e-6 relative per layer; the modulation adds the same noise on both sides",
        ),
        fp16=Agreement(
            metric="top_k",
            k=5,
            min_fraction=0.9,
            why="top-5 classes, as ImageNet reports them: FP16 rounds logits by ~1e-3 relative, which can swap "
            "only near-tied classes; one swap at rank 5 in one of the two verification images (0.9) is tolerated",
        ),
        trained=Trained(trained, steps=300, lr=2e-3, batch=64, version=2, eval_batch=512, eval_repeats=20),
        benchmark=Benchmark(
            resnet50, {"batch": 1, "height": 224, "width": 224}, "ResNet-50, 1000 classes, 1x3x224x224", repeats=30
        ),
    )
)
