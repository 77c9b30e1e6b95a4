"""ResNet image classification (transformers' ResNetForImageClassification: logits [B, C])."""

from aim.families import Benchmark, Family, Trained, register
from aim.specs import DimRange


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
        model_class="ResNetForImageClassification",
        tiny=tiny,
        # Down to 32 px, the size of the digits it is trained on, where its stride-32 last stage is 1x1 (the
        # task's checkpoints start at 64). Verified at 64 x 48, as since it was added: its reports stay comparable.
        dims={"height": DimRange(32, 224, 512), "width": DimRange(32, 224, 512)},
        verify_sizes={"width": 48},
        trained=Trained(trained, steps=300, lr=2e-3, batch=64, version=2, eval_batch=512, eval_repeats=20),
        benchmark=Benchmark(
            resnet50, {"batch": 1, "height": 224, "width": 224}, "ResNet-50, 1000 classes, 1x3x224x224", repeats=30
        ),
    )
)
