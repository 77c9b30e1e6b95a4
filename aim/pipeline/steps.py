"""The steps of `make engine`, each a small function that returns its artifact.

    load      family + checkpoint -> Loaded (the PyTorch model in FP32, its tokenizer, its size)
    export    -> exported.onnx, its weights in exported.onnx.data (torch.onnx: TorchScript on the model, or
                 export_reduced: dynamo on a FakeTensor model, the checkpoint's tensors attached)
    release   frees the PyTorch model once the reference is computed (model_source.py)
    passes    -> bare, production and verification graphs (+ FP16 copies, or int4 / int8 ones), TensorRT compatibility
    engines   -> the engine files of the backend

The first three are a PyTorch model's (pipeline/model_source.py); passes and engines every build's
(pipeline/builder.py). The verdicts on the engines come from pipeline/verify.py.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from aim.contract import LOGITS
from aim.errors import AimError, CheckpointError
from aim.families import Family
from aim.files import atomic_path
from aim.graph_passes.io import load_onnx, save_onnx
from aim.graph_passes.modulate import deployment_graphs
from aim.graph_passes.noise_key import NoiseKey
from aim.graph_passes.quantize import BITS, Coverage, quantize_model
from aim.layout import FILES, ROLES, TOKENIZER_DIR, GraphIO, engine_files
from aim.runtime import onnxruntime as ort_engine
from aim.runtime.backends import TENSORRT_BACKENDS
from aim.runtime.base import profile_from_io
from aim.specs import TensorSpec
from aim.tasks import Task
from aim.weights import WeightsFile


@dataclass
class Loaded:
    model: object  # the PyTorch model, eval mode, FP32; None once released (after the reference)
    tokenizer: object | None
    num_classes: int
    parameters: int
    checkpoint: Path | None
    dtype: str | None = None  # how the checkpoint stores its weights


def load(family: Family, task: Task, checkpoint=None, seed: int = 0, stored: bool = False) -> Loaded:
    """The family's model in FP32 (or with `stored`, in the dtype the checkpoint stores: mapped, not
    copied): a local `save_pretrained` folder (its architecture must be the family's; stored in any
    dtype), or random weights from the family's tiny config (seeded). Nothing is downloaded."""
    from aim.export.checkpoint import checkpoint_dtype
    from aim.export.torch_export import checkpoint_config, load_checkpoint, random_model

    dtype = None
    if checkpoint is None:
        model = random_model(family.build, seed)
    else:
        config = checkpoint_config(checkpoint)
        found = config.get("model_type")
        if found != family.model_type:
            raise CheckpointError(
                f"{checkpoint} holds a {found!r} model, but MODEL={family.name} expects {family.model_type!r}. "
                "Leave MODEL out to build the checkpoint as its own architecture (`make engine "
                f"CHECKPOINT={checkpoint}`)."
            )
        dtype = checkpoint_dtype(checkpoint, config)
        model = load_checkpoint(family.model_class_object(), checkpoint, dtype if stored else "float32")
    tokenizer = task.tokenizer(model, checkpoint)
    parameters = sum(p.numel() for p in model.parameters())
    return Loaded(
        model, tokenizer, task.num_classes(model), parameters, Path(checkpoint).resolve() if checkpoint else None, dtype
    )


def release(loaded: Loaded) -> None:
    """Frees the PyTorch model once the reference is computed: the engines are built and verified
    without it, so a large model's weights are not held twice."""
    import gc

    loaded.model = None
    gc.collect()


def save_tokenizer(tokenizer, folder: Path) -> Path:
    """The tokenizer beside the engine, as a fast tokenizer (tokenizer.json), so generation needs
    nothing but the build folder (and no transformers: generation/text_tokenizer.py reads it)."""
    target = folder / TOKENIZER_DIR
    tokenizer.save_pretrained(target)
    if not (target / "tokenizer.json").is_file():
        raise CheckpointError(
            "the checkpoint's tokenizer has no fast (tokenizer.json) form, which generation reads; "
            "save it with `AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR)` on a machine with transformers"
        )
    return target


def export(family: Family, task: Task, model, path: Path) -> Path:
    """torch.onnx's trace of the task's wrapper around the model, every dynamic dim symbolic, traced at
    other sizes than it is verified at where the task says so (a size baked in then fails verification).
    An architecture no test covers that fails to export is the user's CheckpointError, not a bug."""
    from aim.export.torch_export import export_onnx
    from aim.families.architectures import supported

    try:
        inputs = task.example_inputs(model, task.trace_sizes(family.sizes(**family.verify_sizes), family.dims))
        specs = (_static(task.input_specs(model), family.dims), _static(task.output_specs(model), family.dims))
        return export_onnx(task.wrap(model), inputs, *specs, path, family.opset, lambda: task.export_context(model))
    except Exception as error:
        if family.architecture is None or family.architecture.tested or isinstance(error, AimError):
            raise
        raise CheckpointError(
            f"{family.model_type} is not among the tested architectures, and its export failed "
            f"({type(error).__name__}: {error}). "
            f"Supported: {supported()}."
        ) from error


def export_reduced(
    family: Family, task: Task, checkpoint: Path, path: Path, dtype: str = "float16", weights: bool = True
):
    """exported.onnx in `dtype` (float16: a bf16 / fp16 checkpoint's reduced build; float32: an FP32-path
    build, model_source.fake_exported) behind an FP32 interface, and its weights in exported.onnx.data,
    without the weights in memory: the dynamo exporter on a FakeTensor model of the checkpoint's config,
    then the checkpoint's tensors attached one by one, each converted to `dtype` (export/fake_export.py,
    export/attach.py). Returns (the graph, what was attached); without `weights`, (the graph without its
    weights, the reader of the checkpoint's tensors: an int4 / int8 build quantizes them as they are read,
    `quantized_graph`, and never writes the FP16 copy)."""
    import torch
    from transformers import AutoConfig

    from aim.export.attach import CheckpointTensors, attach
    from aim.export.fake_export import PREFIX, export_fake, fake_model
    from aim.families.architectures import supported

    config = AutoConfig.from_pretrained(str(checkpoint), local_files_only=True)
    model, mode = fake_model(family.model_class_object(), config, getattr(torch, dtype))
    try:
        inputs = task.example_inputs(model, task.trace_sizes(family.sizes(**family.verify_sizes), family.dims))
        specs = (_static(task.input_specs(model), family.dims), _static(task.output_specs(model), family.dims))
        wanted = export_fake(
            task, model, mode, inputs, *specs, path, getattr(torch, dtype), lambda: task.export_context(model)
        )
    except Exception as error:
        if isinstance(error, AimError):
            raise
        instead = "Build it in fp32 (PRECISION=fp32) if it fits. " if dtype != "float32" else ""
        raise CheckpointError(
            f"{family.model_type} could not be exported in {dtype} by torch.onnx's dynamo exporter "
            f"({type(error).__name__}: {str(error)[:500]}). {instead}Supported: {supported()}."
        ) from error
    tensors = CheckpointTensors(wanted, checkpoint, model, PREFIX)
    return path, attach(path, tensors) if weights else tensors


def _static(specs: tuple[TensorSpec, ...], dims: dict) -> tuple[TensorSpec, ...]:
    """The specs with every dim whose range is one value (an image size the architecture fixes) static."""

    def dim(d):
        return dims[d].min if isinstance(d, str) and d in dims and dims[d].min == dims[d].max else d

    return tuple(TensorSpec(spec.name, spec.dtype, tuple(dim(d) for d in spec.dims)) for spec in specs)


@dataclass
class Graphs:
    paths: dict[str, Path]  # artifact key -> file
    sources: dict[str, str]  # role (bare, verification, production) -> the artifact key its engine runs
    compatibility: dict  # role -> the TensorRT check's report (none for int4 / int8: ONNX Runtime only)
    quantization: Coverage | None = None  # int4 / int8: what was quantized


def quantized_graph(folder: Path, exported: Path, precision: str, tensors=None) -> tuple[Path, Coverage]:
    """exported.<precision>.onnx: the exported graph with its MatMul weights in int4 / int8 (MatMulNBits),
    every weight it reads in weights.<precision>.data, written one weight at a time. `tensors`: the
    weights of an export that has none yet (export_reduced without weights), read from the checkpoint
    as they are quantized or copied."""
    model = load_onnx(exported)
    if tensors is not None:  # the graph declares its weights; their values come from the checkpoint
        model.graph.initializer.extend(tensors.stub(name) for name in tensors.wanted)
    target = folder / FILES["exported"].replace(".onnx", f".{precision}.onnx")
    with WeightsFile(folder / FILES[f"weights.{precision}"]) as weights:  # inside the staging folder, like FP16's
        model, coverage = quantize_model(model, exported.parent, weights, BITS[precision], tensors)
    return save_onnx(model, target), coverage


def drop_export(folder: Path, exported: Path) -> None:
    """One copy of the weights per precision: once quantized (and the reference made), the export (FP32,
    or FP16 for a bf16 checkpoint) and its data file have served their purpose."""
    for path in (exported, folder / FILES["weights"]):
        path.unlink(missing_ok=True)


def passes(
    folder: Path,
    exported: Path,
    precision: str,
    backend: str,
    class_axis: int,
    upsample_to: str | None = None,
    keep_fp32: tuple[str, ...] = (),
    logits: str = LOGITS,
    key: NoiseKey | None = None,
    quantization: Coverage | None = None,
) -> Graphs:
    """Bare, production and verification graphs (FP16 copies if asked; keyed production noise with
    `key`), and TensorRT's verdict on them; refuses the build if TensorRT is the backend and would
    refuse a node. `logits`: the output modulated, its classes on `class_axis`; `upsample_to`: the input
    whose spatial size the logits are resized to first, if any; `quantization`: `exported` is that int4 /
    int8 quantization already (a PyTorch source's, made before its reference), else int4 / int8 quantize
    it here."""
    from aim.graph_passes.fp16 import convert_to_fp16
    from aim.graph_passes.trt_support import check_tensorrt_support
    from aim.runtime.tensorrt import EngineBuildError

    # The graphs are read without their weights: those in exported.onnx.data (a model past 2 GiB) stay
    # references, which every graph saved beside it shares (aim/weights.py).
    paths = {"exported": exported}
    if precision in BITS:  # weight-only int4 / int8: quantized once, then modulated (the redistribution untouched)
        if quantization is None:  # the int4 graphs refer to weights.int4.data alone
            quantized, quantization = quantized_graph(folder, exported, precision)
            drop_export(folder, exported)
            exported = quantized
        paths = {f"exported.{precision}": exported}
    suffix = f".{precision}.onnx" if precision in BITS else ".onnx"

    def named(key: str) -> Path:
        return folder / FILES[key].replace(".onnx", suffix)

    # Maps in blocks of classes for ONNX Runtime; whole for TensorRT, which plans its own memory
    # (add_redistribution's tile_maps).
    tile_maps = backend not in TENSORRT_BACKENDS
    graphs = deployment_graphs(load_onnx(exported), logits, class_axis, upsample_to, key, tile_maps)
    if upsample_to:
        paths["bare"] = save_onnx(graphs["bare"], named("bare"))
    else:
        paths["bare"] = exported  # nothing changed: the exported file is the bare model
    paths["modulated"] = save_onnx(graphs["production"], named("modulated"))
    paths["verification"] = save_onnx(graphs["verification"], named("verification"))
    del graphs
    sources = dict(ROLES)
    if precision == "fp16":
        with WeightsFile(folder / FILES["weights.fp16"]) as half_weights:  # written block by block
            for role, key in ROLES.items():
                half = folder / paths[key].name.replace(".onnx", ".fp16.onnx")
                paths[f"{key}.fp16"] = save_onnx(
                    convert_to_fp16(load_onnx(paths[key]), keep_fp32, half_weights, folder), half
                )
                sources[role] = f"{key}.fp16"
    for key in ("weights", "weights.fp16", "weights.int4", "weights.int8"):
        if (folder / FILES[key]).is_file():
            paths[key] = folder / FILES[key]
    if quantization is not None:  # MatMulNBits is ONNX Runtime's own: no TensorRT would take these graphs
        return Graphs(paths, sources, {}, quantization)
    target = backend if backend in TENSORRT_BACKENDS else "tensorrt"  # ONNX Runtime builds: would TensorRT take it?
    compatibility = {role: check_tensorrt_support(paths[key], backend=target) for role, key in sources.items()}
    unsupported: dict[str, list[str]] = {}  # finding -> the graphs that have it
    for role, report in compatibility.items():
        for finding in report.errors:
            unsupported.setdefault(str(finding), []).append(role)
    if unsupported and backend in TENSORRT_BACKENDS:
        listed = [f"{finding} [{', '.join(roles)}]" for finding, roles in unsupported.items()]
        more = f"\n  ... and {len(listed) - 20} more" if len(listed) > 20 else ""
        raise EngineBuildError(
            f"TensorRT's ONNX parser would refuse {len(listed)} node(s):\n  "
            + "\n  ".join(listed[:20])
            + more
            + "\nUse BACKEND=onnxruntime, or change the model."
        )
    return Graphs(paths, sources, compatibility)


def engines(graphs: Graphs, folder: Path, backend: str, precision: str, dims: dict, log) -> dict:
    """Builds the backend's engine files into `folder` (graphs.paths gains them); returns the
    TensorRT build records by artifact key (empty for ONNX Runtime)."""
    files = {key: folder / name for key, name in engine_files(backend).items()}
    production = graphs.paths[graphs.sources["production"]]
    builds = {}
    if backend == "onnxruntime":
        onnxruntime_engine(production, files["engine"], precision)
        if (folder / FILES["engine.data"]).is_file():  # a large model's engine keeps its weights beside it
            files["engine.data"] = folder / FILES["engine.data"]
    else:
        from aim.runtime import tensorrt as trt_engine

        cache = trt_engine.default_timing_cache(backend)
        for role, key in (("production", "engine"), ("bare", "engine.bare"), ("verification", "engine.verification")):
            source = graphs.paths[graphs.sources[role]]
            profile = profile_from_io(GraphIO.of(source).inputs, dims)
            builds[key] = trt_engine.build_engine(source, files[key], backend, profile, cache, log).as_dict()
    graphs.paths.update(files)
    return builds


def onnxruntime_engine(graph: Path, engine: Path, precision: str) -> Path:
    """The ONNX Runtime engine of `graph`: its optimised model, or the graph itself for FP16, int4 /
    int8, and any graph whose weights are in an external data file."""
    if precision != "fp32" or ort_engine.keeps_external_data(graph):
        # FP16: ONNX Runtime's CPU provider lacks most FP16 kernels and saves its optimised model with its
        # own FP32 fallbacks baked in (not portable, and with If branches not even valid). int4 / int8: the
        # optimised model would hold MatMulNBits prepacked for this CPU. External weights: the optimised
        # model writes a second copy of them (a 7B model's 14 GB twice); the engine refers to the graph's
        # one weights file instead, and ONNX Runtime optimises at load (~1 CPU s per GB more per session).
        with atomic_path(engine) as tmp:
            shutil.copyfile(graph, tmp)
        return engine
    return ort_engine.build(graph, engine)
