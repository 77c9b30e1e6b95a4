"""TensorRT engines: one builder and one runner over both Python APIs.

`tensorrt` (data-centre GPUs) and `tensorrt_rtx` (TensorRT for RTX, edge GPUs) share the builder,
parser and runtime API; the module is imported lazily, so this file imports on any machine. TensorRT
for RTX also builds on a machine without a GPU (ahead of time), so the same code builds real `.plan`
files here; running one needs the GPU.

Builds are strongly typed: the precision of every layer is the element type of the ONNX graph
(fp16 is written into the graph by graph_passes.fp16, never asked of the builder: TensorRT 11 has no
fp16 flag), so the redistribution subgraph stays FP32 inside an FP16 engine.
"""

from __future__ import annotations

import importlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from aim.errors import AimError
from aim.files import atomic_path
from aim.runtime.base import Runner, profile_from_io  # noqa: F401  (profile_from_io: part of this module's API)

# Backend name (CLI, manifest) -> Python module.
MODULES = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx"}
INSTALL = {
    "tensorrt": "pip install -e '.[gpu]' (tensorrt 11.4 wheels come from NVIDIA's index, reachable on GPU machines)",
    "tensorrt-rtx": "pip install -e '.[rtx]' (tensorrt-rtx 1.7 from PyPI)",
}
# Upper bound on the scratch memory a layer may use at inference. The builder refuses tactics that
# need more: SegFormer at its profile's max (batch 8, 150 classes, 1024 x 1024: 5 GiB per logits
# tensor) needs more than 8 GiB. Narrow the DimRanges in the config for smaller GPUs.
# A bound, not an allocation: TensorRT never uses more than the GPU has.
WORKSPACE_BYTES = 16 << 30


class BackendUnavailableError(AimError):
    """The backend's package or hardware is missing on this machine."""


class EngineBuildError(AimError):
    """TensorRT's parser or builder refused the graph."""


def import_api(backend: str):
    """The TensorRT Python module of `backend`, or an error saying what to install."""
    if backend not in MODULES:
        raise AimError(f"unknown TensorRT backend {backend!r}; use one of {', '.join(MODULES)}")
    try:
        return importlib.import_module(MODULES[backend])
    except ImportError as error:
        raise BackendUnavailableError(
            f"backend {backend} needs the Python module {MODULES[backend]!r}, which is not installed ({error}). "
            f"Install it with: {INSTALL[backend]}; or use BACKEND=onnxruntime."
        ) from None


def cuda_gpu_available() -> tuple[bool, str]:
    """Whether a CUDA GPU with a working driver is present, and what was found; asks the driver itself
    (libcuda), so no CUDA toolkit is needed for the answer."""
    import ctypes

    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False, "no CUDA driver (libcuda.so.1 not found)"
    if cuda.cuInit(0) != 0:
        return False, "the CUDA driver found no usable GPU (cuInit failed)"
    count = ctypes.c_int(0)
    if cuda.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value == 0:
        return False, "the CUDA driver reports no GPU"
    return True, f"{count.value} CUDA GPU(s)"


# ---------------------------------------------------------------------------------------------
# Build


@dataclass
class BuildResult:
    path: Path
    backend: str
    version: str
    bytes: int
    seconds: float
    profile: dict
    layers: int
    # Element types of the network's inputs and outputs as TensorRT parsed them.
    io_types: dict = field(default_factory=dict)
    timing_cache: str | None = None

    def as_dict(self) -> dict:
        return {
            "path": self.path.name,
            "backend": self.backend,
            "version": self.version,
            "bytes": self.bytes,
            "build_s": round(self.seconds, 3),
            "layers": self.layers,
            "io_types": self.io_types,
            "profile": self.profile,
            "timing_cache": self.timing_cache,
            "workspace_bytes": WORKSPACE_BYTES,
            "strongly_typed": True,
        }


def _logger(trt):
    class Collecting(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.messages: list[str] = []

        def log(self, severity, message):
            if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                self.messages.append(str(message))

    return Collecting()


def parse_network(onnx_path: str | os.PathLike, backend: str):
    """(api, builder, network, parser, logger) for `onnx_path`, strongly typed; parse errors name the node."""
    trt = import_api(backend)
    logger = _logger(trt)
    builder = trt.Builder(logger)
    flags = 0
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if strongly_typed is not None:  # TensorRT 10 / RTX; networks are strongly typed by default where it is gone
        flags |= 1 << int(strongly_typed)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = []
        for i in range(parser.num_errors):
            error = parser.get_error(i)
            errors.append(f"node {error.node_name()!r} ({error.node_operator()}): {error.desc()}")
        raise EngineBuildError(
            f"{backend} {trt.__version__} cannot parse {Path(onnx_path).name}:\n  "
            + "\n  ".join(errors or logger.messages)
        )
    return trt, builder, network, parser, logger


def network_summary(network) -> tuple[dict, dict[str, set[str]]]:
    """IO element types, and the output element types of every layer, by layer name."""
    io = {}
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        io[tensor.name] = {"dtype": str(tensor.dtype).split(".")[-1], "shape": list(tensor.shape)}
    for i in range(network.num_outputs):
        tensor = network.get_output(i)
        io[tensor.name] = {"dtype": str(tensor.dtype).split(".")[-1], "shape": list(tensor.shape)}
    layers = {}
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        layers[layer.name] = {str(layer.get_output(j).dtype).split(".")[-1] for j in range(layer.num_outputs)}
    return io, layers


def build_engine(
    onnx_path: str | os.PathLike,
    plan_path: str | os.PathLike,
    backend: str,
    profile: dict[str, dict[str, list[int]]],
    timing_cache: str | os.PathLike | None = None,
    log=lambda message: None,
) -> BuildResult:
    """Parses `onnx_path`, builds a strongly typed engine with one optimization profile and writes the
    serialized plan atomically to `plan_path`. `timing_cache`: a file reused and updated across
    builds (TensorRT; TensorRT for RTX has no timing cache: it compiles kernels at run time)."""
    started = time.perf_counter()
    trt, builder, network, parser, logger = parse_network(onnx_path, backend)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    optimization_profile = builder.create_optimization_profile()
    names = [network.get_input(i).name for i in range(network.num_inputs)]
    missing = sorted(set(names) - set(profile))
    if missing:
        raise EngineBuildError(f"no profile for network inputs {missing} (profile has {sorted(profile)})")
    for name in names:
        shapes = profile[name]
        optimization_profile.set_shape(name, shapes["min"], shapes["opt"], shapes["max"])
    config.add_optimization_profile(optimization_profile)

    cache = None
    use_cache = timing_cache is not None and backend == "tensorrt"
    if use_cache:
        data = Path(timing_cache).read_bytes() if Path(timing_cache).is_file() else b""
        cache = config.create_timing_cache(data)
        if not config.set_timing_cache(cache, ignore_mismatch=False):  # made on another GPU or version: start afresh
            config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)

    log(f"      building {Path(plan_path).name} with {backend} {trt.__version__} ({network.num_layers} layers)")
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineBuildError(
            f"{backend} {trt.__version__} could not build {Path(onnx_path).name}: "
            + ("; ".join(logger.messages) or "no reason given")
        )
    plan_path = Path(plan_path)
    with atomic_path(plan_path) as tmp:
        tmp.write_bytes(memoryview(plan))
    if use_cache:
        with atomic_path(Path(timing_cache)) as tmp:
            tmp.write_bytes(memoryview(config.get_timing_cache().serialize()))
    io, _ = network_summary(network)
    return BuildResult(
        path=plan_path,
        backend=backend,
        version=trt.__version__,
        bytes=plan_path.stat().st_size,
        seconds=time.perf_counter() - started,
        profile=profile,
        layers=network.num_layers,
        io_types=io,
        timing_cache=Path(timing_cache).name if use_cache else None,
    )


def default_timing_cache(backend: str) -> Path:
    """Where builds share tactic timings: per user, outside the build folder (it is a cache of this
    machine's GPU, not an artifact of a model)."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "aim-modulation" / f"timing-cache.{backend}"


def read_profile(plan_path: str | os.PathLike, backend: str) -> dict | None:
    """The profile stored in a plan, read back from the deserialized engine (needs a GPU that can
    load it); None where the engine cannot be deserialized here."""
    trt = import_api(backend)
    runtime = trt.Runtime(_logger(trt))
    engine = runtime.deserialize_cuda_engine(Path(plan_path).read_bytes())
    if engine is None:
        return None
    profile = {}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
            low, opt, high = engine.get_tensor_profile_shape(name, 0)
            profile[name] = {"min": list(low), "opt": list(opt), "max": list(high)}
    return profile


# ---------------------------------------------------------------------------------------------
# Run


def engine_runnable(backend: str) -> tuple[bool, str]:
    """Whether this machine can run `backend` engines, and why not."""
    try:
        import_api(backend)
    except BackendUnavailableError as error:
        return False, str(error)
    gpu, detail = cuda_gpu_available()
    if not gpu:
        return False, f"{detail}: {backend} engines run only on an NVIDIA GPU" + (
            " (RTX class)" if backend == "tensorrt-rtx" else ""
        )
    return True, detail


class TensorRTEngine(Runner):
    """Runs a `.plan` with Polygraphy's TrtRunner, with the same interface as OnnxRuntimeEngine.

    `inputs` ({name: (numpy dtype, dims)}) and `profile` come from the manifest, so that a feed is
    checked (names, dtypes, ranks, the profile's min/max) before any GPU work, also on machines that
    cannot load the engine."""

    def __init__(self, plan_path: str | os.PathLike, backend: str, inputs: dict, outputs: list[str], profile: dict):
        self.path, self.backend = Path(plan_path), backend
        self.inputs, self.outputs, self.profile = inputs, outputs, profile
        self._runner = None

    def _start(self):
        if self._runner is None:
            runnable, why = engine_runnable(self.backend)
            if not runnable:
                raise BackendUnavailableError(f"cannot run {self.path.name} here: {why}")
            import sys

            from polygraphy import config as polygraphy_config

            rtx = self.backend == "tensorrt-rtx"
            # Polygraphy picks tensorrt or tensorrt_rtx when its TensorRT backend is first imported.
            if "polygraphy.backend.trt" in sys.modules and polygraphy_config.USE_TENSORRT_RTX != rtx:
                raise AimError(
                    "one process runs engines of one TensorRT flavour (tensorrt or tensorrt-rtx); start another process"
                )
            polygraphy_config.USE_TENSORRT_RTX = rtx
            from polygraphy.backend.trt import EngineFromBytes, TrtRunner

            runner = TrtRunner(EngineFromBytes(self.path.read_bytes()))
            try:
                runner.activate()
            except Exception as error:  # Polygraphy reports a plan this GPU or version cannot load as a generic error
                raise BackendUnavailableError(
                    f"{self.backend} could not load {self.path.name} on this machine's GPU: {error}"
                ) from error
            self._runner = runner
        return self._runner

    def _infer(self, feed: dict) -> dict[str, np.ndarray]:
        outputs = self._start().infer(feed)
        return {name: np.array(outputs[name]) for name in self.outputs}

    def close(self):
        if self._runner is not None:
            self._runner.deactivate()
            self._runner = None


def engine_io(graph) -> tuple[dict, list[str]]:
    """({name: (numpy dtype, dims)}, [output names]) from a layout.GraphIO."""
    inputs = {t.name: (np.dtype(t.dtype).type, t.dims) for t in graph.inputs}
    return inputs, [t.name for t in graph.outputs]
