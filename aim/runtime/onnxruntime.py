"""ONNX Runtime: the embedded default engine, and the one every machine can run.

Building an "engine" means letting ONNX Runtime optimise the graph once and saving the optimised model
(extended level: fusions that stay portable across CPUs). Loading it later skips that work.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from aim.errors import AimError, InvalidGraphError
from aim.files import atomic_path
from aim.runtime.base import Runner

_NP_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(bool)": np.bool_,
}


# ONNX Runtime's memory pattern (on by default) plans a run's intermediates into one block from the
# previous run's trace; the second run allocates that block beside the arena chunks the first run left, so
# what the graph holds beyond its outputs counts twice. Where an output is a map (rank MAP_RANK or more:
# batch, classes and two axes of positions, a size that grows with the image) that is hundreds of MiB:
# SegFormer-B0 at 512 x 512 peaks at 627 MiB with it, 461 without, modulated 991 against 510 (docs/results.md,
# "SegFormer's peak RSS"; `make bench` measures the latency it costs). Such engines run without it. A
# decoder's KV cache (`present.*`, rank 4 too) is no map: it is small per step, and without the pattern a
# 135M-class decode step ran 11% slower (`make bench`, "bare as shipped / in ONNX Runtime's default session").
MAP_RANK = 4
KV_CACHE_OUTPUT = "present."  # the decoders' present.<layer>.key / .value (tasks/decoder_inputs.PRESENT)


def session_options(
    threads: int | None = None,
    level: str = "all",
    spinning: bool = True,
    prepacking: bool = True,
    memory_pattern: bool = True,
):
    """ONNX Runtime's session options. `memory_pattern`: see MAP_RANK. `prepacking`: ONNX Runtime maps
    weights from an external data file in place, but prepacks each MatMul's weights for its kernels into
    an anonymous copy and drops the mapping. Without prepacking the weights stay file pages (shared by
    every session and process that maps the file, evictable), at ~30% more CPU per decode step for FP32
    and 22x for int4 (MatMulNBits has no fast path without its packed weights; docs/backends.md): on by
    default; off only to serve several copies of a large FP32 model from one machine's memory."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = {
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    if threads:
        options.intra_op_num_threads = threads
    if not spinning:  # idle pool threads sleep instead of spinning: fairer when several sessions share cores
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if not prepacking:
        options.add_session_config_entry("session.disable_prepacking", "1")
    options.enable_mem_pattern = memory_pattern
    # Fatal only: warnings about unused initializers are noise here, and an error comes back as the
    # exception, which says the same (a logged copy would be a second, coloured error line).
    options.log_severity_level = 4
    return options


def _session(path: Path, options):
    import onnxruntime as ort

    if not path.is_file():
        raise InvalidGraphError(f"{path}: no such model or engine file")
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as error:  # ORT raises its own Fail/InvalidGraph/InvalidProtobuf types
        # The graph loaded, but saving the optimised model failed: a full disk, not a bad graph.
        if options.optimized_model_filepath and _WRITE_FAILED in str(error):
            raise AimError(
                f"ONNX Runtime could not write the engine for {path} into "
                f"{Path(options.optimized_model_filepath).parent}: {str(error).strip()}. Is the disk full (df -h)? "
                "Free space there and build again."
            ) from error
        raise InvalidGraphError(
            f"ONNX Runtime cannot load {path}: {str(error).strip()}. Rebuild it from a valid ONNX file."
        ) from error


# ONNX Runtime's words when saving an optimised model's weights fails (a full disk, a folder it cannot write):
# not a bad graph, so not "rebuild it from a valid ONNX file".
_WRITE_FAILED = "Failed to write"


def build(onnx_path: str | os.PathLike, engine_path: str | os.PathLike, threads: int | None = None) -> Path:
    """Optimises `onnx_path` with ONNX Runtime and saves the result atomically at `engine_path`. A
    model whose weights are in an external data file gets an engine with its own, `<engine>.data`
    (written first; the engine file appears last)."""
    engine_path = Path(engine_path)
    data = engine_path.with_name(engine_path.name + ".data")
    with atomic_path(engine_path) as tmp:
        options = session_options(threads, level="extended")
        options.optimized_model_filepath = str(tmp)
        if keeps_external_data(
            Path(onnx_path)
        ):  # past 2 GiB ONNX Runtime cannot save the optimised weights inside the model
            data.unlink(missing_ok=True)
            options.add_session_config_entry("session.optimized_model_external_initializers_file_name", data.name)
            options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        try:
            _session(Path(onnx_path), options)
        except BaseException:
            data.unlink(missing_ok=True)
            raise
    return engine_path


def keeps_external_data(path: Path) -> bool:
    """Whether the model at `path` keeps weights in an external data file (the graph is read, not its
    weights); an unreadable file is left to ONNX Runtime, which says what is wrong with it."""
    import onnx

    from aim.weights import external_tensors

    try:
        return bool(external_tensors(onnx.load(str(path), load_external_data=False)))
    except Exception:  # protobuf's DecodeError, a missing file, ...
        return False


def has_maps(session) -> bool:
    """Whether an output of the session is a map (MAP_RANK or more axes, not a KV cache): its memory pattern
    stays off."""
    return any(
        output.shape is not None and len(output.shape) >= MAP_RANK and not output.name.startswith(KV_CACHE_OUTPUT)
        for output in session.get_outputs()
    )


class OnnxRuntimeEngine(Runner):
    """Runs a (modulated or bare) ONNX model or a built engine, with its inputs checked first."""

    backend = "onnxruntime"

    def __init__(
        self,
        path: str | os.PathLike,
        threads: int | None = None,
        spinning: bool = True,
        profile: dict | None = None,
        prepacking: bool = True,
        memory_pattern: bool | None = None,
    ):
        """`memory_pattern`: ONNX Runtime's, on or off; None (the default): off where an output is a map
        (MAP_RANK), which the engine's own outputs tell once it is loaded (loaded again then: a map's
        engine loads twice)."""
        self.path = Path(path)
        self.profile = profile  # the shapes it was built for, when a build folder says (else any)
        self._options = dict(
            threads=threads, spinning=spinning, prepacking=prepacking, memory_pattern=memory_pattern is not False
        )  # see session_options
        self.session = _session(self.path, session_options(**self._options))
        if memory_pattern is None and has_maps(self.session):
            self._options["memory_pattern"], self.session = False, None
            self.session = _session(self.path, session_options(**self._options))
        self.inputs = {i.name: (_NP_DTYPES.get(i.type), list(i.shape)) for i in self.session.get_inputs()}
        self.outputs = [o.name for o in self.session.get_outputs()]

    def set_seed(self, seed: int):
        """Repeatable in-graph noise from here on: ONNX Runtime's random kernels take their seed when a
        session is created (onnxruntime.set_seed seeds only sessions made after it), so the session is
        made again after seeding. Process-wide: sessions created later get the same stream."""
        import onnxruntime as ort

        ort.set_seed(int(seed))
        self.session = _session(self.path, session_options(**self._options))

    def _infer(self, feed: dict) -> dict[str, np.ndarray]:
        return dict(zip(self.outputs, self.session.run(None, feed)))

    def close(self):
        self.session = None
