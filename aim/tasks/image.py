"""Image classification (logits [B, C]) and semantic segmentation (logits [B, C, H, W] at the input's
size: transformers' segmentation models return them at a lower resolution, and the method modulates
per input pixel, so the graph upsamples them first, as the post-processor does)."""

from __future__ import annotations

import numpy as np

from aim.contract import BATCH, LOGITS
from aim.specs import Agreement, TensorSpec
from aim.tasks.base import Task

PIXELS = "pixel_values"


class _ImageTask(Task):
    def input_specs(self, model) -> tuple[TensorSpec, ...]:
        return (TensorSpec(PIXELS, "float32", (BATCH, None, "height", "width")),)

    def num_classes(self, model) -> int:
        return model.config.num_labels

    def wrap(self, model):
        from aim.export.wrappers import LogitsOnly

        return LogitsOnly(model)

    def example_inputs(self, model, sizes: dict[str, int], seed: int = 0) -> dict:
        """A batch of random images [batch, channels, height, width]."""
        import torch

        generator = torch.Generator().manual_seed(seed)
        shape = (sizes[BATCH], model.config.num_channels, sizes["height"], sizes["width"])
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

    def training_logits(self, model, inputs: dict):
        """The logits with gradients, as the engine computes them (resized to the input if the task asks)."""
        logits = model(pixel_values=inputs[PIXELS]).logits
        if self.upsample_logits_to:
            from aim.graph_passes.upsample import upsample_torch

            logits = upsample_torch(logits, inputs[PIXELS].shape[2:])
        return logits


class ImageClassification(_ImageTask):
    """Digits from scikit-learn for training and evaluation (10 classes, upsampled to 32x32)."""

    name = "image-classification"
    fp16 = Agreement(
        metric="top_k",
        k=5,
        min_fraction=0.9,
        why="top-5 classes, as ImageNet reports them: FP16 rounds logits by ~1e-3 relative, which can swap only near-tied classes",
    )

    def output_specs(self, model) -> tuple[TensorSpec, ...]:
        return (TensorSpec(LOGITS, "float32", (BATCH, None)),)

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
    fp16 = Agreement(
        metric="class_map",
        k=1,
        min_fraction=0.99,
        why="the segmentation map is the argmax per pixel; FP16 flips only pixels whose top two classes are nearly tied",
    )
    upsample_logits_to = PIXELS
    metric = "mIoU"
    segmentation = True

    def output_specs(self, model) -> tuple[TensorSpec, ...]:
        return (TensorSpec(LOGITS, "float32", (BATCH, None, "logits_height", "logits_width")),)

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
