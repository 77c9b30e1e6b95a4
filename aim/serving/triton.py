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
from aim.runtime.folder import open_build

CONFIG = "config.pbtxt"
VERSION = "1"
# Wait this long for more requests before running a batch: small next to a model's run time, long
# enough that concurrent clients share a batch.
MAX_QUEUE_DELAY_US = 2000

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
            f"tritonclient is needed for Triton model configs ({error}); install it: pip install 'tritonclient[http,grpc]'"
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


def expected_tensors(manifest: Manifest) -> dict[str, dict[str, tuple[str, list[int], list[int] | None]]]:
    """What the config must declare, per the manifest: {"input"|"output": {name: (type, dims, reshape)}}."""
    graph = manifest.graph
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
        raise TritonConfigError(f"the manifest has no range for the {BATCH!r} dim: rebuild the engine with a dynamic batch")
    return int(manifest.dynamic_dims[BATCH].max)


def build_config(manifest: Manifest, name: str, engine_file: str, max_queue_delay_us: int = MAX_QUEUE_DELAY_US):
    """The ModelConfig message for a manifest (checked separately by check_config)."""
    from tritonclient.grpc import model_config_pb2 as pb

    platform, kind, filename = platform_for(engine_file)
    config = model_config_class()()
    config.name = name
    config.platform = platform
    config.max_batch_size = max_batch_size(manifest)
    config.default_model_filename = filename
    for role, tensors in expected_tensors(manifest).items():
        for tensor_name, (data_type, dims, reshape) in tensors.items():
            entry = getattr(config, role).add()
            entry.name = tensor_name
            entry.data_type = pb.DataType.Value(data_type)
            entry.dims.extend(dims)
            if reshape is not None:
                entry.reshape.SetInParent()  # an empty shape is the message's point: [1] -> []
                entry.reshape.shape.extend(reshape)
    config.instance_group.add(count=1, kind=pb.ModelInstanceGroup.Kind.Value(kind))
    config.dynamic_batching.max_queue_delay_microseconds = max_queue_delay_us
    return config


def check_config(config, manifest: Manifest, engine_file: str, where: str = CONFIG) -> None:
    """What Triton's schema cannot catch, against the manifest: raises TritonConfigError naming the problem."""
    from tritonclient.grpc import model_config_pb2 as pb

    problems = []
    platform, kind, filename = platform_for(engine_file)
    if config.platform != platform:
        problems.append(f"platform is {config.platform!r}, but a {Path(engine_file).suffix} engine needs {platform!r}")
    limit = max_batch_size(manifest)
    if not 1 <= config.max_batch_size <= limit:
        problems.append(
            f"max_batch_size is {config.max_batch_size}; it must be between 1 and the engine profile's max batch {limit} "
            f"(0 would turn batching off and make Triton send tensors without the batch dim the engine expects)"
        )
    wanted = expected_tensors(manifest)
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
                problems.append(f"{role} {tensor_name!r} has data_type {pb.DataType.Name(entry.data_type)}, the engine's is {data_type}")
            if list(entry.dims) != dims:
                problems.append(f"{role} {tensor_name!r} has dims {list(entry.dims)}, the engine's are {dims} per request")
            got_reshape = list(entry.reshape.shape) if entry.HasField("reshape") else None
            if got_reshape != reshape:
                problems.append(f"{role} {tensor_name!r} has reshape {got_reshape}, the engine needs {reshape}")
            if role == "input" and entry.optional:
                problems.append(f"input {tensor_name!r} is optional: Triton's TensorRT backend accepts no optional inputs")
    kinds = {pb.ModelInstanceGroup.Kind.Name(group.kind) for group in config.instance_group}
    if kinds - {kind, "KIND_AUTO"}:
        problems.append(f"instance_group kind {sorted(kinds)} does not fit {platform} (needs {kind})")
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


def _check_onnx_engine(path: Path, manifest: Manifest) -> list[str]:
    """An ONNX engine's own inputs/outputs must be the manifest's; returns its external data files
    (relative locations, as the model records them)."""
    import onnx

    from aim.weights import data_files

    said, have = manifest.graph.signature(), GraphIO.of(path).signature()
    for key in ("inputs", "outputs"):
        differ = [
            f"{name!r}: engine {have[key].get(name, 'absent')}, manifest {said[key].get(name, 'absent')}"
            for name in sorted(set(said[key]) | set(have[key]))
            if said[key].get(name) != have[key].get(name)
        ]
        if differ:
            raise TritonConfigError(f"{path.name} does not match its manifest's {key}: {'; '.join(differ)}. Rebuild with `make engine`")
    locations = data_files(onnx.load(str(path), load_external_data=False))  # the graph only, never its weights
    for location in locations:
        if not (path.parent / location).is_file():
            raise TritonConfigError(f"{path.name} keeps weights in {location}, which is missing beside it: rebuild")
    return locations


def config_text(config, source: str) -> str:
    from google.protobuf import text_format

    return f"# Generated by `aim triton` from {source}; do not edit: regenerate.\n" + text_format.MessageToString(config)


def write_model(
    build_folder: str | os.PathLike,
    repository: str | os.PathLike,
    name: str | None = None,
    engine: str | None = None,
    max_queue_delay_us: int = MAX_QUEUE_DELAY_US,
) -> Path:
    """Writes <repository>/<name>/ (config.pbtxt and 1/model.*) for the engine of a build folder.

    `engine` is the engine file relative to the build folder (default: the manifest's engine); its
    suffix picks the platform. Every file of the build is checked against its hash first. Other
    models already in the repository are left alone.
    """
    manifest = open_build(build_folder)
    name = name or manifest.model
    if not name or not _NAME.match(name):
        raise TritonConfigError(f"model name {name!r}: use letters, digits, '_', '-' and '.' only")
    engine_path = _engine_file(manifest, engine)
    platform, _, filename = platform_for(engine_path.name)
    text = config_text(build_config(manifest, name, engine_path.name, max_queue_delay_us), str(manifest.file))
    check_config(parse_config(text, f"{name}/{CONFIG}"), manifest, engine_path.name, f"{name}/{CONFIG}")
    # An ONNX engine can be read here: its own inputs/outputs must be what the manifest says.
    extra_files = _check_onnx_engine(engine_path, manifest) if platform == "onnxruntime_onnx" else []

    with StagedFolder(Path(repository) / name) as staged:
        (staged.path / VERSION).mkdir(parents=True)
        (staged.path / CONFIG).write_text(text)
        shutil.copyfile(engine_path, staged.path / VERSION / filename)
        for location in extra_files:  # external weights stay beside the model under their recorded name
            (staged.path / VERSION / location).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(engine_path.parent / location, staged.path / VERSION / location)
        return staged.publish()


def read_config(model_folder: str | os.PathLike):
    """Parses <model>/config.pbtxt by Triton's schema."""
    path = Path(model_folder) / CONFIG
    return parse_config(path.read_text(), str(path))
