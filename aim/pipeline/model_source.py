"""A build made from a PyTorch model: a model family (its tiny config with random weights, or a
checkpoint folder of its architecture), or a checkpoint folder built as its own architecture.

Its steps: load the model in FP32, export it with torch.onnx, and compute the reference (PyTorch on
the verification inputs, and the task's own: generation), after which the model is released.

Which exporter (`FamilySource.fake_exported`): the dynamo exporter on a FakeTensor model, the checkpoint's
tensors attached one by one (export/fake_export.py), for a text-generation checkpoint of an architecture
it is tested on (FAKE_EXPORTED): in FP16 for a bf16 / fp16 checkpoint's reduced-precision build, in FP32
for every other build of one with at least LEAN_EXPORT_BYTES of FP32 weights. Otherwise TorchScript on
the loaded FP32 model, which holds the model and its serialised graph at once (~4.8x the FP32 weights).
"""

from __future__ import annotations

import contextlib
import os
from functools import cached_property
from pathlib import Path

from aim.contract import LOGITS
from aim.errors import AimError
from aim.families import Family, get_family
from aim.families.architectures import FAKE_EXPORTED
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
from aim.verify.reference import Reference, computing_in_fp32, reference_of


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
            preflight(self.checkpoint, request.precision)

    def made(self, built, request) -> bool:
        recorded = built.source
        if self.checkpoint is None:
            return recorded.checkpoint is None and recorded.onnx is None and recorded.seed == request.seed
        return recorded.checkpoint == str(self.checkpoint.resolve()) and recorded.files == folder_hashes(
            self.checkpoint
        )

    def reduced(self, request) -> str | None:
        """The dtype a reduced-precision build keeps the checkpoint's weights in, without an FP32 copy:
        FP16 for a text-generation checkpoint stored in bf16 or fp16 of an architecture the dynamo
        export is tested on (int4 / int8 then quantize that FP16 export); else None (the FP32 path: load
        and export in FP32, FP16 or int4 by the passes)."""
        if request.precision == "fp32" or self.checkpoint is None or self.family.task != "text-generation":
            return None
        from aim.export.checkpoint import checkpoint_dtype

        if self.family.model_type not in FAKE_EXPORTED:
            return None
        stored = checkpoint_dtype(self.checkpoint)
        return "float16" if stored in ("bfloat16", "float16") else None

    def fake_exported(self, request) -> str | None:
        """The dtype torch.onnx's dynamo exporter exports the checkpoint in, on a FakeTensor model with the
        checkpoint's tensors attached one by one: the reduced dtype (`reduced`), or float32 for an FP32-path
        build (fp32, an fp16 or int4 / int8 made from the FP32 export) of a text-generation checkpoint of a
        FAKE_EXPORTED architecture holding at least LEAN_EXPORT_BYTES of FP32 weights. None: TorchScript."""
        reduced = self.reduced(request)
        if reduced or self.checkpoint is None or self.family.task != "text-generation":
            return reduced
        if self.family.model_type not in FAKE_EXPORTED:
            return None
        from aim.export.checkpoint import stored_weights

        return "float32" if 4 * sum(stored_weights(self.checkpoint).values()) >= LEAN_EXPORT_BYTES else None

    def prepare(self, folder: Path, request, progress) -> Prepared:
        family, task, checkpoint, seed = self.family, self.task, self.checkpoint, request.seed
        reduced, fake_exported = self.reduced(request), self.fake_exported(request)
        quantized = request.precision in QUANTIZED
        if quantized:  # one more step of its own: the reference reads the engine's weights (pipeline/quantized.py)
            progress.total += 1
        progress(
            f"model {family.name} ({family.task}, {family.model_class}) from "
            + (f"checkpoint {checkpoint}" if checkpoint else f"a tiny config, random weights (seed {seed})")
        )
        loaded = steps.load(family, task, checkpoint, seed, stored=reduced is not None)
        tokenizer_dir = steps.save_tokenizer(loaded.tokenizer, folder) if loaded.tokenizer is not None else None
        progress.done(
            "load",
            f"{loaded.parameters:,} parameters"
            + (f" stored as {loaded.dtype}, loaded in float32" if loaded.dtype and not reduced else "")
            + (f" stored as {loaded.dtype}, mapped as stored (no copy)" if reduced else "")
            + f", {loaded.num_classes} classes"
            + (f", tokenizer of {len(loaded.tokenizer)} tokens" if loaded.tokenizer is not None else "")
            + (
                ", no tokenizer in the checkpoint (verified on token ids; `generate` needs one)"
                if task.uses_tokenizer and loaded.tokenizer is None
                else ""
            ),
        )

        weights = folder / FILES["weights"]
        # a reduced int4 / int8 build: the checkpoint's tensors, read as they are quantized (no reduced copy)
        unattached, streamed = None, quantized and reduced is not None
        if fake_exported:
            progress(
                f"export to ONNX in {fake_exported} (torch.onnx dynamo on a FakeTensor model, then the checkpoint's "
                + (
                    f"weights read tensor by tensor by the {request.precision} quantization: no {fake_exported} copy)"
                    if streamed
                    else "weights attached tensor by tensor)"
                )
                + ", dynamic "
                + ", ".join(family.dims)
            )
            exported, attached = steps.export_reduced(
                family, task, checkpoint, folder / FILES["exported"], fake_exported, weights=not streamed
            )
            if streamed:
                unattached, detail = attached, f"{exported.name}, {len(attached.wanted)} weights declared"
            else:
                detail = (
                    f"{exported.name}, {attached.tensors} weights in {weights.name} ({attached.bytes / 1e9:.2f} GB)"
                )
                detail += _attached(attached)
        else:
            progress("export to ONNX (torch.onnx, dynamic " + ", ".join(family.dims) + ")")
            exported = steps.export(family, task, loaded.model, folder / FILES["exported"])
            detail = exported.name + (
                f", weights in {weights.name} ({weights.stat().st_size / 1e9:.2f} GB)" if weights.is_file() else ""
            )
        progress.done("export", detail)

        coverage = None
        if quantized:
            progress(
                f"quantize to {request.precision}: MatMul weights to MatMulNBits (ONNX Runtime's quantizer, one weight "
                "at a time"
                + (f", read from the checkpoint in {reduced}" if unattached else "")
                + "), before the reference, which computes with them"
            )
            quantized_graph, coverage = steps.quantized_graph(folder, exported, request.precision, unattached)
            progress.done(
                "quantize",
                f"{quantized_graph.name}, {coverage.summary()}" + (_attached(unattached.found) if unattached else ""),
            )

        progress(
            "PyTorch reference on the verification inputs"
            + (f" ({loaded.dtype} weights, fp32 arithmetic; generation in {loaded.dtype})" if reduced else "")
            + (
                f"; the {request.precision} weights dequantized on the fly, one Linear at a time, beside the original "
                "model"
                if quantized
                else ""
            )
            + ", then the PyTorch model is released"
        )
        keep_fp32 = family.fp16_keep_fp32 + task.keep_fp32(loaded.model)  # found by module: before the model goes
        max_positions = task.positions(loaded.model)  # likewise read from the model's config before it goes
        if quantized:  # the model with the engine's weights (pipeline/quantized.py)
            reference = quantized_reference_of(
                family,
                task,
                loaded,
                seed,
                exported,
                quantized_graph,
                coverage,
                request.precision,
                reduced,
                progress.log,
            )
        else:
            reference = pytorch_reference(family, task, loaded.model, loaded.tokenizer, seed, fp32=reduced is not None)
        reference.save(folder / REFERENCE)
        steps.release(loaded)
        if quantized:  # one copy of the weights per precision: the export has served its purpose
            steps.drop_export(folder, exported)
            exported = quantized_graph
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
            # exported in fp16 already: nothing to convert (int4 / int8 quantize that export)
            convert=request.precision if request.precision in QUANTIZED or not reduced else "fp32",
            keep_fp32=keep_fp32,
            tokenizer=tokenizer_dir.name if tokenizer_dir else None,
            max_positions=max_positions,
            quantized=quantization(BITS[request.precision]) if quantized else None,
            quantization=coverage,
        )


# The FP32 weights from which an FP32-path build exports the lean way (fake_exported). TorchScript's export
# adds ~4.8x the FP32 weights to the ~0.45 GB the interpreter and its libraries hold (docs/results.md
# "Checkpoints"), within issue 24's peak target of 1 GB + 2.5x the weights up to ~0.23 GB of weights;
# the dynamo exporter costs ~17 s more even on a 2-layer model (the suite's checkpoints: ~17 MB), so
# below this the TorchScript export stays, with margin under the target.
LEAN_EXPORT_BYTES = 100e6


def _attached(attached) -> str:
    """What a log line says of the checkpoint's tensors beyond their count (export/attach.Attached)."""
    return (f"; {attached.clipped} values past fp16's range clipped to it" if attached.clipped else "") + (
        f"; computed, not stored: {', '.join(attached.computed)}" if attached.computed else ""
    )


# The peak of a build that loads and exports in fp32, as a multiple of its fp32 weights: measured 1.64
# for a 1.5B checkpoint (9.9 GB, `make scale-check`, docs/real-sizes.md), rounded up.
FP32_PEAK = 1.7


def preflight(checkpoint: Path, precision: str) -> None:
    """Refuses, before any work, a build in fp32 whose weights would not fit in this machine's memory
    (read from the safetensors headers: nothing is loaded), naming the precision that fits."""
    from aim.export.checkpoint import stored_weights
    from aim.pipeline.memory import machine_memory
    from aim.pipeline.request import PRECISIONS

    values, memory = sum(stored_weights(checkpoint).values()), machine_memory()
    if precision != "fp32" or memory is None or values * 4 * FP32_PEAK <= memory:
        return
    reduced = " or ".join(f"PRECISION={name}" for name in PRECISIONS if name != "fp32")
    raise AimError(
        f"{checkpoint} holds {values / 1e9:.2f} B weights: {values * 4 / 1e9:.1f} GB in fp32, and an fp32 build "
        f"peaks near {FP32_PEAK:g} times that ({values * 4 * FP32_PEAK / 1e9:.0f} GB), more than this machine's "
        f"{memory / 1e9:.1f} GB of memory. Build it in reduced precision: {reduced} (`--precision`), which "
        "makes no fp32 copy of the weights."
    )


def pytorch_reference(family: Family, task, model, tokenizer=None, seed: int = 0, fp32: bool = False) -> Reference:
    """PyTorch's logits on the verification inputs (resized as the graph resizes them), the twin of the
    redistribution on them (verify/reference.py), and the task's own reference (generation). `fp32`: the
    logits of a model kept in bf16 or fp16 computed in FP32 arithmetic, a module at a time."""
    inputs = task.example_inputs(model, family.sizes(**family.verify_sizes), seed)
    with computing_in_fp32(model) if fp32 else contextlib.nullcontext():
        logits = task.reference_logits(model, inputs).float()
    return reference_of(
        {name: tensor.numpy() for name, tensor in inputs.items()},
        logits.numpy(),
        task.class_axis,
        seed,
        extra=task.reference_extra(model, tokenizer, seed),
    )


def quantized_reference_of(
    family: Family,
    task,
    loaded,
    seed: int,
    exported,
    quantized,
    coverage,
    precision: str,
    reduced: str | None = None,
    log=None,
) -> Reference:
    """pytorch_reference of an int4 / int8 build: the model computing with the engine's weights (those of
    the graph `quantized`, made from `exported` with `coverage`), dequantized on the fly (`reduced`: a
    model kept in its stored dtype, computing in FP32 arithmetic)."""
    from aim.pipeline.quantized import quantized_reference

    inputs = task.example_inputs(loaded.model, family.sizes(**family.verify_sizes), seed)
    return quantized_reference(
        task,
        loaded.model,
        loaded.tokenizer,
        inputs,
        seed,
        exported,
        quantized,
        coverage.packed,
        precision,
        fp32=reduced is not None,
        log=log,
    )


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
