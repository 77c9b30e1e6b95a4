"""Image classification (logits [B, C]) and semantic segmentation (logits [B, C, H, W] at the input's
size: transformers' segmentation models return them at a lower resolution, and the method modulates
per input pixel, so the graph upsamples them first, as the post-processor does)."""

from __future__ import annotations

from aim.contract import BATCH, LOGITS
from aim.specs import DimRange, TensorSpec
from aim.tasks.base import Task
from aim.verdicts import Agreement, Tolerance

PIXELS = "pixel_values"
SPATIAL = ("height", "width")
# Traced this much larger than verified (where the dims are dynamic): an input size the tracer baked
# into the graph as a constant then fails the verification instead of passing unnoticed.
TRACE_MARGIN = 32


class _ImageTask(Task):
    tolerance = Tolerance(
        atol=1e-4,
        rtol=1e-4,
        why="fp32 both sides; convolution, attention and resize kernels of ONNX Runtime (MLAS) and PyTorch (oneDNN) "
        "sum in different orders, ~1e-6 relative per layer; the modulation adds the same noise on both sides",
    )

    def fixed_size(self, config: dict, folder=None) -> dict[str, int]:
        """Height and width of an architecture that takes one input size only: config.json's image_size,
        else the size its image processor resizes or crops to (preprocessor_config.json), else the
        task's usual size (the profile's opt)."""
        import json
        from pathlib import Path

        size = config.get("image_size")
        processor = Path(folder) / "preprocessor_config.json" if folder is not None else None
        if size is None and processor is not None and processor.is_file():
            settings = json.loads(processor.read_text())
            size = settings.get("crop_size") or settings.get("size")
        if isinstance(size, dict):  # {"height", "width"} or {"shortest_edge"}
            size = [size["height"], size["width"]] if "height" in size else size.get("shortest_edge")
        if size is None:
            size = self.dims["height"].opt
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        return {"height": int(height), "width": int(width)}

    def checkpoint_dims(
        self, config: dict, fixed_image_size: bool, folder=None
    ) -> tuple[dict[str, DimRange], dict[str, int]]:
        """An architecture that takes one input size only is verified at it, and its height and width are static."""
        if not fixed_image_size:
            return {}, {}
        sizes = self.fixed_size(config, folder)
        return {dim: DimRange(size, size, size) for dim, size in sizes.items()}, sizes

    def trace_sizes(self, sizes: dict[str, int], dims: dict[str, DimRange]) -> dict[str, int]:
        """Dynamic height and width larger by TRACE_MARGIN (within their range) than verified."""
        return {dim: min(size + TRACE_MARGIN, dims[dim].max) if dim in SPATIAL else size for dim, size in sizes.items()}

    def input_specs(self, model) -> tuple[TensorSpec, ...]:
        return (TensorSpec(PIXELS, "float32", (BATCH, None, "height", "width")),)

    def num_classes(self, model) -> int:
        return model.config.num_labels

    def wrap(self, model):
        from aim.export.wrappers import LogitsOnly

        return LogitsOnly(model)

    def export_context(self, model):
        from aim.export.patches import traceable_image_ops

        return traceable_image_ops()

    def example_inputs(self, model, sizes: dict[str, int], seed: int = 0) -> dict:
        """A batch of random images [batch, channels, height, width]."""
        import torch

        generator = torch.Generator().manual_seed(seed)
        shape = (sizes[BATCH], _channels(model.config), sizes["height"], sizes["width"])
        return {PIXELS: torch.randn(shape, generator=generator)}


def _channels(config) -> int:
    """Input channels: the model's, or its backbone's (UperNet), or RGB."""
    backbone = getattr(config, "backbone_config", None)
    return getattr(config, "num_channels", None) or getattr(backbone, "num_channels", None) or 3


class ImageClassification(_ImageTask):
    name = "image-classification"
    dims = {BATCH: DimRange(1, 4, 32), "height": DimRange(64, 224, 512), "width": DimRange(64, 224, 512)}
    verify_sizes = {BATCH: 2, "height": 64, "width": 96}
    fp16 = Agreement(
        metric="top_k",
        k=5,
        min_fraction=0.9,
        why="top-5 classes, as ImageNet reports them: FP16 rounds logits by ~1e-3 relative, which can swap "
        "only near-tied classes; one swap at rank 5 in one of the two verification images (0.9) is tolerated",
    )

    def output_specs(self, model) -> tuple[TensorSpec, ...]:
        return (TensorSpec(LOGITS, "float32", (BATCH, self.num_classes(model))),)


class SemanticSegmentation(_ImageTask):
    name = "semantic-segmentation"
    upsample_logits_to = PIXELS
    dims = {BATCH: DimRange(1, 2, 8), "height": DimRange(64, 512, 1024), "width": DimRange(64, 512, 1024)}
    verify_sizes = {BATCH: 2, "height": 64, "width": 96}
    fp16 = Agreement(
        metric="class_map",
        k=1,
        min_fraction=0.99,
        why="the segmentation map is the argmax per pixel; FP16 flips only pixels whose top two classes are "
        "nearly tied (class boundaries), at most 1% of them (measured 0.2% on a tiny random-weight model, whose "
        "logits differ by only ~1e-3 between classes)",
    )

    def output_specs(self, model) -> tuple[TensorSpec, ...]:
        return (TensorSpec(LOGITS, "float32", (BATCH, self.num_classes(model), "logits_height", "logits_width")),)
