"""A build made from a PyTorch model: a model family (its tiny config with random weights, or a
checkpoint folder of its architecture), or a checkpoint folder built as its own architecture.

Its steps: load the model in FP32, export it with torch.onnx, and compute the reference (PyTorch on
the verification inputs, and the task's own: generation), after which the model is released.
"""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path

from aim.contract import LOGITS
from aim.errors import AimError
from aim.families import Family, get_family
from aim.files import folder_hashes
from aim.graph_passes.quantize import BITS
from aim.layout import FILES, REFERENCE, GraphIO
from aim.layout import Source as SourceRecord
from aim.pipeline import steps
from aim.pipeline.batch import default_max_batch, with_max_batch
from aim.pipeline.request import QUANTIZED
from aim.pipeline.source import Prepared
from aim.tasks import get_task
from aim.verify.quantized import quantization
from aim.verify.reference import Reference, reference_of


class FamilySource:
    """Model family `name` (see `aim models`): its tiny config with random weights (seeded), or the
    weights of `checkpoint`, a save_pretrained folder of the family's architecture."""

    steps = 3

    def __init__(self, name: str, checkpoint: str | os.PathLike | None = None):
        self.family = get_family(name)  # an unknown name fails here
        self.checkpoint = Path(checkpoint) if checkpoint is not None else None

    @property
    def name(self) -> str:
        return self.family.name

    @property
    def task(self):
        return get_task(self.family.task)

    @property
    def paths(self) -> tuple:
        return (self.checkpoint,)

    def check(self, request, log) -> None:
        if request.precision == "fp16" and self.family.fp16 is None:
            raise AimError(
                f"{self.family.name} states no FP16 comparator (Family.fp16), so an FP16 engine could not be verified"
            )
        if self.checkpoint is not None:
            from aim.export.torch_export import checkpoint_config

            checkpoint_config(self.checkpoint)  # not a checkpoint folder: fails before anything is written

    def made(self, built, request) -> bool:
        recorded = built.source
        if self.checkpoint is None:
            return recorded.checkpoint is None and recorded.onnx is None and recorded.seed == request.seed
        return recorded.checkpoint == str(self.checkpoint.resolve()) and recorded.files == folder_hashes(
            self.checkpoint
        )

    def prepare(self, folder: Path, request, progress) -> Prepared:
        family, task, checkpoint, seed = self.family, self.task, self.checkpoint, request.seed
        progress(
            f"model {family.name} ({family.task}, {family.model_class}) from "
            + (f"checkpoint {checkpoint}" if checkpoint else f"a tiny config, random weights (seed {seed})")
        )
        loaded = steps.load(family, task, checkpoint, seed)
        tokenizer_dir = steps.save_tokenizer(loaded.tokenizer, folder) if loaded.tokenizer is not None else None
        progress.done(
            "load",
            f"{loaded.parameters:,} parameters"
            + (f" stored as {loaded.dtype}, loaded in float32" if loaded.dtype else "")
            + f", {loaded.num_classes} classes"
            + (f", tokenizer of {len(loaded.tokenizer)} tokens" if loaded.tokenizer is not None else "")
            + (
                ", no tokenizer in the checkpoint (verified on token ids; `generate` needs one)"
                if task.uses_tokenizer and loaded.tokenizer is None
                else ""
            ),
        )

        progress("export to ONNX (torch.onnx, dynamic " + ", ".join(family.dims) + ")")
        exported = steps.export(family, task, loaded.model, folder / FILES["exported"])
        weights = folder / FILES["weights"]
        progress.done(
            "export",
            exported.name
            + (f", weights in {weights.name} ({weights.stat().st_size / 1e9:.2f} GB)" if weights.is_file() else ""),
        )

        progress("PyTorch reference on the verification inputs, then the PyTorch model is released")
        keep_fp32 = family.fp16_keep_fp32 + task.keep_fp32(loaded.model)  # found by module: before the model goes
        max_positions = task.positions(loaded.model)  # likewise read from the model's config before it goes
        if request.precision in QUANTIZED:  # the model with the engine's weights (pipeline/quantized.py)
            reference = quantized_reference_of(family, task, loaded, seed, exported, request.precision)
        else:
            reference = pytorch_reference(family, task, loaded.model, loaded.tokenizer, seed)
        reference.save(folder / REFERENCE)
        steps.release(loaded)
        progress.done("reference", REFERENCE)

        max_batch = request.max_batch or default_max_batch(GraphIO.of(exported).inputs, family.dims, request.precision)
        return Prepared(
            exported=exported,
            reference=reference,
            record=SourceRecord(
                str(loaded.checkpoint) if loaded.checkpoint else None,
                seed,
                loaded.parameters,
                dtype=loaded.dtype,
                model_class=family.model_class,
                files=folder_hashes(loaded.checkpoint) if loaded.checkpoint else {},
            ),
            task=task,
            logits=LOGITS,
            class_axis=task.class_axis,
            upsample_to=task.upsample_logits_to,
            dims=with_max_batch(family.dims, max_batch),
            tolerance=family.tolerance,
            fp16=family.fp16 if request.precision == "fp16" else None,
            precision=request.precision,
            convert=request.precision,
            keep_fp32=keep_fp32,
            tokenizer=tokenizer_dir.name if tokenizer_dir else None,
            max_positions=max_positions,
            quantized=quantization(BITS[request.precision]) if request.precision in QUANTIZED else None,
        )


def pytorch_reference(family: Family, task, model, tokenizer=None, seed: int = 0) -> Reference:
    """PyTorch's logits on the verification inputs (resized as the graph resizes them), the twin of the
    redistribution on them (verify/reference.py), and the task's own reference (generation)."""
    inputs = task.example_inputs(model, family.sizes(**family.verify_sizes), seed)
    logits = task.reference_logits(model, inputs)
    return reference_of(
        {name: tensor.numpy() for name, tensor in inputs.items()},
        logits.numpy(),
        task.class_axis,
        seed,
        extra=task.reference_extra(model, tokenizer, seed),
    )


def quantized_reference_of(family: Family, task, loaded, seed: int, exported, precision: str) -> Reference:
    """pytorch_reference of an int4 / int8 build: the model with the engine's weights, dequantized."""
    from aim.pipeline.quantized import quantized_reference

    def original(model):
        return task.reference_logits(
            model, task.example_inputs(model, family.sizes(**family.verify_sizes), seed)
        ).numpy()

    def reference(model):
        return pytorch_reference(family, task, model, loaded.tokenizer, seed)

    return quantized_reference(loaded.model, original, reference, exported, precision)


class CheckpointSource(FamilySource):
    """A save_pretrained folder of any supported architecture of the three tasks, built as its own
    architecture into OUT/<the folder's name>/ (its family record derived from its config.json)."""

    def __init__(self, checkpoint: str | os.PathLike):
        self.checkpoint = Path(checkpoint)

    @cached_property
    def family(self) -> Family:
        from aim.families.from_checkpoint import checkpoint_family

        return checkpoint_family(self.checkpoint)  # not a checkpoint, or an architecture refused: fails here

    def check(self, request, log) -> None:
        family = self.family
        if family.architecture is not None and not family.architecture.tested:
            log(
                f"note: {family.architecture.model_type} is not among the tested architectures; the verification "
                "against PyTorch decides"
            )
        super().check(request, log)


def model_source(model: str | None, checkpoint: str | os.PathLike | None = None):
    """The source MODEL and CHECKPOINT name: a family (with the checkpoint's weights, if given), or
    without a family the checkpoint folder as its own architecture."""
    if model is not None:
        return FamilySource(model, checkpoint)
    if checkpoint is None:
        raise AimError("give a model (see `aim models`) or a checkpoint folder: `make engine CHECKPOINT=dir`")
    source = CheckpointSource(checkpoint)
    source.family  # noqa: B018 - an unknown architecture fails here, before anything is written
    return source
