"""SegFormer semantic segmentation: logits [B, C, H/4, W/4], upsampled to [B, C, H, W] before modulation."""

from transformers import SegformerConfig, SegformerForSemanticSegmentation

from aim.export.wrappers import LogitsOnly, image_inputs
from aim.families.base import Agreement, DimRange, ExportConfig, TensorSpec, Tolerance, register


def build_tiny():
    config = SegformerConfig(
        num_encoder_blocks=4,
        depths=[1, 1, 1, 1],
        hidden_sizes=[8, 16, 32, 64],
        num_attention_heads=[1, 1, 2, 2],
        decoder_hidden_size=32,
        num_labels=150,  # ADE20K's classes, as in the reference code
    )
    return SegformerForSemanticSegmentation(config)


SEGFORMER = register(
    ExportConfig(
        name="segformer",
        task="semantic-segmentation",
        build_tiny=build_tiny,
        model_class=SegformerForSemanticSegmentation,
        wrap=LogitsOnly,
        make_inputs=image_inputs,
        inputs=(TensorSpec("pixel_values", "float32", ("batch", None, "height", "width")),),
        logits=TensorSpec("logits", "float32", ("batch", None, "logits_height", "logits_width")),
        class_axis=1,
        num_classes=lambda model: model.config.num_labels,
        dims={"batch": DimRange(1, 2, 8), "height": DimRange(32, 512, 1024), "width": DimRange(32, 512, 1024)},
        verify_sizes={"batch": 2, "height": 64, "width": 96},
        # The HF post-processor resizes logits to the image size (bilinear); the method modulates per pixel.
        upsample_logits_to="pixel_values",
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
    )
)
