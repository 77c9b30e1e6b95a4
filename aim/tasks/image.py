"""Image classification (logits [B, C]) and semantic segmentation (logits [B, C, H, W] at the input's
size: transformers' segmentation models return them at a lower resolution, and the method modulates
per input pixel, so the graph upsamples them first, as the post-processor does)."""

from __future__ import annotations

import numpy as np

from aim.contract import BATCH, LOGITS
from aim.specs import TensorSpec
from aim.tasks.base import Task

PIXELS = "pixel_values"
LEVEL = 2.0 / 255.0  # one 8-bit intensity level of the data's -1..1 pixel range


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

    perturbation = "every pixel value moved by one 8-bit intensity level (1/255 of its range), up or down at random"

    def variants(self, engine, inputs: dict, count: int, checkpoint, seed: int = 0):
        rng = np.random.default_rng(seed)
        for _ in range(count):
            yield {**inputs, PIXELS: inputs[PIXELS] + rng.choice(np.float32([-LEVEL, LEVEL]), size=inputs[PIXELS].shape)}

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
