"""What every task shares: how a model of the task is traced, what its logits are, how a build is
verified beyond the logits, and the data it is trained and evaluated on.

A task object is looked up by the name a family gives (`aim.tasks.get_task`). Importing a task
imports no torch or transformers: they load inside the methods that trace, train or compute a
PyTorch reference, so the decode loop and the runtime stay light.
"""

from __future__ import annotations

import contextlib

import numpy as np

from aim.specs import DimRange, TensorSpec
from aim.verdicts import Agreement, Check, Tolerance


class Task:
    name: str = ""
    class_axis: int = 1
    # Input whose spatial size the logits are resized to before modulation (segmentation), or None.
    upsample_logits_to: str | None = None
    metric: str = "accuracy"  # the clean metric of a trained model
    utility_grid: str = "classification"  # the eval sweep's sigma grid (docs/method.md §1)
    segmentation: bool = False  # measured per pixel: mIoU besides accuracy
    uses_tokenizer: bool = False  # text in and out: a build keeps a tokenizer for generation
    # What a model of this task gets when its checkpoint names no family (aim/tasks/checkpoint.py) or
    # it is a user's ONNX: the ranges of the dynamic dims, the sizes traced and verified at, the
    # tolerances, and the FP16 comparator (what the task reads from its logits; a family states its own).
    dims: dict[str, DimRange] = {}
    verify_sizes: dict[str, int] = {}
    tolerance: Tolerance | None = None
    fp16: Agreement | None = None

    # -- tracing

    def checkpoint_dims(
        self, config: dict, fixed_image_size: bool, folder=None
    ) -> tuple[dict[str, DimRange], dict[str, int]]:
        """(dims, verify sizes) of a checkpoint's model (config.json as a dict, in `folder`): the task's defaults."""
        return dict(self.dims), dict(self.verify_sizes)

    def trace_sizes(self, sizes: dict[str, int], dims: dict[str, DimRange]) -> dict[str, int]:
        """The sizes torch.onnx traces at, given the verification's `sizes`."""
        return dict(sizes)

    def input_specs(self, model) -> tuple[TensorSpec, ...]:
        """Every graph input of the exported model, in order (before utility and focus)."""
        raise NotImplementedError

    def output_specs(self, model) -> tuple[TensorSpec, ...]:
        """Every graph output, the logits first."""
        raise NotImplementedError

    def num_classes(self, model) -> int:
        raise NotImplementedError

    def wrap(self, model):
        """The torch module torch.onnx traces: positional inputs as `input_specs`, logits first out."""
        raise NotImplementedError

    def example_inputs(self, model, sizes: dict[str, int], seed: int = 0) -> dict:
        """Random inputs {name: torch tensor} at `sizes` of the dynamic dims."""
        raise NotImplementedError

    def export_context(self, model):
        """Patches active while tracing `model` (a context manager)."""
        return contextlib.nullcontext()

    def keep_fp32(self, model) -> tuple[str, ...]:
        """Node-name prefixes of the model's export that FP16 graphs keep in FP32 (besides the family's)."""
        return ()

    # -- the PyTorch reference

    def reference_outputs(self, model, inputs: dict):
        """Every output of the wrapped model for `inputs` (a tuple, the logits first)."""
        import torch

        with torch.no_grad():
            out = self.wrap(model).eval()(*(inputs[spec.name] for spec in self.input_specs(model)))
        return out if isinstance(out, tuple) else (out,)

    def reference_logits(self, model, inputs: dict):
        """The logits as the deployed graph computes them (resized to the input where the task asks)."""
        logits = self.reference_outputs(model, inputs)[0]
        if self.upsample_logits_to:
            from aim.graph_passes.upsample import upsample_torch

            logits = upsample_torch(logits, inputs[self.upsample_logits_to].shape[2:])
        return logits

    # -- task-level verification (beyond the logits)

    def tokenizer(self, model, checkpoint):
        """The tokenizer a build saves for the task (text generation), or None."""
        return None

    def positions(self, model) -> int | None:
        """The longest sequence the model was made for (text generation: prompt and new tokens), if any."""
        return None

    def reference_extra(self, model, tokenizer, seed: int = 0) -> dict:
        """Task-level PyTorch outputs computed at build time, stored in reference.npz."""
        return {}

    def verification_runs(self, extra: dict, reduced: Agreement | None = None) -> dict:
        """What the task's checks need the production engine to decode, by name (verify/results.py:
        Greedy, CacheVsRecompute), given `reference_extra`'s arrays; the build runs them once."""
        return {}

    def checks(
        self, decoded: dict[str, np.ndarray], extra: dict, tolerance: Tolerance, reduced: Agreement | None = None
    ) -> list[Check]:
        """Task-level verdicts on what the production engine decoded (`decoded`: the arrays of
        `verification_runs`) against `reference_extra`'s arrays (`extra`)."""
        return []

    # -- data: training and evaluation (package-shipped or generated; no download)

    def training_data(self, trained, seed: int = 0, checkpoint=None, train_inputs: int | None = None) -> dict:
        """{"train", "calibration", "test"} splits (and whatever else training needs)."""
        raise NotImplementedError

    def model_config(self, trained, data: dict):
        """The family's trained config sized for the task's data (`trained`: the family's Trained)."""
        raise NotImplementedError

    def training_batches(self, data: dict, batch: int, rng):
        """Endless (inputs, labels) batches of torch tensors from the train split."""
        raise NotImplementedError

    def training_logits(self, model, inputs: dict):
        """The logits the loss sees (as the engine computes them)."""
        raise NotImplementedError

    def loss(self, logits, labels):
        import torch.nn.functional as F

        return F.cross_entropy(logits, labels)

    def predictions(self, logits):
        """The clean metric's predictions from training_logits (a numpy array)."""
        return logits.argmax(1).numpy()

    def clean_metric(self, predicted, labels, num_classes: int) -> float:
        from aim.tasks import metrics

        return metrics.accuracy(predicted, labels)

    def eval_split(self, engine, checkpoint, split: str, seed: int = 0, count: int | None = None):
        """A labelled split of the task's data shaped for `engine` (a datasets.Split)."""
        raise NotImplementedError

    # -- the averaging attack (evaluation/attack.py): imperceptible variants of a request

    perturbation: str = ""  # what `variant` changes, in words

    def variants(self, engine, inputs: dict, count: int, checkpoint, seed: int = 0):
        """`count` imperceptible variants of the eval inputs `inputs` (shaped for `engine`), one by one."""
        raise NotImplementedError
