"""A Triton Inference Server model repository generated from a build folder's manifest.json.

    <repo>/<name>/config.pbtxt
    <repo>/<name>/1/model.onnx     platform onnxruntime_onnx, KIND_CPU  (an ONNX Runtime engine)
    <repo>/<name>/1/model.plan     platform tensorrt_plan, KIND_GPU     (a TensorRT engine)

Nothing in config.pbtxt is typed by hand: names, data types and dims come from the manifest's graph
inputs/outputs, max_batch_size from the batch range the engine's profile was built for. Triton adds
the batch dimension itself, so every tensor's first dim must be the batch dim; `utility` ([B] in the
engine) is a per-request `[1]` reshaped to `[]`, `focus` a per-request `[C]`. No input is optional:
Triton's TensorRT backend accepts none (defaults, if ever offered, belong in an ensemble step).

The config is built as Triton's own ModelConfig protobuf (the one `tritonclient` ships), printed in
text format, parsed back and checked against the manifest for what the schema cannot catch (dims,
missing or extra tensors, max_batch_size <= 0) before anything is written; the model folder is
written in a staging folder and renamed into place.

`bare=True` writes the build's bare model (no utility, focus) as `<model>-bare`, its engine made the
way the build made its own (ONNX Runtime's optimised model, or the bare TensorRT plan), with the same
batching and instances: the baseline a load test compares the modulated model against.

Instances: on a CPU the default uses the cores (`cpu_cores()`): min(cores, MAX_DEFAULT_INSTANCES)
instances, each with cores // instances ONNX Runtime threads, so instances x threads = cores and
neither idles nor oversubscribes. Several instances run batches side by side; with the Python-based
backend each is its own process, so its per-request Python work runs in parallel too.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from aim.contract import BATCH, FOCUS, UTILITY
from aim.errors import TritonConfigError
from aim.files import StagedFolder
from aim.layout import GraphIO, Manifest
from aim.runtime.folder import Build

CONFIG = "config.pbtxt"
VERSION = "1"
# Wait this long for more requests before running a batch: small next to a model's run time, long
# enough that concurrent clients share a batch.
MAX_QUEUE_DELAY_US = 2000
BARE_SUFFIX = "-bare"  # the bare model's default name in the repository: <model>-bare
# The cap of the default CPU instance count: each instance holds its own session (weights and
# buffers), and beyond a few instances dynamic batching already keeps every core busy.
MAX_DEFAULT_INSTANCES = 4
# The ONNX Runtime intra-op thread count per instance: the parameter name Triton's C++ ONNX Runtime
# backend reads, and so does ours (backends/onnxruntime/model.py).
THREADS_PARAMETER = "intra_op_thread_count"

# Engine file -> (platform, instance kind, file name in the version folder).
PLATFORMS = {
    ".onnx": ("onnxruntime_onnx", "KIND_CPU", "model.onnx"),
    ".plan": ("tensorrt_plan", "KIND_GPU", "model.plan"),
    ".engine": ("tensorrt_plan", "KIND_GPU", "model.plan"),
}
# numpy dtype names (as the manifest writes them) -> Triton data types.
DATA_TYPES = {
    "bool": "TYPE_BOOL",
    "uint8": "TYPE_UINT8",
    "int8": "TYPE_INT8",
    "int16": "TYPE_INT16",
    "int32": "TYPE_INT32",
    "int64": "TYPE_INT64",
    "float16": "TYPE_FP16",
    "bfloat16": "TYPE_BF16",
    "float32": "TYPE_FP32",
    "float64": "TYPE_FP64",
}
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def model_config_class():
    """Triton's ModelConfig message, from tritonclient (imported here: an optional dependency)."""
    try:
        from tritonclient.grpc import model_config_pb2
    except ImportError as error:
        raise TritonConfigError(
            f"tritonclient is needed for Triton model configs ({error}); install it: pip install "
            "'tritonclient[http,grpc]'"
        ) from error
    return model_config_pb2.ModelConfig


def parse_config(text: str, where: str = CONFIG):
    """Parses config.pbtxt text by Triton's schema; a syntax or field error names line and column."""
    from google.protobuf import text_format

    config = model_config_class()()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as error:
        raise TritonConfigError(f"{where} is not a valid Triton model config: {error}") from error
    return config


def platform_for(engine_file: str) -> tuple[str, str, str]:
    suffix = Path(engine_file).suffix
    if suffix not in PLATFORMS:
        raise TritonConfigError(
            f"no Triton platform for engine {engine_file!r}: known engine files end in {', '.join(PLATFORMS)}"
        )
    return PLATFORMS[suffix]


def cpu_cores() -> int:
    """The cores this process may run on (its affinity mask, e.g. a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def instance_plan(kind: str, instances: int | None = None, threads: int | None = None) -> tuple[int, int | None]:
    """(instance count, ONNX Runtime threads per instance or None) for an instance kind. A GPU model
    runs one instance per GPU unless told; on a CPU the defaults split the cores (module docstring)."""
    for label, value in (("instances", instances), ("threads", threads)):
        if value is not None and value < 1:
            raise TritonConfigError(f"{label} must be at least 1, got {value}")
    if kind == "KIND_GPU":
        if threads is not None:
            raise TritonConfigError(
                "threads set ONNX Runtime's CPU threads; a TensorRT plan runs on the GPU: leave it out"
            )
        return instances or 1, None
    cores = cpu_cores()
    count = instances or min(cores, MAX_DEFAULT_INSTANCES)
    return count, threads or max(1, cores // count)


def _tensor_dims(tensor, role: str) -> list[int]:
    """The per-request dims of a manifest tensor: its dims without the leading batch dim, -1 if dynamic."""
    dims = tensor.dims
    if not dims or dims[0] != BATCH:
        raise TritonConfigError(
            f"{role} {tensor.name!r} has dims {dims}: Triton batches on the first dim, which must be "
            f"the dynamic {BATCH!r} dim. Re-export the model with a dynamic batch dim."
        )
    return [d if isinstance(d, int) and d > 0 else -1 for d in dims[1:]]


def _data_type(tensor, role: str) -> str:
    if tensor.dtype not in DATA_TYPES:
        raise TritonConfigError(f"{role} {tensor.name!r} has dtype {tensor.dtype!r}, which Triton has no type for")
    return DATA_TYPES[tensor.dtype]


def served_graph(manifest: Manifest, bare: bool = False) -> GraphIO:
    """Inputs and outputs of the graph a repository entry serves: the production engine's, or the bare model's."""
    return GraphIO.of(manifest.graph_path("bare")) if bare else manifest.graph


def expected_tensors(
    manifest: Manifest, bare: bool = False
) -> dict[str, dict[str, tuple[str, list[int], list[int] | None]]]:
    """What the config must declare, per the manifest: {"input"|"output": {name: (type, dims, reshape)}}."""
    graph = served_graph(manifest, bare)
    if not graph.inputs or not graph.outputs:
        raise TritonConfigError("the manifest lists no graph inputs or outputs: rebuild the engine with `make engine`")
    wanted = {"input": {}, "output": {}}
    for role, key in (("input", "inputs"), ("output", "outputs")):
        for tensor in getattr(graph, key):
            dims = _tensor_dims(tensor, role)
            reshape = None
            if not dims:  # a [B] tensor: Triton needs at least one dim per request, the engine wants none
                dims, reshape = [1], []
            wanted[role][tensor.name] = (_data_type(tensor, role), dims, reshape)
    if bare:
        return wanted
    inputs = wanted["input"]
    for knob in (UTILITY, FOCUS):
        if knob not in inputs:
            raise TritonConfigError(
                f"the engine has no {knob!r} input (inputs: {sorted(inputs)}): it is not modulated. "
                f"Build it with `make engine`, which adds utility and focus."
            )
    if inputs[UTILITY][1:] != ([1], []):
        raise TritonConfigError(f"{UTILITY!r} must be [batch] in the engine, got per-request dims {inputs[UTILITY][1]}")
    classes = manifest.modulation.num_classes
    if inputs[FOCUS][1] != [classes]:
        raise TritonConfigError(
            f"{FOCUS!r} must be [batch, {classes}] (the model's classes), got per-request dims {inputs[FOCUS][1]}"
        )
    return wanted


def max_batch_size(manifest: Manifest) -> int:
    if BATCH not in manifest.dynamic_dims:
        raise TritonConfigError(
            f"the manifest has no range for the {BATCH!r} dim: rebuild the engine with a dynamic batch"
        )
    return int(manifest.dynamic_dims[BATCH].max)


def build_config(
    manifest: Manifest,
    name: str,
    engine_file: str,
    max_queue_delay_us: int = MAX_QUEUE_DELAY_US,
    instances: int | None = None,
    threads: int | None = None,
    bare: bool = False,
):
    """The ModelConfig message for a manifest (checked separately by check_config)."""
    from tritonclient.grpc import model_config_pb2 as pb

    platform, kind, filename = platform_for(engine_file)
    config = model_config_class()()
    config.name = name
    config.platform = platform
    config.max_batch_size = max_batch_size(manifest)
    config.default_model_filename = filename
    for role, tensors in expected_tensors(manifest, bare).items():
        for tensor_name, (data_type, dims, reshape) in tensors.items():
            entry = getattr(config, role).add()
            entry.name = tensor_name
            entry.data_type = pb.DataType.Value(data_type)
            entry.dims.extend(dims)
            if reshape is not None:
                entry.reshape.SetInParent()  # an empty shape is the message's point: [1] -> []
                entry.reshape.shape.extend(reshape)
    count, threads = instance_plan(kind, instances, threads)
    config.instance_group.add(count=count, kind=pb.ModelInstanceGroup.Kind.Value(kind))
    if threads is not None:
        config.parameters[THREADS_PARAMETER].string_value = str(threads)
    config.dynamic_batching.max_queue_delay_microseconds = max_queue_delay_us
    return config


def check_config(config, manifest: Manifest, engine_file: str, where: str = CONFIG, bare: bool = False) -> None:
    """What Triton's schema cannot catch, against the manifest: raises TritonConfigError naming the problem."""
    from tritonclient.grpc import model_config_pb2 as pb

    problems = []
    platform, kind, filename = platform_for(engine_file)
    if config.platform != platform:
        problems.append(f"platform is {config.platform!r}, but a {Path(engine_file).suffix} engine needs {platform!r}")
    limit = max_batch_size(manifest)
    if not 1 <= config.max_batch_size <= limit:
        problems.append(
            f"max_batch_size is {config.max_batch_size}; it must be between 1 and the engine profile's max "
            f"batch {limit} "
            f"(0 would turn batching off and make Triton send tensors without the batch dim the engine expects)"
        )
    wanted = expected_tensors(manifest, bare)
    for role in ("input", "output"):
        declared = {}
        for entry in getattr(config, role):
            if entry.name in declared:
                problems.append(f"{role} {entry.name!r} is declared twice")
            declared[entry.name] = entry
        for missing in sorted(set(wanted[role]) - set(declared)):
            problems.append(f"{role} {missing!r} of the engine is missing")
        for extra in sorted(set(declared) - set(wanted[role])):
            problems.append(f"{role} {extra!r} is not a {role} of the engine (it has {sorted(wanted[role])})")
        for tensor_name in sorted(set(declared) & set(wanted[role])):
            entry, (data_type, dims, reshape) = declared[tensor_name], wanted[role][tensor_name]
            if pb.DataType.Name(entry.data_type) != data_type:
                problems.append(
                    f"{role} {tensor_name!r} has data_type {pb.DataType.Name(entry.data_type)}, the engine's "
                    f"is {data_type}"
                )
            if list(entry.dims) != dims:
                problems.append(
                    f"{role} {tensor_name!r} has dims {list(entry.dims)}, the engine's are {dims} per request"
                )
            got_reshape = list(entry.reshape.shape) if entry.HasField("reshape") else None
            if got_reshape != reshape:
                problems.append(f"{role} {tensor_name!r} has reshape {got_reshape}, the engine needs {reshape}")
            if role == "input" and entry.optional:
                problems.append(
                    f"input {tensor_name!r} is optional: Triton's TensorRT backend accepts no optional inputs"
                )
    kinds = {pb.ModelInstanceGroup.Kind.Name(group.kind) for group in config.instance_group}
    if kinds - {kind, "KIND_AUTO"}:
        problems.append(f"instance_group kind {sorted(kinds)} does not fit {platform} (needs {kind})")
    if any(group.count < 1 for group in config.instance_group):
        problems.append(
            f"instance_group count {[group.count for group in config.instance_group]}: every group needs at "
            "least 1 instance"
        )
    if not config.HasField("dynamic_batching"):
        problems.append("dynamic_batching is off: requests of different clients would never share a batch")
    if problems:
        raise TritonConfigError(f"{where} for model {config.name!r} does not match its engine: " + "; ".join(problems))


def _engine_file(manifest: Manifest, engine: str | None) -> Path:
    """The engine to serve: the manifest's, or another file of the build (by path inside it)."""
    relative = engine or manifest.engine
    path = manifest.folder / relative
    if not path.is_file():
        raise TritonConfigError(f"engine {path} does not exist: build it with `make engine MODEL={manifest.model}`")
    if relative not in {artifact.path for artifact in manifest.artifacts.values()}:
        raise TritonConfigError(f"{relative} is not a file of the build in {manifest.folder} (not in its manifest)")
    return path


def _bare_engine(manifest: Manifest) -> tuple[Path, bool]:
    """(file, build_it) of the bare model's engine: the bare TensorRT plan, or for ONNX Runtime the bare
    graph, to be optimised as the build optimised its engine (FP16 graphs are their own engine there)."""
    if manifest.backend != "onnxruntime":
        return manifest.path("engine.bare"), False
    return manifest.graph_path("bare"), manifest.precision != "fp16"


def _check_onnx_engine(path: Path, manifest: Manifest, graph: GraphIO) -> list[str]:
    """An ONNX engine's own inputs/outputs must be `graph`'s (the manifest's); returns its external data
    files (relative locations, as the model records them)."""
    import onnx

    from aim.weights import data_files

    said, have = graph.signature(), GraphIO.of(path).signature()
    for key in ("inputs", "outputs"):
        differ = [
            f"{name!r}: engine {have[key].get(name, 'absent')}, manifest {said[key].get(name, 'absent')}"
            for name in sorted(set(said[key]) | set(have[key]))
            if said[key].get(name) != have[key].get(name)
        ]
        if differ:
            raise TritonConfigError(
                f"{path.name} does not match its manifest's {key}: {'; '.join(differ)}. Rebuild with `make engine`"
            )
    locations = data_files(onnx.load(str(path), load_external_data=False))  # the graph only, never its weights
    for location in locations:
        if not (path.parent / location).is_file():
            raise TritonConfigError(f"{path.name} keeps weights in {location}, which is missing beside it: rebuild")
    return locations


def config_text(config, source: str) -> str:
    from google.protobuf import text_format

    return f"# Generated by `aim triton` from {source}; do not edit: regenerate.\n" + text_format.MessageToString(
        config
    )


def write_model(
    build_folder: str | os.PathLike,
    repository: str | os.PathLike,
    name: str | None = None,
    engine: str | None = None,
    max_queue_delay_us: int = MAX_QUEUE_DELAY_US,
    instances: int | None = None,
    threads: int | None = None,
    bare: bool = False,
) -> Path:
    """Writes <repository>/<name>/ (config.pbtxt and 1/model.*) for the engine of a build folder.

    `engine` is the engine file relative to the build folder (default: the manifest's engine); its
    suffix picks the platform. `bare` serves the build's bare model instead (default name
    <model>-bare). `instances` and `threads` as `instance_plan` takes them. Every file of the build is
    checked against its hash first. Other models already in the repository are left alone.
    """
    manifest = Build.open(build_folder).manifest  # a build that failed its verification is refused
    if bare and engine:
        raise TritonConfigError(
            f"bare serves the build's bare model, engine={engine!r} picks a modulated engine: give one of them"
        )
    name = name or manifest.model + (BARE_SUFFIX if bare else "")
    if not name or not _NAME.match(name):
        raise TritonConfigError(f"model name {name!r}: use letters, digits, '_', '-' and '.' only")
    engine_path, build_it = _bare_engine(manifest) if bare else (_engine_file(manifest, engine), False)
    platform, _, filename = platform_for(engine_path.name)
    config = build_config(manifest, name, engine_path.name, max_queue_delay_us, instances, threads, bare)
    text = config_text(config, str(manifest.file))
    check_config(parse_config(text, f"{name}/{CONFIG}"), manifest, engine_path.name, f"{name}/{CONFIG}", bare)
    # An ONNX engine can be read here: its own inputs/outputs must be what the manifest says.
    graph = served_graph(manifest, bare)
    extra_files = (
        _check_onnx_engine(engine_path, manifest, graph) if platform == "onnxruntime_onnx" and not build_it else []
    )

    with StagedFolder(Path(repository) / name, _ours, what="a model folder `aim triton` wrote") as staged:
        (staged.path / VERSION).mkdir(parents=True)
        (staged.path / CONFIG).write_text(text)
        if build_it:
            from aim.runtime import onnxruntime as ort_engine

            ort_engine.build(engine_path, staged.path / VERSION / filename)
            _check_onnx_engine(staged.path / VERSION / filename, manifest, graph)
        else:
            shutil.copyfile(engine_path, staged.path / VERSION / filename)
        for location in extra_files:  # external weights stay beside the model under their recorded name
            (staged.path / VERSION / location).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(engine_path.parent / location, staged.path / VERSION / location)
        return staged.publish()


def _ours(folder: Path) -> bool:
    """A model folder `aim triton` wrote (its config.pbtxt says so): the only kind it replaces."""
    try:
        return (folder / CONFIG).read_text().startswith("# Generated by `aim triton`")
    except (OSError, UnicodeDecodeError):
        return False


def read_config(model_folder: str | os.PathLike):
    """Parses <model>/config.pbtxt by Triton's schema."""
    path = Path(model_folder) / CONFIG
    return parse_config(path.read_text(), str(path))
