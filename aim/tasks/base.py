"""What every task shares: how a model of the task is traced, what its logits are, and how a build
is verified beyond the logits. (How a model of the task is trained and evaluated, its data and
metric, is aim/evaluation/task_evaluation.py.)

A task object is looked up by the name a family gives (`aim.tasks.get_task`). Importing a task
imports no torch or transformers: they load inside the methods that trace or compute a PyTorch
reference.
"""

from __future__ import annotations

import contextlib

from aim.specs import DimRange, TensorSpec
from aim.verdicts import Agreement, Check, Tolerance


class Task:
    name: str = ""
    class_axis: int = 1
    # Input whose spatial size the logits are resized to before modulation (segmentation), or None.
    upsample_logits_to: str | None = None
    uses_tokenizer: bool = False  # text in and out: a build keeps a tokenizer for generation
    # The defaults of every model of this task: a family inherits them and states only what differs
    # (aim/families), a checkpoint folder's record and a user's ONNX take them as they are. The ranges
    # of the dynamic dims, the sizes traced and verified at, the fp32 tolerance, the FP16 comparator
    # (what the task reads from its logits) and the ONNX opset torch.onnx exports at.
    dims: dict[str, DimRange] = {}
    verify_sizes: dict[str, int] = {}
    tolerance: Tolerance | None = None
    fp16: Agreement | None = None
    opset: int = 17

    # -- tracing

    def checkpoint_dims(
        self, config: dict, fixed_image_size: bool, folder=None
    ) -> tuple[dict[str, DimRange], dict[str, int]]:
        """(dims, verify sizes) a checkpoint's config.json (a dict, in `folder`) sets apart from the task's
        defaults: none, unless the task says otherwise."""
        return {}, {}

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

    def checks(self, runs: dict, extra: dict, tolerance: Tolerance, reduced: Agreement | None = None) -> list[Check]:
        """Task-level verdicts on what the production engine gave (`runs`, arrays) against
        `reference_extra`'s arrays."""
        return []
