"""`aim engine --onnx yours.onnx --logits NAME`: `make engine` for a model the project did not export.

The same steps and the same build folder as for a family (OUT/<file stem>/, manifest and all), with
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
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from aim.contract import BATCH
from aim.errors import AimError, InvalidGraphError, InvalidInputError, VerificationError
from aim.files import StagedFolder, sha256
from aim.graph_passes.dims import conventional_io
from aim.graph_passes.io import load_onnx, save_onnx
from aim.graph_passes.noise_key import NoiseKey
from aim.layout import FILES, REFERENCE, GraphIO, Manifest, Source, package_versions
from aim.pipeline import steps
from aim.pipeline.build import Progress, engine_step, log_noise, modulation_record, verification_record, verify_and_save
from aim.runtime.backends import TENSORRT_BACKENDS, choose_backend, runnable_here
from aim.runtime.base import profile_from_io
from aim.runtime.onnxruntime import OnnxRuntimeEngine
from aim.runtime.shapes import ShapeRanges
from aim.specs import DimRange
from aim.tasks import get_task
from aim.verdicts import Agreement, Tolerance
from aim.verify.reference import Reference, differential_knobs

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


@dataclass(frozen=True)
class _Logits:
    """What the graph passes read of a task, for a user's logits: their class axis, and the input whose
    spatial size they are resized to (--upsample-to), if any."""

    class_axis: int
    upsample_logits_to: str | None = None


@dataclass
class OnnxSource:
    """A user's ONNX, checked and brought to the build folder's conventions (nothing written yet)."""

    path: Path
    model: object  # onnx.ModelProto with conventional IO
    logits: str
    class_axis: int
    shapes: ShapeRanges
    dims: dict[str, DimRange]  # every dynamic dim of the conventional graph's inputs
    inputs: dict[str, np.ndarray] | None  # given verification inputs (--inputs), checked
    inputs_path: Path | None

    @property
    def io(self) -> GraphIO:
        return GraphIO.of_model(self.model)

    @property
    def logits_dtype(self) -> str:
        return self.io.outputs[0].dtype

    @property
    def parameters(self) -> int:
        return sum(int(np.prod(init.dims)) for init in self.model.graph.initializer)


def read_source(
    path, logits: str, class_axis: int, shapes: ShapeRanges, backend: str, inputs=None, upsample_to: str | None = None
) -> OnnxSource:
    """Every check that needs no output folder: the file, the logits, the batch, the shape flags
    against the graph (a dynamic dim left without a range is named), --upsample-to, the given inputs."""
    path = Path(path)
    model = load_onnx(path)
    shapes.dims(GraphIO.of_model(model).inputs)  # errors name the dims as the user's graph names them
    model = conventional_io(model, logits)
    io = GraphIO.of_model(model)
    dims = shapes.dims(io.inputs)
    _check_upsample(io, path, class_axis, upsample_to)
    if backend in TENSORRT_BACKENDS:
        _check_logits_dims(io.outputs[0], dims, 2 if upsample_to else None)
    given = _read_inputs(inputs, io, shapes, path) if inputs is not None else None
    return OnnxSource(
        path, model, logits, class_axis, shapes, dims, given, Path(inputs) if inputs is not None else None
    )


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
        stored = np.load(file, allow_pickle=False)
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


def reference(
    source: OnnxSource, inputs: dict[str, np.ndarray], class_axis: int, seed: int = 0, upsample_to: str | None = None
) -> Reference:
    """The user's bare graph on ONNX Runtime (their file as given), its logits resized by PyTorch's
    bilinear interpolation to input `upsample_to`'s spatial size if asked, and the PyTorch twin of
    the redistribution on them with the seeded knobs and noise."""
    import torch

    from aim.graph_passes.redistribution import redistribute_torch
    from aim.graph_passes.upsample import upsample_torch

    with OnnxRuntimeEngine(source.path) as bare:
        logits = bare.infer(inputs)[source.logits]
    if upsample_to is not None:
        logits = (
            upsample_torch(torch.from_numpy(logits.astype(np.float32)), inputs[upsample_to].shape[2:])
            .numpy()
            .astype(logits.dtype)
        )
    knobs = differential_knobs(logits.shape[0], logits.shape[class_axis], logits.shape, seed)
    modulated = redistribute_torch(
        torch.from_numpy(logits), class_axis=class_axis, **{k: torch.from_numpy(v) for k, v in knobs.items()}
    )
    return Reference(inputs=inputs, logits=logits, modulated=modulated.numpy(), source=SOURCE, **knobs)


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


def build_onnx(
    onnx_path: str | os.PathLike,
    logits: str,
    out_dir: str | os.PathLike = "build",
    class_axis: int | None = None,
    task: str = "image-classification",
    shapes: ShapeRanges | None = None,
    inputs: str | os.PathLike | None = None,
    backend: str = "onnxruntime",
    precision: str = "fp32",
    seed: int = 0,
    log: Callable[[str], None] = print,
    noise: str = "fresh",
    noise_key: str | os.PathLike | None = None,
    upsample_to: str | None = None,
) -> Manifest:
    """Builds and verifies the modulated engine of a user's ONNX into OUT/<file stem>/; returns its
    manifest. `noise`, `noise_key`: as `build_model`'s (keyed noise, its key file); `upsample_to`: an
    input whose spatial size the logits [B, C, h, w] are resized to (bilinear) before the
    modulation, so that it acts per input pixel (segmentation)."""
    task_object = get_task(task)
    if precision not in steps.PRECISIONS:
        raise AimError(f"unknown precision {precision!r}; available: {', '.join(steps.PRECISIONS)}")
    key, fresh_key = steps.noise_key_of(noise, noise_key)  # a bad key file fails here
    backend, why = choose_backend(backend)
    log(f"backend {why}")
    class_axis = task_object.class_axis if class_axis is None else class_axis
    source = read_source(onnx_path, logits, class_axis, shapes or ShapeRanges({}), backend, inputs, upsample_to)
    name = build_name(source.path)
    out = Path(out_dir)
    log_noise(key, fresh_key, noise_key, log)
    with StagedFolder(out / name, Manifest.holds_build, (onnx_path, inputs, noise_key)) as staged:
        manifest = _build(source, name, task_object, staged.path, backend, precision, seed, log, key, upsample_to)
        if not manifest.verification.passed:
            failed = staged.publish(out / f"{name}.failed")
            raise VerificationError(
                f"verification failed: {', '.join(manifest.verification.failed())}. Artifacts and report kept "
                f"in {failed}/"
            )
        if fresh_key and noise_key is not None:
            key.write(noise_key)  # before publishing: a published keyed engine always has its key file
        manifest.folder = staged.publish()
    staged.discard(out / f"{name}.failed")
    return manifest


def _build(
    source: OnnxSource,
    name: str,
    task,
    folder: Path,
    backend: str,
    precision: str,
    seed: int,
    log,
    key: NoiseKey | None,
    upsample_to: str | None = None,
) -> Manifest:
    progress = Progress(4, log)
    native_fp16 = source.logits_dtype == "float16"
    # An FP16 graph is FP16 already: nothing to convert, and its engine is built as FP16 builds are.
    convert = "fp32" if native_fp16 else precision
    precision = "fp16" if native_fp16 else precision
    progress(
        f"graph {source.path} ({source.parameters:,} parameters; logits {source.logits!r} "
        f"{source.logits_dtype}, classes on axis {source.class_axis})"
    )
    exported = save_onnx(
        source.model, folder / FILES["exported"], weights_dir=source.path.parent
    )  # its weights file, if any, is copied in
    progress.done("load", "dims " + ", ".join(f"{dim} {r.min}..{r.max}" for dim, r in source.dims.items()))

    progress(
        "graph passes: "
        + (f"upsample logits to {upsample_to!r}, " if upsample_to else "")
        + f"redistribution (production{', keyed noise,' if key else ''} + verification)"
        + (", fp16 (redistribution kept fp32)" if convert == "fp16" else "")
        + ", TensorRT compatibility check"
    )
    graphs = steps.passes(
        _Logits(source.class_axis, upsample_to), folder, exported, convert, backend, logits=source.logits, key=key
    )
    unsupported = sum(len(report.errors) for report in graphs.compatibility.values())
    progress.done(
        "passes",
        "TensorRT compatibility: " + ("all nodes supported" if not unsupported else f"{unsupported} unsupported nodes"),
    )

    builds, engine = engine_step(progress, graphs, folder, backend, precision, source.dims, log)

    runnable, why = runnable_here(backend)
    runner = backend if runnable else "onnxruntime"
    progress(
        f"verify: {SOURCE} vs engine, production noise statistics"
        + (
            ""
            if runnable
            else f"; the {backend} engine cannot run here, so ONNX Runtime runs the graphs it was built from"
        )
    )
    production = GraphIO.of(graphs.paths[graphs.sources["production"]])
    given = source.inputs is not None
    inputs = source.inputs if given else verification_inputs(source.io, source.dims, seed)
    if given and next(iter(inputs.values())).shape[0] == 1 and source.dims[BATCH].max >= 2:
        inputs = {k: np.concatenate([v, v]) for k, v in inputs.items()}  # a second row to carry utility > 0
    class_axis = source.class_axis % len(source.io.outputs[0].dims)  # valid: the passes checked it
    ref = reference(source, inputs, class_axis, seed, upsample_to)
    num_classes = ref.logits.shape[class_axis]
    reference_path = ref.save(folder / REFERENCE)
    manifest = Manifest(
        model=name,
        task=task.name,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        source=Source(
            None,
            seed,
            source.parameters,
            onnx=str(source.path.resolve()),
            onnx_sha256=sha256(source.path),
            shapes=source.shapes.flags(),
            inputs={"path": str(source.inputs_path.resolve()), "sha256": sha256(source.inputs_path)} if given else None,
        ),
        backend=backend,
        precision=precision,
        engine=engine.name,
        graphs=graphs.sources,
        modulation=modulation_record(source.logits, class_axis, num_classes, upsample_to, precision, key),
        tokenizer=None,
        graph=production,
        verification_graph=GraphIO.of(graphs.paths[graphs.sources["verification"]]),
        dynamic_dims=dict(source.dims),
        profile=profile_from_io(production.inputs, source.dims),
        tensorrt=builds or None,
        compatibility={role: report.as_dict() for role, report in graphs.compatibility.items()},
        verification=verification_record(
            runner,
            runnable,
            why,
            ref,
            TOLERANCE,
            class_axis,
            fp16_comparator(task, num_classes) if precision == "fp16" else None,
            seed,
        ),
        artifacts={},
        timings_s=progress.timings,
        versions=package_versions(),
        folder=folder,
    )
    return verify_and_save(manifest, graphs, task, ref, reference_path, key, progress)
