"""Image classification (logits [B, C]) and semantic segmentation (logits [B, C, H, W] at the input's
size: transformers' segmentation models return them at a lower resolution, and the method modulates
per input pixel, so the graph upsamples them first, as the post-processor does)."""

from __future__ import annotations

import numpy as np

from aim.contract import BATCH, LOGITS
from aim.specs import DimRange, TensorSpec
from aim.tasks.base import Task
from aim.verdicts import Agreement, Tolerance

PIXELS = "pixel_values"
LEVEL = 2.0 / 255.0  # one 8-bit intensity level of the data's -1..1 pixel range
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

    # -- data

    def model_config(self, trained, data: dict):
        return trained.config(labels=data["labels"], channels=data["channels"])

    def training_batches(self, data: dict, batch: int, rng):
        import torch

        train = data["train"]
        while True:
            for index in np.array_split(rng.permutation(len(train)), max(1, len(train) // batch)):
                part = train.take(index)
                yield {k: torch.tensor(v) for k, v in part.inputs.items()}, torch.tensor(part.labels)

    perturbation = "every pixel value moved by one 8-bit intensity level (1/255 of its range), up or down at random"

    def variants(self, engine, inputs: dict, count: int, checkpoint, seed: int = 0):
        rng = np.random.default_rng(seed)
        for _ in range(count):
            yield {
                **inputs,
                PIXELS: inputs[PIXELS] + rng.choice(np.float32([-LEVEL, LEVEL]), size=inputs[PIXELS].shape),
            }

    def training_logits(self, model, inputs: dict):
        """The logits with gradients, as the engine computes them (resized to the input if the task asks)."""
        logits = model(pixel_values=inputs[PIXELS]).logits
        if self.upsample_logits_to:
            from aim.graph_passes.upsample import upsample_torch

            logits = upsample_torch(logits, inputs[PIXELS].shape[2:])
        return logits


def _channels(config) -> int:
    """Input channels: the model's, or its backbone's (UperNet), or RGB."""
    backbone = getattr(config, "backbone_config", None)
    return getattr(config, "num_channels", None) or getattr(backbone, "num_channels", None) or 3


class ImageClassification(_ImageTask):
    """Digits from scikit-learn for training and evaluation (10 classes, upsampled to 32x32)."""

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

    def training_data(self, trained, seed: int = 0, checkpoint=None, train_inputs: int | None = None) -> dict:
        from aim.tasks import datasets

        return {**datasets.digits(seed), "labels": datasets.DIGIT_CLASSES, "channels": 1}

    def eval_split(self, engine, checkpoint, split: str, seed: int = 0, count: int | None = None):
        from aim.tasks import datasets

        channels = engine.inputs[PIXELS][1][1]
        data = datasets.digits(seed, channels=channels if isinstance(channels, int) else 1)[split]
        return data if count is None else data.take(slice(0, count))


class SemanticSegmentation(_ImageTask):
    """Synthetic shapes for training and evaluation (5 classes, 64x64, labelled per pixel)."""

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
    metric = "mIoU"
    segmentation = True

    def output_specs(self, model) -> tuple[TensorSpec, ...]:
        return (TensorSpec(LOGITS, "float32", (BATCH, self.num_classes(model), "logits_height", "logits_width")),)

    def training_data(self, trained, seed: int = 0, checkpoint=None, train_inputs: int | None = None) -> dict:
        from aim.tasks import datasets

        sizes = dict(datasets.SHAPES_SPLITS)
        sizes["train"] = min(sizes["train"], train_inputs or sizes["train"])  # short runs need fewer
        return {**datasets.shapes(seed, sizes), "labels": datasets.SHAPE_CLASSES, "channels": 3}

    def clean_metric(self, predicted, labels, num_classes: int) -> float:
        from aim.tasks import metrics

        return metrics.mean_iou(predicted, labels, num_classes)

    def eval_split(self, engine, checkpoint, split: str, seed: int = 0, count: int | None = None):
        from aim.tasks import datasets

        return datasets.shapes(seed, {split: count if count is not None else datasets.SHAPES_SPLITS[split]})[split]
