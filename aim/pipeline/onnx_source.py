"""`aim engine --onnx yours.onnx --logits NAME`: a build made from a model the project did not export.

The same build and the same build folder as for a family (OUT/<file stem>/, manifest and all), with
three differences:
- the graph is the user's, brought to the folder's conventions without changing what it computes
  (graph_passes.dims: dim 0 named `batch`, every dynamic dim named, the logits first);
- the dims' ranges come from trtexec-style shape flags (runtime.shapes), not from a family;
- the reference is the user's own bare graph on ONNX Runtime (plus the PyTorch twin of the
  redistribution on the injected noise), not a PyTorch model; the inputs are drawn from the graph's
  input types and shapes, or given (--inputs data.npz).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

from aim.contract import BATCH
from aim.errors import AimError, InvalidGraphError, InvalidInputError
from aim.files import load_arrays, sha256
from aim.graph_passes.dims import conventional_io
from aim.graph_passes.io import load_onnx, save_onnx
from aim.graph_passes.logits import normalised_class_axis
from aim.graph_passes.quantize import BITS, quantizable
from aim.layout import FILES, REFERENCE, GraphIO
from aim.layout import Source as SourceRecord
from aim.pipeline.batch import with_max_batch
from aim.pipeline.request import QUANTIZED
from aim.pipeline.source import Prepared
from aim.runtime.backends import TENSORRT_BACKENDS
from aim.runtime.onnxruntime import OnnxRuntimeEngine
from aim.runtime.shapes import ShapeRanges
from aim.specs import DimRange
from aim.tasks import get_task
from aim.verdicts import Agreement, Tolerance
from aim.verify.judges import ORIGINAL
from aim.verify.quantized import quantization
from aim.verify.reference import Reference, reference_of

SOURCE = "bare ONNX on ONNX Runtime"  # what the reference is (Reference.source)
TOLERANCE = Tolerance(
    atol=1e-4,
    rtol=1e-4,
    why="fp32 both sides: on ONNX Runtime the engine runs the reference's own graph (the redistribution's "
    "PyTorch twin adds the same noise in the same FP32 arithmetic); another backend's kernels sum in another "
    "order, ~1e-6 relative per layer",
)
# Integer inputs of a user's graph mean anything (ids, masks, pixels): drawn small, where every
# embedding table and mask reads them; real inputs come with --inputs.
INTEGER_HIGH = 100


class OnnxSource:
    """A user's ONNX file `path` whose output `logits` (classes on `class_axis`, default the task's) is
    modulated; `shapes`: the ranges of its dynamic dims (trtexec's flags); `inputs`: an .npz of
    verification inputs (default: drawn from the graph's input types); `upsample_to`: an input whose
    spatial size the logits [B, C, h, w] are resized to (bilinear) before the modulation, so that it
    acts per input pixel (segmentation)."""

    steps = 2

    def __init__(
        self,
        path: str | os.PathLike,
        logits: str = "logits",
        class_axis: int | None = None,
        task: str = "image-classification",
        shapes: ShapeRanges | None = None,
        inputs: str | os.PathLike | None = None,
        upsample_to: str | None = None,
    ):
        self.path, self.logits, self.task = Path(path), logits, get_task(task)
        self.class_axis = self.task.class_axis if class_axis is None else class_axis
        self.shapes = shapes or ShapeRanges({})
        self.inputs_path = Path(inputs) if inputs is not None else None
        self.upsample_to = upsample_to
        self.model = None  # the graph with conventional IO, once checked

    @property
    def name(self) -> str:
        return build_name(self.path)

    @property
    def io(self) -> GraphIO:
        return GraphIO.of_model(self.model)

    @property
    def paths(self) -> tuple:
        return (self.path, self.inputs_path)

    def check(self, request, log) -> None:
        """The file, the logits, the batch, the shape flags against the graph (a dynamic dim left
        without a range is named), --upsample-to, the largest batch, the given inputs."""
        if request.precision == "fp16" and self.task.fp16 is None:
            raise AimError(
                f"task {self.task.name} states no FP16 comparator, so an FP16 engine of it could not be verified"
            )
        model = load_onnx(self.path)
        self.shapes.dims(GraphIO.of_model(model).inputs)  # errors name the dims as the user's graph names them
        self.model = conventional_io(model, self.logits)
        io = self.io
        self.dims = self.shapes.dims(io.inputs)
        if request.max_batch is not None:
            self.dims = with_max_batch(self.dims, request.max_batch)
        _check_class_axis(io.outputs[0], self.class_axis)
        _check_upsample(io, self.path, self.class_axis, self.upsample_to)
        if request.backend in TENSORRT_BACKENDS:
            _check_logits_dims(io.outputs[0], self.dims, 2 if self.upsample_to else None)
        self.given = (
            _read_inputs(self.inputs_path, io, self.shapes, self.path) if self.inputs_path is not None else None
        )

    def made(self, built, request) -> bool:
        """The same file, the same output modulated on the same axis, and the shapes if given (the
        verification inputs and the seed make no difference to what is built)."""
        recorded, modulation = built.source, built.modulation
        return (
            recorded.onnx == str(self.path.resolve())
            and recorded.onnx_sha256 == sha256(self.path)
            and built.task == self.task.name
            and modulation.logits == self.logits
            and modulation.upsampled_to == self.upsample_to
            and self.class_axis % max(1, len(built.graph.outputs[0].dims)) == modulation.class_axis
            and (not self.shapes.shapes or recorded.shapes == self.shapes.flags())
        )

    def prepare(self, folder: Path, request, progress) -> Prepared:
        logits = self.io.outputs[0]
        native_fp16 = logits.dtype == "float16"  # FP16 already: nothing to convert, built as FP16 builds are
        parameters = sum(int(np.prod(init.dims)) for init in self.model.graph.initializer)
        progress(
            f"graph {self.path} ({parameters:,} parameters; logits {self.logits!r} {logits.dtype}, classes on axis "
            f"{self.class_axis})"
        )
        exported = save_onnx(
            self.model, folder / FILES["exported"], weights_dir=self.path.parent
        )  # its weights file, if any, is copied in
        progress.done("load", "dims " + ", ".join(f"{dim} {r.min}..{r.max}" for dim, r in self.dims.items()))

        progress(f"reference: {SOURCE}, on the " + ("given" if self.given is not None else "drawn") + " inputs")
        class_axis = self.class_axis % len(logits.dims)  # valid: checked by conventional_io
        quantized = request.precision in QUANTIZED
        reference = self.reference(class_axis, request.seed, request.precision if quantized else None)
        reference.save(folder / REFERENCE)
        progress.done("reference", REFERENCE)
        num_classes = reference.logits.shape[class_axis]
        precision = "fp16" if native_fp16 and not quantized else request.precision
        given = self.inputs_path
        return Prepared(
            exported=exported,
            reference=reference,
            record=SourceRecord(
                None,
                request.seed,
                parameters,
                onnx=str(self.path.resolve()),
                onnx_sha256=sha256(self.path),
                shapes=self.shapes.flags(),
                inputs={"path": str(given.resolve()), "sha256": sha256(given)} if given is not None else None,
            ),
            task=self.task,
            logits=self.logits,
            class_axis=class_axis,
            upsample_to=self.upsample_to,
            dims=dict(self.dims),
            tolerance=TOLERANCE,
            fp16=fp16_comparator(self.task, num_classes) if precision == "fp16" else None,
            precision=precision,
            convert="fp32" if native_fp16 and not quantized else request.precision,
            quantized=quantization(BITS[precision]) if quantized else None,
        )

    def reference(self, class_axis: int, seed: int = 0, quantized: str | None = None) -> Reference:
        """The user's bare graph on ONNX Runtime (their file as given) on the verification inputs, its
        logits resized by PyTorch's bilinear interpolation to input `upsample_to`'s spatial size if
        asked, and the twin of the redistribution on them (verify/reference.py). `quantized` ("int4",
        "int8"): the graph with the weights that engine holds, dequantized (pipeline/quantized.py), the
        logits of the file as given kept for the agreement figure."""
        inputs = self.given if self.given is not None else verification_inputs(self.io, self.dims, seed)
        if self.given is not None and next(iter(inputs.values())).shape[0] == 1 and self.dims[BATCH].max >= 2:
            inputs = {k: np.concatenate([v, v]) for k, v in inputs.items()}  # a second row to carry utility > 0
        with OnnxRuntimeEngine(self.path) as bare:
            logits = bare.infer(inputs)[self.logits]
        extra = {}
        if quantized is not None and not quantizable(self.model):
            quantized = None  # nothing to quantize (convolutions, Gemm): the graph as given is the reference
        if quantized is not None:
            from aim.pipeline.quantized import dequantized_onnx_logits

            extra[ORIGINAL] = self._resized(logits, inputs)
            logits = dequantized_onnx_logits(self.model, self.path.parent, quantized, inputs, self.logits)
        logits = self._resized(logits, inputs)
        source = SOURCE if quantized is None else f"the bare ONNX with the {quantized} weights on ONNX Runtime"
        reference = reference_of(inputs, logits, class_axis, seed, source=source)
        reference.extra.update(extra)
        return reference

    def _resized(self, logits: np.ndarray, inputs: dict) -> np.ndarray:
        if self.upsample_to is None:
            return logits
        import torch

        from aim.graph_passes.upsample import upsample_torch

        size = inputs[self.upsample_to].shape[2:]
        return upsample_torch(torch.from_numpy(logits.astype(np.float32)), size).numpy().astype(logits.dtype)


def _check_class_axis(logits, class_axis: int) -> None:
    """The class axis is one of the logits' axes past the batch, of a static size (what the graph
    passes require of it, checked before the reference runs)."""
    normalised_class_axis(logits.name, logits.dims, class_axis)


def _check_logits_dims(logits, dims: dict[str, DimRange], resized_from: int | None = None) -> None:
    """The verification flavour takes noise shaped like the logits: TensorRT needs each of their dynamic
    dims to be an input's dim. (Measuring a range for a dim of its own, e.g. a segmentation head's h/4,
    is not enough: TensorRT for RTX 1.7 then fails to build the verification flavour, a Myelin error.)
    `resized_from`: the first axis --upsample-to resizes to an input's dims (the noise's dims then)."""
    for axis, dim in enumerate(logits.dims[:resized_from]):
        if not (isinstance(dim, int) and dim > 0) and dim not in dims:
            raise InvalidGraphError(
                f"the logits {logits.name!r} have "
                f"{'dynamic dim ' + repr(dim) if dim else 'an unnamed dynamic dim'} on axis {axis}, "
                "which is no input's dim; a TensorRT engine of the verification flavour (noise shaped like "
                "the logits) needs "
                "the logits' dynamic dims to be the inputs' (resize the logits to an input with --upsample-to "
                "INPUT, as the "
                f"segmentation family does, or in the model), or use --backend onnxruntime."
            )


def _check_upsample(io: GraphIO, path: Path, class_axis: int, upsample_to: str | None) -> None:
    """--upsample-to names an input of the logits' rank, and the classes are on axis 1."""
    if upsample_to is None:
        return
    inputs, logits = {tensor.name: tensor for tensor in io.inputs}, io.outputs[0]
    if upsample_to not in inputs:
        raise AimError(f"--upsample-to {upsample_to!r} is not an input of {path}; its inputs are {sorted(inputs)}")
    rank = len(inputs[upsample_to].dims)
    if rank != len(logits.dims) or rank < 3 or class_axis % rank != 1:
        raise AimError(
            "--upsample-to resizes logits [B, C, h, w] to an input [B, *, H, W] of the same rank: "
            f"{upsample_to!r} has rank {rank}, "
            f"logits {logits.name!r} rank {len(logits.dims)} with classes on axis {class_axis}"
        )


def _read_inputs(file, io: GraphIO, shapes: ShapeRanges, source: Path) -> dict[str, np.ndarray]:
    """--inputs data.npz: one array per graph input, by name, checked against the graph and the ranges."""
    file = Path(file)
    try:
        stored = load_arrays(file)  # every array's header checked against the file's bytes first
    except (OSError, ValueError) as error:
        stored = error
    if not isinstance(stored, np.lib.npyio.NpzFile):
        raise InvalidInputError(
            f"--inputs {file}: not a readable .npz file "
            f"({stored if isinstance(stored, Exception) else 'one array'}); save one with numpy.savez(file, "
            "name=array, ...)"
        )
    with stored:
        given = dict(stored)
    with OnnxRuntimeEngine(source, profile=shapes.profile(io.inputs)) as bare:
        return bare.check_feed(given)  # names, dtypes, ranks, static dims, the shape ranges


def verification_inputs(io: GraphIO, dims: dict[str, DimRange], seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs of the graph's types at the opt size of every dynamic dim, with a batch of at
    least 2 where the range allows (the differential run mixes utility 0 and utility > 0 rows).
    Floats N(0, 1); integers uniform in [0, INTEGER_HIGH); booleans fair."""
    rng = np.random.default_rng(seed)
    sizes = {name: r.opt for name, r in dims.items()}
    sizes[BATCH] = min(max(2, dims[BATCH].opt), dims[BATCH].max)
    inputs = {}
    for tensor in io.inputs:
        shape = [d if isinstance(d, int) and d > 0 else sizes[d] for d in tensor.dims]
        dtype = np.dtype(tensor.dtype)
        if np.issubdtype(dtype, np.floating):
            inputs[tensor.name] = rng.standard_normal(shape).astype(dtype)
        elif np.issubdtype(dtype, np.integer):
            inputs[tensor.name] = rng.integers(0, INTEGER_HIGH, size=shape).astype(dtype)
        elif dtype == np.bool_:
            inputs[tensor.name] = rng.random(shape) < 0.5
        else:
            raise InvalidInputError(
                f"input {tensor.name!r} is {tensor.dtype}, which cannot be drawn at random: give real inputs "
                "with --inputs data.npz"
            )
    return inputs


def build_name(onnx_path) -> str:
    """The build folder's name (and the manifest's model): the file's stem."""
    return Path(onnx_path).name.removesuffix(".onnx")


def fp16_comparator(task, num_classes: int) -> Agreement:
    """The task's FP16 comparator, its k below the number of classes (a top-k of every class is vacuous)."""
    if task.fp16 is None:
        raise AimError(f"task {task.name} states no FP16 comparator, so an FP16 engine of it could not be verified")
    k = min(task.fp16.k, max(1, num_classes - 1))
    if k == task.fp16.k:
        return task.fp16
    return dataclasses.replace(
        task.fp16, k=k, why=task.fp16.why + f" (k lowered to {k}: the model has {num_classes} classes)"
    )
