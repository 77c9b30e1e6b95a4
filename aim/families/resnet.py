"""ResNet image classification (transformers' ResNetForImageClassification: logits [B, C])."""

from transformers import ResNetConfig, ResNetForImageClassification

from aim.export.wrappers import LogitsOnly, image_inputs
from aim.families.base import Agreement, DimRange, ExportConfig, TensorSpec, Tolerance, register


def build_tiny():
    config = ResNetConfig(
        embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], layer_type="basic", num_labels=10
    )
    return ResNetForImageClassification(config)


RESNET = register(
    ExportConfig(
        name="resnet",
        task="image-classification",
        build_tiny=build_tiny,
        model_class=ResNetForImageClassification,
        wrap=LogitsOnly,
        make_inputs=image_inputs,
        inputs=(TensorSpec("pixel_values", "float32", ("batch", None, "height", "width")),),
        logits=TensorSpec("logits", "float32", ("batch", None)),
        class_axis=1,
        num_classes=lambda model: model.config.num_labels,
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
    )
)
